"""NOTRACK and ALARM receivers: best-effort, in-order-or-never delivery.

This module owns the receiver stream of the two unreliable modes. There is no ACK, no NACK
and no resend queue. A datagram that arrives ahead of a gap waits at most `reorder_delay`
(a reordered one fills the gap sooner); then the gap is given up (counted as lost) and what
waited is delivered in order. A datagram older than what was delivered is dropped as a
replay, so a late copy of an update can never overwrite a newer destroy. Lost state is
recovered by the mode's own means: optional periodic full resyncs (NOTRACK,
`periodic_resync`) or periodic refreshes plus expiry (ALARM, `alarm.py`). A full resync cut
by a gap is reported aborted by the engine, since its sweep would drop flows whose refresh
was lost.

Same interface as `ftfw.ReliableStream`, so the engine drives both alike.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .config import SyncConfig
from .seqnum import add, after, diff

T = TypeVar("T")


class BestEffortStream(Generic[T]):
    __slots__ = ("_buf", "_reorder_delay", "_reorder_max", "anchor", "expected", "give_up_at",
                 "highest", "reorder_dropped")

    def __init__(self, cfg: SyncConfig, expected: int) -> None:
        self._reorder_delay = cfg.reorder_delay
        self._reorder_max = cfg.reorder_max
        self._buf: dict[int, T] = {}
        self.expected = expected
        self.anchor = expected  # where delivery began (gaps are given up, never jumped)
        self.highest = add(expected, -1)
        self.give_up_at: float | None = None  # when the current gap is given up
        self.reorder_dropped = 0

    @property
    def complete(self) -> bool:
        return True  # gaps are given up, never waited for long

    @property
    def backlog(self) -> int:
        return len(self._buf)

    def note_latest(self, latest: int, now: float) -> None:
        if after(latest, self.highest):
            self.highest = latest

    def receive(self, seq: int, item: T, is_begin: bool, now: float) -> tuple[list[T] | None, int]:
        d = diff(seq, self.expected)
        if d < 0 or seq in self._buf:
            return None, 0
        if after(seq, self.highest):
            self.highest = seq
        if d > 0:
            if len(self._buf) >= self._reorder_max:
                self.reorder_dropped += 1
                return [], 0
            self._buf[seq] = item
            if self.give_up_at is None:
                self.give_up_at = now + self._reorder_delay
            return [], 0
        self.expected = add(seq, 1)
        return self._drain([item], now), 0

    def _drain(self, out: list[T], now: float) -> list[T]:
        buf = self._buf
        e = self.expected
        while buf and e in buf:
            out.append(buf.pop(e))
            e = add(e, 1)
        self.expected = e
        self.give_up_at = now + self._reorder_delay if buf else None
        return out

    def expire(self, now: float) -> tuple[list[T], int]:
        """Give up the gap before the oldest waiting datagram if it waited long enough.
        Returns (items now deliverable in order, number of datagrams given up)."""
        if self.give_up_at is None or now < self.give_up_at or not self._buf:
            return [], 0
        first = min(self._buf, key=lambda s: diff(s, self.expected))
        skipped = diff(first, self.expected)
        self.expected = first
        return self._drain([], now), skipped

    def control(self, now: float, max_ranges: int) -> tuple[int | None, list[tuple[int, int]]]:
        return None, []

    def deadline(self) -> float | None:
        return self.give_up_at
