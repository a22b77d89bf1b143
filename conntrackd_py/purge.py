"""`-t`: when the scheduled flush of the kernel's table happens, as conntrackd 1.4.7's
RESET_TIMERS (its reset_cache_alarm).

A node that was master carries its own flows in the kernel; once it is a backup they are
zombies. `-t` schedules one flush `timeout` seconds later (purge_timeout by default); asking
again while one is pending does not re-arm it (the answer is the time left); a commit (-c) or a
flush of the internal cache (-f) cancels it. This module owns only that decision, on the
caller's clock; the daemon owns the sleep (a trio cancel scope: the `handle` kept here) and the
flush itself. No trio, no clock, no I/O.
"""

from __future__ import annotations

import logging
import math
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

H = TypeVar("H")


class PurgeTimer(Generic[H]):
    """At most one pending flush: its due time and the caller's handle to cancel it."""

    def __init__(self, default: float) -> None:
        #: purge_timeout: the delay when `-t` names none
        self.default = default
        self._pending: tuple[H, float] | None = None  # (handle, due)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def request(self, now: float, timeout: int | None) -> tuple[int, bool]:
        """`-t [timeout]` at `now` -> (seconds until the flush, whether the caller must schedule
        it now: then it calls `arm` with the same delay)."""
        if self._pending is not None:
            return max(0, math.ceil(self._pending[1] - now)), False
        return (int(self.default) if timeout is None else timeout), True

    def arm(self, handle: H, now: float, delay: int) -> None:
        assert self._pending is None, "one flush pending at most: request() said so"
        self._pending = (handle, now + delay)

    def cancel(self, why: str) -> H | None:
        """A commit or -f: the pending flush's handle (for the caller to cancel), or None."""
        if self._pending is None:
            return None
        handle, self._pending = self._pending[0], None
        log.info("scheduled flush of the kernel's table (-t) cancelled by %s", why)
        return handle

    def done(self, handle: H) -> None:
        """The flush of `handle` ran (or failed): pending no more, unless another was armed
        since (that one stays)."""
        if self._pending is not None and self._pending[0] is handle:
            self._pending = None
