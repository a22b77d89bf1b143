"""Following keepalived's state from its notify FIFO: the lines, and what each transition asks.

keepalived (global_defs `vrrp_notify_fifo PATH`, or `notify_fifo`) writes one line per
transition, in order, e.g. `INSTANCE "VI_1" MASTER 100` or `GROUP "VG_1" BACKUP 0` (the last
four arguments of a `notify` script; states MASTER, BACKUP, FAULT, STOP, DELETED, and
MASTER_RX_LOWER_PRI / MASTER_PRIORITY / BACKUP_PRIORITY which are not transitions). The same
FIFO may carry health-checker lines (`VS ...`, `RS ...`). This module owns parsing those lines,
the decision (which transitions the daemon acts on and which steps each one runs: those of
conntrack-tools' primary-backup.sh) and following the FIFO: made if missing, read by line, each
transition's steps run in order on the daemon's control operations (`commands.Ops`), as the
script's commands would. It knows nothing of the daemon beyond Ops.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, assert_never

import trio

if TYPE_CHECKING:
    from .commands import Ops

__all__ = ["MAX_LINE", "STEPS", "Follower", "Step", "Transition", "follow_fifo", "open_fifo",
           "parse_line", "read_transitions", "run_transition"]

log = logging.getLogger(__name__)

#: longest line taken from the FIFO (keepalived's names are short); longer ones are refused
MAX_LINE = 512


class Step(enum.Enum):
    """One control command, in primary-backup.sh's words."""

    COMMIT = "commit"            # -c: the external cache into the kernel table
    FLUSH = "flush"              # -f: both caches
    RESYNC_INTERNAL = "resync"   # -R: the internal cache from a kernel dump
    BULK_SEND = "bulk_send"      # -B: everything to the peers
    PURGE = "purge"              # -t: the zombie entries of a former master
    REQUEST_RESYNC = "request"   # -n: the master's flows, again


#: what primary-backup.sh runs on each state keepalived enters (its primary/backup/fault)
STEPS: dict[str, tuple[Step, ...]] = {
    "MASTER": (Step.COMMIT, Step.FLUSH, Step.RESYNC_INTERNAL, Step.BULK_SEND),
    "BACKUP": (Step.PURGE, Step.REQUEST_RESYNC),
    "FAULT": (Step.PURGE,),
}

_KINDS = frozenset({"INSTANCE", "GROUP"})


@dataclass(frozen=True, slots=True)
class Transition:
    kind: str      # INSTANCE | GROUP
    name: str
    state: str     # as keepalived wrote it (upper case)
    priority: int | None


def parse_line(line: bytes) -> Transition | None:
    """One FIFO line (without its newline). None for anything that is not a VRRP
    instance/group line: health-checker lines, blank or malformed lines, oversize ones."""
    if len(line) > MAX_LINE:
        return None
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    kind, _, rest = text.partition(" ")
    if kind not in _KINDS or not rest.startswith('"'):
        return None
    name, quote, tail = rest[1:].partition('"')
    if not quote or not name or not name.isprintable():
        return None
    parts = tail.split()
    if not parts or not parts[0].replace("_", "").isalpha() or len(parts) > 2:
        return None
    priority: int | None = None
    if len(parts) == 2:
        if not parts[1].isdigit() or len(parts[1]) > 5:
            return None
        priority = int(parts[1])
    return Transition(kind, name, parts[0].upper(), priority)


@dataclass
class Follower:
    """Which lines the daemon acts on. `names`: the instances or groups to follow (empty:
    every one; with several instances, name the one whose VIPs carry the flows). The node has
    one role, so a state equal to the last one acted on runs nothing again: a sync group's
    GROUP line and its INSTANCE lines, keepalived's reload, a repeated line. STOP and DELETED
    forget the role (the next MASTER or BACKUP acts)."""

    names: frozenset[str] = frozenset()
    state: str | None = None
    #: transitions acted on; lines that were not a transition; steps that raised
    transitions: int = 0
    ignored: int = 0
    failed_steps: int = 0

    def decide(self, t: Transition) -> tuple[Step, ...]:
        if self.names and t.name not in self.names:
            return ()
        if t.state in ("STOP", "DELETED"):
            self.state = None
            return ()
        steps = STEPS.get(t.state)
        if steps is None or self.state == t.state:  # priority notices; the same role again
            return ()
        self.state = t.state
        return steps


def open_fifo(path: str) -> int:
    """The FIFO keepalived writes to, made (0600) if missing and opened read-write: a reader
    that also holds a write end never sees end-of-file when keepalived restarts, and the open
    does not wait for a writer. A path that is not a FIFO is an OSError naming it."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "keepalived.notify_fifo is not a FIFO", path)
    return fd


async def read_transitions(stream: trio.abc.ReceiveStream,
                           ignored: Callable[[], None]) -> AsyncIterator[Transition]:
    """The transitions in a byte stream of FIFO lines; `ignored()` for every other line (an
    overlong one is dropped up to its newline)."""
    pending = b""
    skipping = False
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        *lines, rest = (pending + chunk).split(b"\n")
        for line in lines:
            if skipping:  # the end of an overlong line
                skipping = False
                continue
            t = parse_line(line)
            if t is None:
                if line.strip():
                    ignored()
                continue
            yield t
        if len(rest) > MAX_LINE:
            ignored()
            skipping, rest = True, b""
        pending = rest


async def run_step(ops: Ops, step: Step) -> None:
    match step:
        case Step.COMMIT:
            await ops.commit()
        case Step.FLUSH:
            ops.flush_caches("both")
        case Step.RESYNC_INTERNAL:
            await ops.resync_internal()
        case Step.BULK_SEND:
            ops.bulk_send()
        case Step.PURGE:
            await ops.purge(None)
        case Step.REQUEST_RESYNC:
            ops.request_resync(None)
        case _:
            assert_never(step)


async def run_transition(follower: Follower, t: Transition, ops: Ops) -> None:
    """The steps `t` asks for, in order; a failed one (refused, or any other exception: a
    kernel dump's OSError) is logged with its step, counted, and the next runs, as the script
    goes on after a failed command. Cancellation is not caught (BaseException)."""
    steps = follower.decide(t)
    if not steps:
        return
    follower.transitions += 1
    log.info("keepalived: %s %s is %s; running %s", t.kind.lower(), t.name, t.state,
             ", ".join(s.value for s in steps))
    for step in steps:
        try:
            await run_step(ops, step)
        except Exception as e:  # contained per step: MASTER's bulk send still runs
            follower.failed_steps += 1
            log.error("keepalived %s: %s failed: %s: %s", t.state, step.value,
                      type(e).__name__, e)


async def follow_fifo(path: str, follower: Follower, ops: Ops) -> None:
    """Forever: keepalived's transitions from the FIFO at `path`, each run on `ops`, in the
    order keepalived wrote them (no process per transition)."""

    def ignored() -> None:
        follower.ignored += 1

    async with trio.lowlevel.FdStream(open_fifo(path)) as stream:
        async for t in read_transitions(stream, ignored):
            await run_transition(follower, t, ops)
