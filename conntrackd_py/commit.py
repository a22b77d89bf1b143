"""The forked commit: the external cache written into the kernel table by a child process.

This module owns the commit's process boundary: fork, the child's setup (default signals, no
collector, higher priority), the plan and the blocking commit in the child, and the typed
`CommitReport` it writes back on a pipe (JSON of the dataclass, checked field by field when
read back: a child that died or wrote garbage is a `CommitError`, never a KeyError in the
daemon). The child shares the cache copy-on-write, so there is nothing to copy and the parent
keeps serving the sync link and the control socket meanwhile.
It must not touch trio in the child, nor log there (the parent's handlers may hold locks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .cache import ExternalCache
from .kernel.table import Table
from .stats import CommitReport

__all__ = ["COMMIT_NICE", "CommitError", "CommitJob", "EchoWindow", "commit_forked",
           "report_from_json"]

#: the commit process's nice value (root may raise priority; others keep the parent's)
COMMIT_NICE = -20


class CommitError(Exception):
    """The commit did not run or did not report (the message says why; `errno` when the
    parent could not start the child: EMFILE for the pipe, EAGAIN for the fork)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class CommitJob:
    """What the child needs: the cache (shared copy-on-write) and the kernel side's knobs."""

    external: ExternalCache
    netns: str | None
    batch: int
    commit_timeout: int | None
    be_liberal: bool
    #: a table the parent opened before the fork, so it knows the socket's netlink port id
    #: (the events the commit causes carry it); None: the child opens its own
    table: Table | None = None


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_counts(v: object) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and type(n) is int for k, n in v.items())


#: each CommitReport field's check and conversion, by its annotation: a new field is checked
#: with no edit here, and a field of a type not listed fails at import, not silently
_CHECKS: dict[object, tuple[Callable[[object], bool], Callable[[Any], object]]] = {
    int: (_is_int, int), float: (_is_number, float), dict[str, int]: (_is_counts, dict),
}
_FIELDS = {f.name: _CHECKS[hint]
           for f in dataclasses.fields(CommitReport)
           for hint in (typing.get_type_hints(CommitReport)[f.name],)}


def report_to_json(report: CommitReport) -> bytes:
    return json.dumps(dataclasses.asdict(report)).encode()


def report_from_json(data: bytes | bytearray) -> CommitReport:
    """The child's answer, checked: a CommitReport, or CommitError with the child's error."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise CommitError("the commit process ended without a result") from None
    if not isinstance(obj, dict):
        raise CommitError("the commit process sent a malformed result")
    if "error" in obj:
        raise CommitError(str(obj["error"]))
    checked: dict[str, object] = {}
    for name, (ok, convert) in _FIELDS.items():
        if name not in obj:
            raise CommitError(f"the commit process's result lacks '{name}'")
        if not ok(obj[name]):
            raise CommitError(f"the commit process's result has a malformed {name}")
        checked[name] = convert(obj[name])
    return CommitReport(**checked)  # type: ignore[arg-type]


def run_commit(job: CommitJob, now: float) -> CommitReport:
    """Plan and commit (blocking). Runs in the child; a plain function for tests too."""
    before = job.external.undecodable
    t0 = time.perf_counter()
    entries = job.external.commit_entries(now, commit_timeout=job.commit_timeout)
    table = job.table if job.table is not None else Table(job.netns, batch=job.batch)
    try:
        res, bad = table.commit_entries_blocking(entries, be_liberal=job.be_liberal)
    finally:
        table.close()
    total = time.perf_counter() - t0
    return CommitReport(created=res.created, updated=res.updated, failed=res.failed,
                        errors=dict(res.errors), seconds=total,
                        encode_seconds=res.encode_seconds, plan_seconds=total - res.seconds,
                        undecodable=job.external.undecodable - before + bad)


def _child(wfd: int, work: Callable[[], CommitReport]) -> None:
    """In the forked process: do the work, write the report (or the error) to `wfd`."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    gc.disable()  # a short-lived process: no collector passes over the parent's heap
    # ahead of the parent on a shared CPU: the parent's work (the events this commit
    # causes) can wait in its socket buffer, a failover cannot
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, COMMIT_NICE)
    try:
        data = report_to_json(work())
    except BaseException as e:  # the child reports whatever stopped it, then exits
        data = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
    while data:
        data = data[os.write(wfd, data):]


async def commit_forked(work: Callable[[], CommitReport]) -> CommitReport:
    """Run `work` in a forked child and return its checked report. CommitError when the
    child could not start (EMFILE for the pipe, fork refused), failed or reported nothing."""
    try:
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
    except OSError as e:
        raise CommitError(f"no pipe for the commit process: {e}", e.errno) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
            pid = os.fork()
    except OSError as e:
        os.close(rfd)
        os.close(wfd)
        raise CommitError(f"cannot fork the commit process: {e}", e.errno) from None
    if pid == 0:  # the child: no trio, no logging; report, then exit whatever happens
        try:
            os.close(rfd)
            _child(wfd, work)
        finally:
            os._exit(0)
    os.close(wfd)
    data = bytearray()
    try:
        async with trio.lowlevel.FdStream(rfd) as stream:
            async for chunk in stream:
                data += chunk
    finally:
        # it exits right after its report; WNOHANG never blocks the loop
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(pid, os.WNOHANG) == (0, 0):  # noqa: ASYNC110, ASYNC222
                await trio.sleep(0.005)
    return report_from_json(data)


class EchoWindow:
    """A commit's echo (#14): the flows a commit writes come back to this node, in the dump
    after it (and as events, which the event source drops by port id). They are the peers'
    flows, not news for them: while a commit and its dump run (`begin` .. `end`, nested),
    `contains(key)` says whether the commit wrote `key` (a key of the external cache), else
    `contains` is None. conntrackd likewise never propagates its own commit's changes; the
    flows are sent once they change here, or by a bulk send."""

    __slots__ = ("_open", "contains", "echoes", "external")

    def __init__(self, external: ExternalCache) -> None:
        self.external = external
        self.contains: Callable[[bytes], bool] | None = None
        self._open = 0
        #: deltas not replicated because our commit caused them
        self.echoes = 0

    def begin(self) -> None:
        self._open += 1
        if self.contains is None:
            origins = self.external.origins()
            get = self.external.get
            self.contains = lambda key: any(get(o, key) is not None for o in origins)

    def end(self) -> None:
        self._open = max(self._open - 1, 0)
        if not self._open:
            self.contains = None

    def before_external_flush(self) -> None:
        """The external cache is about to be emptied (-f right after -c, as primary-backup.sh
        does): keep knowing what the commit wrote until the window ends."""
        if self.contains is not None:
            self.contains = frozenset(k for _o, k, _v, _s in self.external.items()).__contains__
