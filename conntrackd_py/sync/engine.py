"""The replication engine: a sans-I/O state machine in the shape of aioquic's QuicConnection.

This module owns the protocol's receiving decisions and the facade: peers and their epochs,
first contact, replay rules, in-order delivery into events, ACK/NACK/RESYNC_REQUEST
scheduling, liveness, timers and `in_sync()`. `sender.py` owns our own stream (coalescing,
full resyncs, resend queue); `wire.py` the bytes; `ftfw.py`/`notrack.py`/`alarm.py` the
per-mode structures. It reads no clock (every method takes `now`, float seconds of a
monotonic clock), opens no socket and imports no trio.

    engine = Engine(config, epoch, source=cache.mapping, now=now)
    engine.local_update(key, value, now)          # my flow changed (packed key/value bytes)
    engine.local_destroy(key, now)
    engine.receive_datagram(data, now)            # bytes from the sync link
    engine.handle_timer(now)                      # when now >= engine.get_timer()
    for d in engine.datagrams_to_send(now): send(d)   # multicast: every datagram to all peers
    for ev in engine.events(): apply(ev)          # see events.py
    engine.request_resync(node_or_None, now); engine.bulk_send(now); engine.in_sync()

Pump after every input: call `datagrams_to_send` and drain `events` after each of
`receive_datagram` (a burst of them is fine), `local_update`/`local_destroy` (a burst),
`handle_timer`, `request_resync` and `bulk_send`. `datagrams_to_send` returns at most
`config.burst` stream datagrams per call; when more are waiting `get_timer()` returns the
last `now` seen, so the shell calls again after yielding to its other tasks. Every datagram
goes to every peer (ACK/NACK/RESYNC_REQUEST name their target inside, and others ignore them).

`source()` must return the current internal cache as a mapping (fastest) or (key, value)
pairs, already including
every change reported through `local_update`/`local_destroy` (update the cache first, then
tell the engine). It is read into a snapshot once at the start of each full resync (and ALARM
period), so the cache may change freely afterwards.

`epoch` must increase across restarts of a node (`sync.new_epoch`); `counters`, `rejected`
and `stats()` are for metrics; `in_sync()` is what keepalived's track script asks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import replace

from . import wire
from .alarm import ExpiryTracker
from .config import Counters, Mode, SyncConfig, config_from
from .events import (
    Event,
    PeerDown,
    PeerRestarted,
    PeerUp,
    RemoteFlows,
    ResyncAborted,
    ResyncDone,
    ResyncStarted,
)
from .ftfw import ReliableStream
from .notrack import BestEffortStream
from .sender import Sender, Source
from .stats import PeerStats, ResyncStats, SyncStats
from .seqnum import add, after, diff
from .wire import Ack, Datagram, FlowMessage, Kind, Message, Nack, ResyncRequest

Stream = ReliableStream[Datagram] | BestEffortStream[Datagram]

_BEGIN_BIT = 1 << Kind.RESYNC_BEGIN

__all__ = ["Engine", "Event", "PeerDown", "PeerRestarted", "PeerUp", "RemoteFlows",
           "ResyncAborted", "ResyncDone", "ResyncStarted", "SyncConfig", "config_from"]


class _Peer:
    """What we know of one other node (and of its current epoch's stream)."""

    __slots__ = ("acked", "epoch", "in_bracket", "last_seen", "need_bracket", "node",
                 "request_due", "stream", "up")

    def __init__(self, node: int, epoch: int, stream: Stream, now: float) -> None:
        self.node = node
        self.epoch = epoch
        self.stream = stream
        self.last_seen = now
        self.up = True
        self.acked: int | None = None  # our seq it has acked (our current epoch)
        self.need_bracket = True  # we want a complete full resync of its flows
        self.in_bracket = False  # between its RESYNC_BEGIN and RESYNC_END, in order
        self.request_due: float | None = None  # when to (re)send it a RESYNC_REQUEST


class Engine:
    def __init__(self, config: SyncConfig, epoch: int, source: Source, now: float) -> None:
        if not 1 <= epoch <= 0xFFFFFFFF:
            raise ValueError("epoch must be 1..2**32-1 (see PROTOCOL.md: it must increase "
                             "across restarts)")
        self.config = cfg = config
        self.node_id = cfg.node_id
        self.epoch = epoch
        self.counters = Counters()
        self.rejected: dict[str, int] = {}  # BadDatagram reasons
        self._ftfw = cfg.mode is Mode.FTFW
        self._tx = Sender(cfg, epoch, source, self.counters, now)
        self._keys = self._tx.keys
        # a NACK must fit one datagram: a range costs at most 10 bytes, the rest 20
        self._max_ranges = min(wire.MAX_NACK_RANGES, (self._tx.body_limit - 20) // 10)
        self._expiry = ExpiryTracker(cfg.cache_timeout) if cfg.mode is Mode.ALARM else None
        self._peers: dict[int, _Peer] = {}
        self._events: deque[Event] = deque()
        self._control: list[Message] = []
        self._dropped_before = 0  # reorder drops of streams replaced by a peer restart
        self._start = self._now = now
        self._periodic_due = None if cfg.periodic_resync is None else now + cfg.periodic_resync
        if cfg.startup_resync:
            self._control.append(ResyncRequest(wire.ALL_NODES, 0, 0))
            self.counters.resync_requests_sent += 1

    # --- local changes -------------------------------------------------------------------
    def local_update(self, key: bytes, value: bytes, now: float) -> None:
        """Our flow `key` now has state `value` (packed forms from flow.py). Raises
        ValueError for bytes that are not packed arrays or do not fit the MTU."""
        self._tx.put(key, value)

    def local_destroy(self, key: bytes, now: float) -> None:
        """Our flow `key` is gone."""
        self._tx.put(key, None)

    # --- requests --------------------------------------------------------------------------
    def request_resync(self, node: int | None, now: float) -> None:
        """Ask `node` (None: every live peer) to send us all its flows, bracketed; repeated
        every `resync_retry` until a complete full resync of it has arrived."""
        self._now = now
        if node is None:
            targets = [p for p in self._peers.values() if p.up]
        else:
            peer = self._peers.get(node)
            targets = [peer] if peer is not None else []
        if not targets:  # nobody heard yet: ask blindly
            self._control.append(ResyncRequest(node or wire.ALL_NODES, 0, 0))
            self.counters.resync_requests_sent += 1
        for p in targets:
            p.need_bracket = True
            p.request_due = now

    def bulk_send(self, now: float) -> None:
        """Send our whole internal cache to every peer, bracketed as a full resync."""
        self._now = now
        self._tx.resync_pending = True

    # --- receiving ---------------------------------------------------------------------------
    def receive_datagram(self, data: bytes, now: float) -> None:
        self._now = now
        c = self.counters
        c.datagrams_received += 1
        c.bytes_received += len(data)
        try:
            dg = wire.decode_untrusted(data, self._keys)
        except wire.BadDatagram as e:
            if e.reason.is_auth:
                c.bad_mac += 1
            else:
                c.malformed += 1
            self.rejected[e.reason.value] = self.rejected.get(e.reason.value, 0) + 1
            return
        node = dg.node
        if node == self.node_id:
            c.own += 1
            return
        allowed = self.config.allowed_peers
        if allowed is not None and node not in allowed:
            c.unknown_node += 1
            return
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = _Peer(node, dg.epoch, self._open_stream(dg, now), now)
            self._first_contact(peer, dg, now)
            self._events.append(PeerUp(node, dg.epoch))
        elif dg.epoch != peer.epoch:
            # an older epoch is a replay, unless the peer went silent: then it is a restart
            # with an epoch that did not increase (accepted so a clock step cannot lock it out)
            if not after(dg.epoch, peer.epoch) and peer.up:
                c.stale_epoch += 1
                return
            self._restart(peer, dg, now)
        c.unknown_kind += dg.unknown
        if dg.sequenced:
            stream = peer.stream
            ready, skipped = stream.receive(dg.seq, dg, bool(dg.markers & _BEGIN_BIT), now)
            if ready is None:
                c.replayed += 1
                return
            self._alive(peer, now)
            if skipped:
                c.lost += skipped
                self._abort_bracket(peer)
            for item in ready:
                self._deliver(peer, item, now)
        else:
            if diff(dg.seq, peer.stream.highest) < -self.config.control_replay_window:
                c.replayed += 1
                return
            self._alive(peer, now)
            peer.stream.note_latest(dg.seq, now)
            for m in dg.messages:
                self._on_control(peer, m, now)

    def _open_stream(self, dg: Datagram, now: float) -> Stream:
        # a stream still on its first lap began at 1: we will ask for what we missed of it
        start = 1 if dg.first_lap else dg.seq if dg.sequenced else add(dg.seq, 1)
        if self._ftfw:
            return ReliableStream(self.config, start)
        return BestEffortStream(self.config, start)

    def _first_contact(self, peer: _Peer, dg: Datagram, now: float) -> None:
        """A new (node, epoch): make sure we get all its flows, bracketed. In FTFW a stream
        that began at seq 1 begins with a full resync, and NACKs fetch what we missed of it
        (a sender that no longer has it answers with a new full resync). Otherwise ask."""
        peer.need_bracket = True
        peer.in_bracket = False
        peer.acked = None
        from_start = dg.first_lap and (self._ftfw or (dg.sequenced and dg.seq == 1))
        peer.request_due = None if from_start else now

    def _restart(self, peer: _Peer, dg: Datagram, now: float) -> None:
        self._abort_bracket(peer)
        self._dropped_before += peer.stream.reorder_dropped
        peer.epoch = dg.epoch
        peer.stream = self._open_stream(dg, now)
        self._first_contact(peer, dg, now)
        peer.up = True
        peer.last_seen = now
        self.counters.peer_restarts += 1
        self._events.append(PeerRestarted(peer.node, dg.epoch))
        self._release()

    def _alive(self, peer: _Peer, now: float) -> None:
        peer.last_seen = now
        if not peer.up:
            peer.up = True
            self._events.append(PeerUp(peer.node, peer.epoch))

    def _abort_bracket(self, peer: _Peer) -> None:
        if peer.in_bracket:
            peer.in_bracket = False
            self.counters.resyncs_aborted += 1
            self._events.append(ResyncAborted(peer.node))
            if not self._ftfw:
                peer.request_due = self._now  # best effort: ask for another one

    def _deliver(self, peer: _Peer, dg: Datagram, now: float) -> None:
        msgs = dg.messages
        if dg.n_flows == len(msgs):  # the common case: flows only, handed over as they are
            if msgs:
                self._flows(peer.node, msgs, now)  # type: ignore[arg-type]
            return
        batch: list[FlowMessage] = []
        for m in msgs:
            if type(m) is tuple:
                batch.append(m)
                continue
            if batch:
                self._flows(peer.node, batch, now)
                batch = []
            if m is Kind.RESYNC_BEGIN:
                if peer.in_bracket:
                    self.counters.resyncs_aborted += 1  # a newer one restarts the marking
                peer.in_bracket = True
                self._events.append(ResyncStarted(peer.node))
            elif m is Kind.RESYNC_END and peer.in_bracket:
                peer.in_bracket = False
                peer.need_bracket = False
                peer.request_due = None
                self.counters.resyncs_received += 1
                self._events.append(ResyncDone(peer.node))
        if batch:
            self._flows(peer.node, batch, now)

    def _flows(self, origin: int, flows: list[FlowMessage], now: float) -> None:
        self.counters.flows_received += len(flows)
        self._events.append(RemoteFlows(origin, flows))
        if self._expiry is not None:
            self._expiry.refresh(origin, flows, now)

    def _on_control(self, peer: _Peer, m: Message, now: float) -> None:
        c = self.counters
        if isinstance(m, ResyncRequest):
            if m.target in (wire.ALL_NODES, self.node_id):
                c.resync_requests_received += 1
                self._tx.on_resync_request(m)
            return
        if not isinstance(m, Ack | Nack) or m.target != self.node_id or m.epoch != self.epoch:
            return  # addressed to another node or to an earlier epoch of ours
        if isinstance(m, Ack):
            c.acks_received += 1
            if after(m.seq, self._tx.seq):
                return  # acks what we never sent
            if peer.acked is None or after(m.seq, peer.acked):
                peer.acked = m.seq
                self._release()
            return
        c.nacks_received += 1
        self._tx.on_nack(m.ranges, peer.acked, now)

    def _acks(self) -> Iterator[int]:
        """Our seq each live peer has acked (for the resend queue and the resync window)."""
        return (p.acked for p in self._peers.values() if p.up and p.acked is not None)

    def _release(self) -> None:
        self._tx.release(self._acks())

    # --- sending -----------------------------------------------------------------------------
    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Control datagrams (ACK, NACK, RESYNC_REQUEST), retransmissions, then at most
        `burst` new stream datagrams in all. Send each to every peer."""
        self._now = now
        tx = self._tx
        out = tx.control_datagrams(self._control_messages(now))
        budget = self.config.burst
        again = tx.retransmissions(budget, now)
        out += again
        budget -= len(again)
        while budget > 0:
            d = tx.stream_datagram(now, tx.window_open(self._acks(), now))
            if d is None:
                break
            out.append(d)
            budget -= 1
        c = self.counters
        c.datagrams_sent += len(out)
        c.bytes_sent += sum(map(len, out))
        if tx.resend is not None:
            c.resend_queue_depth = len(tx.resend)
            c.evicted = tx.resend.evicted
        return out

    def _control_messages(self, now: float) -> list[Message]:
        msgs, self._control = self._control, []
        c = self.counters
        retry = self.config.resync_retry
        for p in self._peers.values():
            if not p.up:
                continue  # its timers wait until it is heard again
            ack, ranges = p.stream.control(now, self._max_ranges)
            if ack is not None:
                msgs.append(Ack(p.node, p.epoch, ack))
                c.acks_sent += 1
            if ranges:
                msgs.append(Nack(p.node, p.epoch, tuple(ranges)))
                c.nacks_sent += 1
            if p.request_due is not None and now >= p.request_due:
                if p.in_bracket:  # one is arriving: its end will do
                    p.request_due = now + retry
                elif p.need_bracket:
                    msgs.append(ResyncRequest(p.node, p.epoch, p.stream.expected))
                    c.resync_requests_sent += 1
                    p.request_due = now + retry
                else:
                    p.request_due = None
        return msgs

    # --- timers ------------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """When `handle_timer` (then `datagrams_to_send`) should run next."""
        now = self._now
        tx = self._tx
        window = tx.window_open(self._acks(), now)
        if self._control or tx.more_to_send(window):
            return now
        t = tx.last_stream + self.config.alive_interval
        for p in self._peers.values():
            if not p.up:
                continue
            d = p.stream.deadline()
            if d is not None and d < t:
                t = d
            if p.last_seen + self.config.peer_timeout < t:
                t = p.last_seen + self.config.peer_timeout
            if p.request_due is not None and p.request_due < t:
                t = p.request_due
        if self._periodic_due is not None and self._periodic_due < t:
            t = self._periodic_due
        if tx.pacer is not None and window:
            t = min(t, tx.pacer.deadline(now))
        if self._expiry is not None:
            d = self._expiry.deadline()
            if d is not None and d < t:
                t = d
        return t

    def handle_timer(self, now: float) -> None:
        self._now = now
        cfg = self.config
        went_down = False
        for p in self._peers.values():
            if p.up and now >= p.last_seen + cfg.peer_timeout:
                p.up = False
                went_down = True
                self._events.append(PeerDown(p.node))
        if went_down:
            self._release()
        for p in self._peers.values():
            d = p.stream.deadline()
            if p.up and d is not None and now >= d:
                ready, skipped = p.stream.expire(now)  # best effort: give up a gap
                if skipped:
                    self.counters.lost += skipped
                    self._abort_bracket(p)
                for item in ready:
                    self._deliver(p, item, now)
        if self._periodic_due is not None and now >= self._periodic_due:
            self._tx.resync_pending = True
            self._periodic_due = now + (cfg.periodic_resync or 0.0)
        pacer = self._tx.pacer
        if pacer is not None and now >= pacer.next_period:
            pacer.begin(self._tx.source(), now)
        if self._expiry is not None:
            for origin, keys in self._expiry.expire(now):
                self.counters.expired += len(keys)
                self._events.append(RemoteFlows(origin, [(k, None) for k in keys]))

    # --- outputs -----------------------------------------------------------------------------
    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        out = list(self._events)
        self._events.clear()
        return out

    def in_sync(self) -> bool:
        """True when every live peer's stream has no known gap and has delivered a complete
        full resync since we first heard it (or since its restart, or since we asked). A node
        that has heard no peer counts as in sync once `startup_wait` has passed (as of the
        latest `now` given to any method; the ALIVE timer refreshes it every second)."""
        live = [p for p in self._peers.values() if p.up]
        if not live:
            return self._now - self._start >= self.config.startup_wait
        return all(not p.need_bracket and p.stream.complete for p in live)

    def stats(self) -> SyncStats:
        """Counters, rejections by reason and per-peer state, as one frozen snapshot."""
        c = self.counters
        tx = self._tx
        if tx.resend is not None:
            c.resend_queue_depth = len(tx.resend)
            c.evicted = tx.resend.evicted
        c.reorder_dropped = self._dropped_before + sum(
            p.stream.reorder_dropped for p in self._peers.values())
        return SyncStats(
            node=self.node_id, epoch=self.epoch, mode=self.config.mode.value, seq=tx.seq,
            in_sync=self.in_sync(), counters=replace(c), rejected=dict(self.rejected),
            resync=ResyncStats(pending=tx.resync_pending, active=tx.resync_box is not None,
                               remaining=len(tx.resync_box or ())),
            resend_queue_bytes=tx.resend.nbytes if tx.resend is not None else 0,
            peers=tuple(PeerStats(
                node=p.node, epoch=p.epoch, up=p.up, state="synced", last_seen=p.last_seen,
                silent_s=round(self._now - p.last_seen, 3),
                lag=None if p.acked is None else diff(tx.seq, p.acked),
                backlog=p.stream.backlog, in_bracket=p.in_bracket,
                need_resync=p.need_bracket, stuck=False,
            ) for p in self._peers.values()),
        )
