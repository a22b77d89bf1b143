"""FTFW, the reliable mode: the sender's resend queue and the receiver's in-order stream.

This module owns the two halves of reliability, as pure data structures driven by the engine:

- `ResendQueue` (sender): every sequenced datagram, exactly as sent, until every live peer has
  acked it or the bound (count and bytes) pushes it out. Entries only ever leave from the
  front, so the queue always holds a contiguous run of sequence numbers `[lowest, newest]`,
  and "is seq still here" is a comparison. A NACK for something no longer here is reported
  to the engine, which answers with a full resync (never a silent loss).
- `ReliableStream` (receiver, one per sender epoch): delivers datagrams strictly in sequence
  order, buffers out-of-order ones up to a bound, finds the missing ranges, and says when an
  ACK or a NACK is due. A datagram carrying RESYNC_BEGIN lets it jump over a gap: the full
  resync that follows supersedes everything before it.

Neither reads a clock (`now` is an argument) nor knows about sockets or wire bytes.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from . import seqnum
from .config import SyncConfig
from .seqnum import add, after, diff

T = TypeVar("T")


class ResendQueue:
    __slots__ = ("_bytes", "_entries", "_lo", "_want", "evicted", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._entries: dict[int, list[object]] = {}  # seq -> [data, last sent, first sent]
        self._lo = 0
        self._bytes = 0
        self._want: dict[int, None] = {}  # seqs to retransmit, in NACK order
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def lowest(self) -> int | None:
        return self._lo if self._entries else None

    def contains(self, seq: int) -> bool:
        return seq in self._entries

    def get(self, seq: int) -> bytes | None:
        e = self._entries.get(seq)
        return None if e is None else e[0]  # type: ignore[return-value]

    def first_sent(self, seq: int) -> float | None:
        e = self._entries.get(seq)
        return None if e is None else e[2]  # type: ignore[return-value]

    def add(self, seq: int, data: bytes, now: float) -> None:
        if not self._entries:
            self._lo = seq
        self._entries[seq] = [data, now, now]
        self._bytes += len(data)
        while len(self._entries) > self.max_count or (
                self._bytes > self.max_bytes and len(self._entries) > 1):
            self._drop_front()
            self.evicted += 1

    def _drop_front(self) -> None:
        e = self._entries.pop(self._lo)
        self._bytes -= len(e[0])  # type: ignore[arg-type]
        self._want.pop(self._lo, None)
        self._lo = add(self._lo, 1)

    def release_upto(self, seq: int) -> None:
        """Every live peer has `seq` and all before it."""
        while self._entries and diff(self._lo, seq) <= 0:
            self._drop_front()

    def nack(self, first: int, count: int, now: float, holdoff: float,
             budget: float) -> tuple[float, bool]:
        """Queue `count` datagrams from `first` (all still here, the caller checked) for
        retransmission, oldest first, while `budget` bytes last: one sent costs its length,
        one skipped because it was resent within `holdoff` (several receivers NACK the same
        loss) or is already queued costs a sixteenth. Returns (bytes of budget used, True if
        the budget ran out first)."""
        entries, want = self._entries, self._want
        used = 0.0
        for i in range(count):
            s = add(first, i)
            e = entries.get(s)
            if e is None:
                continue
            n = len(e[0])  # type: ignore[arg-type]
            skip = s in want or now - e[1] < holdoff  # type: ignore[operator]
            cost = (n >> 4) + 1 if skip else n
            if used + cost > budget:
                return used, True
            used += cost
            if not skip:
                want[s] = None
        return used, False

    @property
    def wants(self) -> bool:
        return bool(self._want)

    def take(self, limit: int, now: float) -> list[bytes]:
        """Up to `limit` datagrams to retransmit now, oldest NACK first."""
        out: list[bytes] = []
        want = self._want
        while want and len(out) < limit:
            s = next(iter(want))
            del want[s]
            e = self._entries.get(s)
            if e is not None:
                e[1] = now
                out.append(e[0])  # type: ignore[arg-type]
        return out


class ReliableStream(Generic[T]):
    """One sender's stream as a receiver sees it. Items are whatever the engine delivers
    (decoded datagrams); `receive` returns them in order."""

    __slots__ = ("_ack_every", "_ack_interval", "_buf", "_nack_interval", "_reorder_delay",
                 "_reorder_max",
                 "ack_due", "anchor", "expected", "highest", "nack_due", "nack_from", "nacked_upto",
                 "reorder_dropped", "unacked")

    def __init__(self, cfg: SyncConfig, expected: int) -> None:
        self._ack_every = cfg.ack_every
        self._ack_interval = cfg.ack_interval
        self._nack_interval = cfg.nack_interval
        self._reorder_max = cfg.reorder_max
        self._reorder_delay = cfg.reorder_delay
        self._buf: dict[int, T] = {}
        self.expected = expected  # next seq to deliver
        self.anchor = expected  # where delivery began or last jumped (a RESYNC_BEGIN)
        self.highest = add(expected, -1)  # newest seq known to exist
        self.unacked = 0
        self.ack_due: float | None = None
        self.nack_due: float | None = None
        self.nack_from: int | None = None  # None: NACK every gap; else only from this seq
        self.nacked_upto: int | None = None
        self.reorder_dropped = 0

    @property
    def complete(self) -> bool:
        """Nothing known to be missing."""
        return diff(self.highest, self.expected) < 0

    @property
    def backlog(self) -> int:
        return max(0, diff(self.highest, self.expected) + 1)

    def _noticed(self, now: float) -> None:
        """`highest` moved: NACK what is newly missing once it has stayed missing for
        `reorder_delay` (a reordered datagram fills its gap before that). Older gaps keep
        their retry time, so a burst of losses does not re-request the same ranges."""
        if self.complete:
            return
        if self.nacked_upto is not None and not after(self.highest, self.nacked_upto):
            return
        due = now + self._reorder_delay
        if self.nack_due is None:
            self.nack_from = None  # no NACK outstanding: ask for every gap
        elif self.nack_due > due and self.nacked_upto is not None:
            self.nack_from = add(self.nacked_upto, 1)
        else:
            return
        self.nack_due = due

    def note_latest(self, latest: int, now: float) -> None:
        """A header told us the sender has sent up to `latest`."""
        if after(latest, self.highest):
            self.highest = latest
            self._noticed(now)

    def _duplicate(self, now: float) -> None:
        # the sender resends what we have: our ACK may be lost, send one soon
        if self.ack_due is None:
            self.ack_due = now + self._ack_interval

    def receive(self, seq: int, item: T, is_begin: bool, now: float) -> tuple[list[T] | None, int]:
        """Offer datagram `seq`. Returns (items now deliverable in order, or None for a
        duplicate; number of missing datagrams skipped by a resync jump)."""
        d = diff(seq, self.expected)
        buf = self._buf
        skipped = 0
        if d < 0 or seq in buf:
            self._duplicate(now)
            return None, 0
        if d > 0:
            if not is_begin:
                if after(seq, self.highest):
                    self.highest = seq
                if len(buf) >= self._reorder_max:
                    self.reorder_dropped += 1
                else:
                    buf[seq] = item
                self._noticed(now)
                return [], 0
            # a full resync starts here: what is missing before it is superseded
            older = [s for s in buf if diff(s, seq) < 0]
            for s in older:
                del buf[s]
            skipped = d - len(older)
            self.anchor = seq
        out = [item]
        e = add(seq, 1)
        while buf and e in buf:
            out.append(buf.pop(e))
            e = add(e, 1)
        self.expected = e
        if diff(self.highest, e) < 0:
            self.highest = add(e, -1)
        self.unacked += len(out)
        if self.unacked >= self._ack_every:
            self.ack_due = now
        elif self.ack_due is None:
            self.ack_due = now + self._ack_interval
        if self.complete:
            self.nack_due = None
            self.nack_from = None
        return out, skipped

    def expire(self, now: float) -> tuple[list[T], int]:
        """Nothing is ever given up here: gaps are NACKed until filled or jumped over."""
        return [], 0

    def control(self, now: float, max_ranges: int) -> tuple[int | None, list[tuple[int, int]]]:
        """(seq to ACK or None, ranges to NACK) due at `now`."""
        ack = None
        if self.ack_due is not None and now >= self.ack_due:
            ack = add(self.expected, -1)
            self.ack_due = None
            self.unacked = 0
        ranges: list[tuple[int, int]] = []
        if self.nack_due is not None and now >= self.nack_due:
            if not self.complete:
                first = self.expected
                if self.nack_from is not None and after(self.nack_from, first):
                    first = self.nack_from
                ranges = seqnum.missing_ranges(first, self.highest, self._buf, max_ranges)
                self.nacked_upto = self.highest
                self.nack_due = now + self._nack_interval
            else:
                self.nack_due = None
            self.nack_from = None
        return ack, ranges

    def deadline(self) -> float | None:
        a, n = self.ack_due, self.nack_due
        if a is None:
            return n
        return a if n is None or a < n else n
