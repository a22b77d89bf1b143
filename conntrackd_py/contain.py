"""What the daemon does with an exception one input caused: count it by kind, log it at most
once per kind per minute, and carry on.

This module owns the classification (descriptors or memory exhausted: a resource condition,
counted apart and logged without a traceback; anything else: an internal error, counted by
"where: ExceptionType") and the rate limit. It is pure: the caller passes its clock, and
decides to carry on (the daemon's `_supervised` restarts a task after RESTART_DELAY).
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from dataclasses import dataclass, field

from .remote import LogLimiter

log = logging.getLogger("conntrackd_py.daemon")  # the daemon's lines, as before the move

#: errnos meaning "out of descriptors or memory for one": survived, counted, retried later
FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass
class Containment:
    #: descriptors or memory exhausted somewhere (EMFILE, ENFILE, ENOBUFS, ENOMEM), survived
    fd_exhausted: int = 0
    #: other unexpected exceptions, by "where: ExceptionType"
    internal_errors: Counter[str] = field(default_factory=Counter)
    limiter: LogLimiter = field(default_factory=LogLimiter)

    def exhausted(self, err: int | None) -> bool:
        """Count an errno that means exhaustion (a commit or a socket that could not be
        opened reports it as its own refusal); True when it was one."""
        if err in FD_EXHAUSTED:
            self.fd_exhausted += 1
            return True
        return False

    def record(self, where: str, exc: BaseException, now: float) -> None:
        """Count and log (once per kind per `limiter.interval`) an exception one input caused."""
        resource = False
        if isinstance(exc, OSError) and self.exhausted(exc.errno):
            resource = True
            kind = f"{where}: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
        else:
            kind = f"{where}: {type(exc).__name__}"
            self.internal_errors[kind] += 1
        held = self.limiter.allow(kind, now)
        if held is not None:
            # out of descriptors is a resource condition, not a bug: no traceback for it
            log.error("%s (contained, the daemon carries on%s)", kind,
                      f"; {held} more since the last report" if held else "",
                      exc_info=None if resource else exc)
