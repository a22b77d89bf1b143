"""ALARM mode: periodic refresh of every flow (sender) and expiry of unrefreshed ones (receiver).

This module owns the two timers of ALARM mode as pure structures:

- `RefreshPacer` (sender): once per `alarm_refresh` period it takes a snapshot of the internal
  cache and hands out an allowance of flows to re-send, growing linearly over the period, so
  the refresh of 100k flows is spread over the period instead of sent in one burst. A flow
  changed locally meanwhile is `discard`ed: its live message already carries fresher state.
- `ExpiryTracker` (receiver): per origin, when each flow was last refreshed, oldest first;
  `expire` returns the keys not refreshed for `cache_timeout`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from .outbox import Snapshot
from .wire import FlowMessage

TICKS = 32  # allowance steps per refresh period


class RefreshPacer:
    __slots__ = ("box", "emitted", "next_period", "period", "start", "total")

    def __init__(self, period: float, now: float) -> None:
        self.period = period
        self.box = Snapshot()
        self.start = now
        self.total = 0
        self.emitted = 0
        self.next_period = now + period  # the stream starts with a full resync anyway

    def begin(self, items: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]],
              now: float) -> None:
        self.box = Snapshot(items)
        self.total = len(self.box)
        self.emitted = 0
        self.start = now
        self.next_period = now + self.period

    def discard(self, key: bytes) -> None:
        self.box.discard(key)

    def allowance(self, now: float) -> int:
        if not self.box:
            return 0
        step = min(TICKS, math.floor((now - self.start) / self.period * TICKS) + 1)
        return max(0, math.ceil(self.total * step / TICKS) - self.emitted)

    def deadline(self, now: float) -> float:
        """When the allowance next grows (or the next period starts); `now` if it is due."""
        if not self.box:
            return self.next_period
        if self.allowance(now) > 0:
            return now
        k = math.floor((now - self.start) / self.period * TICKS) + 1
        t = self.start + self.period * k / TICKS
        return min(self.next_period, t if t > now else now + self.period / TICKS)


class ExpiryTracker:
    __slots__ = ("_seen", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._seen: dict[int, OrderedDict[bytes, float]] = {}

    def refresh(self, origin: int, flows: Iterable[FlowMessage], now: float) -> None:
        d = self._seen.get(origin)
        if d is None:
            d = self._seen[origin] = OrderedDict()
        for k, v in flows:
            if v is None:
                d.pop(k, None)
            else:
                d[k] = now
                d.move_to_end(k)

    def forget(self, origin: int, key: bytes) -> None:
        d = self._seen.get(origin)
        if d is not None:
            d.pop(key, None)

    def expire(self, now: float) -> list[tuple[int, list[bytes]]]:
        out = []
        timeout = self.timeout
        for origin, d in self._seen.items():
            old = []
            for k, t in d.items():
                if t + timeout > now:  # the same sum as deadline(): no float mismatch
                    break
                old.append(k)
            for k in old:
                del d[k]
            if old:
                out.append((origin, old))
        return out

    def deadline(self) -> float | None:
        best = None
        for d in self._seen.values():
            if d:
                t = next(iter(d.values())) + self.timeout
                if best is None or t < best:
                    best = t
        return best
