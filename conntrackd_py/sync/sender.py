"""The sending half of the engine: our stream of sequenced datagrams.

This module owns what we put on the wire and in which order: the coalescing queue of live
changes, full resyncs (snapshot, RESYNC_BEGIN ... RESYNC_END, emitted lazily and paced by the
resend window), the ALARM refresh allowance, ALIVEs, sequence numbers and the FIRST_LAP flag,
and in FTFW the resend queue with the NACK and RESYNC_REQUEST rules that decide between a
retransmission and a full resync. It owns its timers (`get_timer`/`handle_timer`: ALIVE, the
ALARM refresh, periodic resyncs, a full resync held back by `resync_min_interval`) and the
cost limits of what peers ask of it: full resyncs from a token bucket (RESYNC_BURST at once,
then one per `resync_min_interval`; requests coalesce), and retransmissions within the byte
budget the engine passes per NACK.
It knows peers only through the ACK positions the engine passes in (`acks`: our seq each live
peer has acked). Framing is the builder's (`builder.py`). No clock, no socket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from . import wire
from .alarm import RefreshPacer
from .builder import DatagramBuilder
from .config import Counters, Mode, SyncConfig
from .ftfw import ResendQueue
from .outbox import Outbox, Snapshot
from .seqnum import HALF, add, after, diff
from .wire import Message, ResyncRequest

#: full resyncs peers may have at once before `resync_min_interval` spaces them: a restarted
#: peer's request and keepalived's `-n` right after it are both served at once
RESYNC_BURST = 3

#: the internal flows: a mapping (fastest to snapshot) or (key, value) pairs
Source = Callable[[], Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]]

_BEGIN, _END, _ALIVE = (wire.MARKER_BYTES[k] for k in wire.MARKERS)


class Sender:
    def __init__(self, cfg: SyncConfig, epoch: int, source: Source, counters: Counters,
                 now: float) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.epoch = epoch
        self.keys = wire.KeyRing(cfg.keys)
        self.source = source
        self.c = counters
        self.builder = DatagramBuilder(cfg.node_id, epoch, cfg.mtu, self.keys)
        self.body_limit = self.builder.body_limit
        self.resend = ResendQueue(cfg.resend_queue_max, cfg.resend_queue_bytes) \
            if cfg.mode is Mode.FTFW else None
        self.pacer = RefreshPacer(cfg.alarm_refresh, now) if cfg.mode is Mode.ALARM else None
        self.live = Outbox()
        self.seq = 0  # newest sequenced datagram sent; the stream starts at 1
        self.first_lap = True
        self.resync_box: Snapshot | None = None
        self.resync_pending = True  # every epoch's stream begins with a full resync
        self.resync_begin: int | None = None  # seq of the newest RESYNC_BEGIN sent
        self.resync_not_before = now  # when the next full resync may start
        #: full resyncs peers may still have at once (a token bucket: RESYNC_BURST at most,
        #: one more per resync_min_interval)
        self._resync_tokens = float(RESYNC_BURST)
        self._tokens_at = now
        self.last_stream = now
        self.periodic_due = None if cfg.periodic_resync is None else now + cfg.periodic_resync

    # --- local changes -------------------------------------------------------------------
    def put(self, key: bytes, value: bytes | None) -> None:
        need = len(key) + (len(value) if value is not None else 0) + wire.FLOW_OVERHEAD
        if need > self.body_limit:
            raise ValueError(f"a flow message of {need} bytes does not fit the MTU")
        if not wire.is_packed_array(key) or (value is not None
                                             and not wire.is_packed_array(value)):
            raise ValueError("flow key and value must be packed msgpack arrays")
        self.live.put(key, value)
        # the live message carries fresher state than a snapshot taken earlier
        if self.resync_box is not None:
            self.resync_box.discard(key)
        if self.pacer is not None:
            self.pacer.discard(key)

    # --- ACK positions -------------------------------------------------------------------
    def max_lag(self, acks: Iterable[int], now: float | None = None) -> int | None:
        """How far behind our newest seq the slowest of `acks` is (None: no ack at all).

        With `now` (the resync window's view), two kinds of peers are looked at differently.
        One that already misses datagrams gone from the resend queue waits for a full resync
        and will jump to its RESYNC_BEGIN: it counts as having acked everything before that
        BEGIN if it is still queued, else not at all (the resync it needs must be able to
        start). One whose ACK has not moved past a datagram sent `peer_timeout` ago does not
        hear us (a one-way failure): it does not count, or it would stall resyncs for all."""
        worst = None
        floor = begin = None
        resend = self.resend
        if now is not None and resend is not None:
            lo = resend.lowest
            floor = None if lo is None else add(lo, -1)
            b = self.resync_begin
            if b is not None and resend.contains(b):
                begin = add(b, -1)
        for acked in acks:
            if floor is not None and resend is not None and now is not None:
                if diff(acked, floor) < 0:
                    if begin is None:
                        continue
                    acked = begin
                sent = resend.first_sent(add(acked, 1))
                if sent is not None and now - sent > self.cfg.peer_timeout:
                    continue
            lag = diff(self.seq, acked)
            if worst is None or lag > worst:
                worst = lag
        return worst

    def release(self, acks: Iterable[int]) -> None:
        """Drop from the resend queue what every live peer has acked."""
        if self.resend is not None:
            lag = self.max_lag(acks)
            if lag is not None:
                self.resend.release_upto(add(self.seq, -lag))

    def window_open(self, acks: Iterable[int], now: float) -> bool:
        """Full resyncs and refreshes pause while a live peer lags too far (FTFW)."""
        if self.resend is None:
            return True
        lag = self.max_lag(acks, now)
        return lag is None or lag < self.cfg.resync_window

    # --- NACKs and resync requests -----------------------------------------------------
    def on_nack(self, ranges: Iterable[tuple[int, int]], acked: int | None, now: float,
                budget: float) -> float:
        """Retransmit what is still queued, within `budget` bytes; what is gone is replaced by
        a full resync. Ranges are clamped to what the peer has not acked and we did send,
        sorted and merged: the work is one step per range plus one per datagram queued (or
        skipped as just resent), never the width asked. Returns the budget used; what did not
        fit is counted in `resends_limited` and served when the peer asks again."""
        resend = self.resend
        if resend is None:
            return 0.0
        seq = self.seq
        floor = -HALF if acked is None else diff(add(acked, 1), seq)  # offsets from our seq
        spans: list[tuple[int, int]] = []
        for a, b in ranges:
            width = diff(b, a)
            if width < 0:
                continue
            lo = diff(a, seq)
            hi = min(lo + width, 0)
            lo = max(lo, floor)
            if lo <= hi:
                spans.append((lo, hi))
        if not spans:
            return 0.0
        spans.sort()
        merged = [spans[0]]
        for lo, hi in spans[1:]:
            plo, phi = merged[-1]
            if lo <= phi + 1:
                if hi > phi:
                    merged[-1] = (plo, hi)
            else:
                merged.append((lo, hi))
        first = resend.lowest
        q_lo = 1 if first is None else diff(first, seq)  # offset of the oldest still queued
        gone: int | None = None
        used = 0.0
        limited = False
        for lo, hi in merged:
            if lo < q_lo:
                gone = min(hi, q_lo - 1)
                lo = q_lo
            if lo > hi or limited:
                continue
            spent, limited = resend.nack(add(seq, lo), hi - lo + 1, now,
                                         self.cfg.retransmit_holdoff, budget - used)
            used += spent
        if limited:
            self.c.resends_limited += 1
        if gone is not None and not self.resync_covers(add(seq, gone)):
            self.want_resync(now)
        return used

    def want_resync(self, now: float, limited: bool = True) -> None:
        """A full resync is wanted: it starts when `resync_min_interval` since the last one
        has passed (and the resend window is open); requests meanwhile coalesce into it.
        `limited=False` (the local operator's bulk send, not a peer's request): start now."""
        if self.resync_pending:
            self.c.resync_requests_coalesced += 1
        self.resync_pending = True
        if not limited:
            self.resync_not_before = now

    def resync_covers(self, seq: int) -> bool:
        """Will a receiver missing `seq` (and everything before) get a complete resync anyway?
        Yes if one is pending, or if a RESYNC_BEGIN after `seq` is still in the resend queue
        (it will receive or NACK it, and jump there)."""
        if self.resync_pending:
            return True
        b = self.resync_begin
        return (b is not None and self.resend is not None and self.resend.contains(b)
                and after(b, seq))

    def on_resync_request(self, m: ResyncRequest, now: float) -> None:
        if m.epoch == 0:
            # the requester has not heard this epoch yet: if our whole stream since seq 1 is
            # still queued, it will NACK it from 1 and get our initial full resync that way
            if self.resend is not None and self.first_lap and self.resend.lowest == 1:
                return
        elif m.epoch == self.epoch and m.from_seq != 0 and self.resync_covers(
                add(m.from_seq, -1)):
            return  # (from_seq 0: the requester lost our stream's continuity, wants a new one)
        self.want_resync(now)

    # --- timers ------------------------------------------------------------------------
    def resync_startable(self, now: float) -> bool:
        return self.resync_pending and now >= self.resync_not_before

    def get_timer(self, now: float, window_open: bool) -> float:
        """When `handle_timer`/`stream_datagram` next have something to do (the ALIVE at the
        latest); `now` when something is waiting."""
        if self.more_to_send(window_open, now):
            return now
        t = self.last_stream + self.cfg.alive_interval
        if self.resync_pending and window_open and self.resync_not_before < t:
            t = self.resync_not_before
        if self.periodic_due is not None and self.periodic_due < t:
            t = self.periodic_due
        if self.pacer is not None and window_open:
            t = min(t, self.pacer.deadline(now))
        return t

    def handle_timer(self, now: float) -> None:
        if self.periodic_due is not None and now >= self.periodic_due:
            self.want_resync(now)
            self.periodic_due = now + (self.cfg.periodic_resync or 0.0)
        pacer = self.pacer
        if pacer is not None and now >= pacer.next_period:
            pacer.begin(self.source(), now)

    def sent(self, seq: int, data: bytes) -> bool:
        """Is `data` our stream datagram `seq`, still queued (our own, looped back)?"""
        return self.resend is not None and self.resend.get(seq) == data

    # --- what the engine reports -------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.resend) if self.resend is not None else 0

    @property
    def queue_bytes(self) -> int:
        return self.resend.nbytes if self.resend is not None else 0

    @property
    def evicted(self) -> int:
        return self.resend.evicted if self.resend is not None else 0

    @property
    def resync_active(self) -> bool:
        return self.resync_box is not None

    @property
    def resync_remaining(self) -> int:
        return len(self.resync_box or ())

    # --- building datagrams ------------------------------------------------------------
    def more_to_send(self, window_open: bool, now: float) -> bool:
        if self.live or (self.resend is not None and self.resend.wants):
            return True
        return (self.resync_startable(now) or self.resync_box is not None) and window_open

    def retransmissions(self, limit: int, now: float) -> list[bytes]:
        if self.resend is None or not self.resend.wants:
            return []
        out = self.resend.take(limit, now)
        self.c.retransmitted += len(out)
        self.c.bytes_retransmitted += sum(map(len, out))
        return out

    def control_datagrams(self, msgs: list[Message]) -> list[bytes]:
        """Unsequenced datagrams for control messages; their header seq is our newest. NACKs
        are padded so the peer's byte budget covers what they ask (`resend_ratio`)."""
        return self.builder.control(msgs, self.seq, self.first_lap, self.cfg.resend_ratio)

    def _start_resync(self, now: float) -> None:
        """Snapshot the internal cache for a full resync. Waiting live updates are in the
        snapshot already (`source()` includes every change reported), so they are dropped;
        waiting destroys stay and leave right after RESYNC_BEGIN."""
        # the epoch's initial resync is ours, not asked: it does not hold back the first
        # one a peer asks for (a node that missed the start catches up at once)
        if self.seq != 0:
            # RESYNC_BURST at once (a restart's request, then keepalived's -n), then one per
            # interval, whatever a peer (or a replayer) asks; a request never waits longer
            # than one interval
            interval = self.cfg.resync_min_interval
            tokens = self._resync_tokens
            if interval > 0:
                tokens = min(float(RESYNC_BURST), tokens + (now - self._tokens_at) / interval)
            self._resync_tokens = tokens = tokens - 1.0
            self._tokens_at = now
            self.resync_not_before = now if tokens >= 1.0 else now + (1.0 - tokens) * interval
        self.resync_pending = False
        self.resync_box = Snapshot(self.source())
        if self.live:
            self.live = Outbox((k, v) for k, v in self.live.items() if v is None)
        self.c.resyncs_sent += 1

    def stream_datagram(self, now: float, window_open: bool) -> bytes | None:
        """The next sequenced datagram: RESYNC_BEGIN if a resync starts, live changes, then
        the resync in progress (or the ALARM refresh allowance), else an ALIVE when one is
        due; None if there is nothing to send. The builder keeps the space."""
        body = self.builder.body()
        begin = False
        if self.resync_box is None and window_open and self.resync_startable(now):
            self._start_resync(now)
            begin = body.marker(_BEGIN)
        full = body.changes(self.live)
        if not full and window_open:
            box = self.resync_box
            if box is not None:
                body.batch(box)
                if not box and body.marker(_END):
                    self.resync_box = None
            elif self.pacer is not None:
                allowance = self.pacer.allowance(now)
                if allowance > 0:
                    self.pacer.emitted += body.batch(self.pacer.box, allowance)[0]
        self.c.oversize += body.oversize
        if body.count == 0:
            if now < self.last_stream + self.cfg.alive_interval:
                return None
            body.marker(_ALIVE)
        self.c.flows_sent += body.flows
        seq = add(self.seq, 1)
        if seq == 0:
            self.first_lap = False  # wrapped: receivers can no longer assume a start at 1
        self.seq = seq
        data = self.builder.stream(body, seq, self.first_lap)
        if begin:
            self.resync_begin = seq
        if self.resend is not None:
            self.resend.add(seq, data, now)
        self.last_stream = now
        return data
