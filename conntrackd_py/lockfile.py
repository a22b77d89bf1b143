"""The files beside the lock and the process limits the daemon takes at start.

This module owns the pid lock (flock, a stale lock taken over), the epoch file that keeps epochs
growing across restarts, opening those files never through a symlink, and the descriptor limit.
It must not know the daemon's tasks or the sync protocol beyond `new_epoch`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import stat
import time

from .sync import new_epoch

log = logging.getLogger(__name__)


class LockError(Exception):
    pass


def open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
    """Open a file we own next to the lock, never through a symlink (O_NOFOLLOW: a link
    planted there must not make root truncate or write its target) and not a device or FIFO.
    LockError names the path when it is one."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockError(f"{path} is a symbolic link; refusing to open it (remove it, or "
                            "point general.lock_file at a regular file)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockError(f"{path} is not a regular file; refusing to use it")
    return fd


class PidLock:
    """An flock()ed lock file holding our pid. A lock left by a dead process is taken over:
    flock dies with its holder, so only a live daemon can block a restart."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                try:
                    rfd = open_nofollow(self.path, os.O_RDONLY)
                    with os.fdopen(rfd) as f:
                        pid = f.read(32).strip()
                except (OSError, LockError):
                    pid = "?"
                raise LockError(f"another conntrackd-py (pid {pid}) holds {self.path}") from None
            raise
        old = os.read(fd, 32).decode(errors="replace").strip()
        if old and old.isdigit() and int(old) != os.getpid():
            log.info("took over stale lock %s left by pid %s (not running)", self.path, old)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


def next_epoch(path: str, wall: float) -> int:
    """Epochs must grow across restarts (peers drop an older one as a replay), so the last
    one is kept beside the lock file; the wall clock alone would do unless it steps back."""
    previous: int | None
    try:
        fd = open_nofollow(path, os.O_RDONLY)
        with os.fdopen(fd) as f:
            previous = int(f.read(32).strip())
    except (OSError, ValueError, LockError):
        previous = None
    epoch = new_epoch(wall, previous)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(f"{epoch}\n")
    except (OSError, LockError) as e:
        log.warning("cannot keep the epoch in %s (%s); restarts rely on the clock", path, e)
    return epoch


def process_age() -> float | None:
    """Seconds since this process started (the kernel's start time in /proc/self/stat, in
    clock ticks since boot), for the "ready after" log line; None where it cannot tell."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - started, 0.0)
    except (OSError, ValueError, IndexError):
        return None


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (the 1024 default is a few hundred idle
    clients away); returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


__all__ = ["LockError", "PidLock", "next_epoch", "open_nofollow", "process_age",
           "raise_nofile_limit"]
