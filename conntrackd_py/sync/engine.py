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
    engine.receive_datagram(data, now, source)    # bytes from the sync link (source: its IP)
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
    DuplicateNode,
    Event,
    PeerDown,
    PeerForgotten,
    PeerRestarted,
    PeerUp,
    RemoteFlows,
    ResyncAborted,
    ResyncDone,
    ResyncStarted,
)
from .ftfw import ReliableStream
from .notrack import BestEffortStream
from .peer import Peer, PeerInput, PeerState, Stream
from .sender import Sender, Source
from .seqnum import add, after, diff
from .stats import PeerStats, ResyncStats, SyncStats
from .wire import Ack, Datagram, FlowMessage, Kind, Message, Nack, ResyncRequest

_BEGIN_BIT = 1 << Kind.RESYNC_BEGIN
_BATCH_BIT = 1 << Kind.FLOW_BATCH
_BRACKET = (PeerState.IN_RESYNC, PeerState.REFRESHING)
_SYNCED = (PeerState.SYNCED, PeerState.REFRESHING)
_ASKING = (PeerState.NEED_RESYNC, PeerState.DOUBTFUL)
_DUP_HOLDDOWN = 60.0  # DuplicateNode reported at most once per this

__all__ = ["Engine", "Event", "PeerDown", "PeerRestarted", "PeerUp", "RemoteFlows",
           "ResyncAborted", "ResyncDone", "ResyncStarted", "SyncConfig", "config_from"]


class Engine:
    def __init__(self, config: SyncConfig, epoch: int, source: Source, now: float) -> None:
        if not 1 <= epoch <= 0xFFFFFFFF:
            raise ValueError("epoch must be 1..2**32-1 (see PROTOCOL.md: it must increase "
                             "across restarts)")
        self.config = cfg = config
        self.node_id = cfg.node_id
        self.epoch = epoch
        self.counters = Counters()
        self.rejected: dict[str, int] = {}  # BadDatagram reasons (and "oversize")
        self._ftfw = cfg.mode is Mode.FTFW
        self._tx = Sender(cfg, epoch, source, self.counters, now)
        self._keys = self._tx.keys
        self._authenticated = bool(cfg.keys)
        self._max_len = cfg.mtu + cfg.oversize_slack
        # a NACK must fit one datagram: a range costs at most 10 bytes, the rest 20
        self._max_ranges = min(wire.MAX_NACK_RANGES, (self._tx.body_limit - 20) // 10)
        self._expiry = ExpiryTracker(cfg.cache_timeout) if cfg.mode is Mode.ALARM else None
        self._peers: dict[int, Peer] = {}
        self._events: deque[Event] = deque()
        self._control: list[Message] = []
        self._dropped_before = 0  # reorder drops of streams replaced by a peer restart
        self._start = self._now = now
        self._dup_seen: float | None = None  # last datagram of another host with our id
        self._dup_reported: float | None = None
        self._own_sources: set[str] = set()  # addresses our own datagrams came back from
        self._token_cap = cfg.resend_ratio * cfg.resend_burst
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
            self._input(p, PeerInput.ASK, now)

    def bulk_send(self, now: float) -> None:
        """Send our whole internal cache to every peer, bracketed as a full resync (now: the
        operator asks; peers' requests are the ones held to `resync_min_interval`)."""
        self._now = now
        self._tx.want_resync(now, limited=False)

    # --- receiving ---------------------------------------------------------------------------
    def receive_datagram(self, data: bytes, now: float, source: str | None = None) -> None:
        """One datagram from the sync link; `source`: the sender's address, if known (it
        tells another host using our node id from our own looped-back datagrams)."""
        self._now = now
        c = self.counters
        c.datagrams_received += 1
        c.bytes_received += len(data)
        if len(data) > self._max_len:  # refused before any parsing: no cost beyond a length
            c.oversize_received += 1
            self.rejected["oversize"] = self.rejected.get("oversize", 0) + 1
            return
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
            self._own(dg, data, now, source)
            return
        allowed = self.config.allowed_peers
        if allowed is not None and node not in allowed:
            c.unknown_node += 1
            return
        peer = self._peers.get(node)
        if peer is None:
            if not self._room_for_peer():
                c.peers_refused += 1
                return
            peer = self._peers[node] = Peer(node, dg.epoch, self._open_stream(dg), now)
            self._events.append(PeerUp(node, dg.epoch))
        elif dg.epoch != peer.epoch:
            if self._authenticated and dg.epoch in peer.past_epochs:
                # one we followed before: a replay, even once the peer is silent (without
                # auth the epoch that replaced it may have been forged: no such rule)
                c.stale_epoch += 1
                return
            if now - peer.last_seen < self.config.peer_timeout:  # its epoch is alive
                if not after(dg.epoch, peer.epoch):
                    c.stale_epoch += 1  # an older epoch while the newer is alive: a replay
                    if not self._authenticated:
                        # or, unauthenticated, the real peer beneath a forged newer epoch:
                        # the gate counts it live (not in sync) until its epoch is back
                        peer.last_heard = now
                    return
                # a newer epoch replaces a live stream only with its first stream datagrams
                # (a restart's stream begins at 1): one control datagram proves nothing
                if not (dg.sequenced and dg.first_lap
                        and 0 < dg.seq <= self.config.seq_window):
                    c.unconfirmed_epoch += 1
                    return
            # (a silent peer may come back with any epoch: a clock step must not lock it out)
            self._restart(peer, dg, now)
        t = peer.tokens + self.config.resend_ratio * len(data)
        peer.tokens = t if t < self._token_cap else self._token_cap
        c.unknown_kind += dg.unknown
        if dg.sequenced:
            self._on_stream(peer, dg, data, now)
        else:
            self._on_control_datagram(peer, dg, now)

    def _own(self, dg: Datagram, data: bytes, now: float, source: str | None) -> None:
        """Our node id: our own datagram looped back, or another host using our id. A source
        is learnt as ours only from a stream datagram byte-equal to one we sent (a spoofer
        that beats our first looped-back datagram must not be whitelisted); until one is
        learnt, control datagrams with our id and epoch count as own (no alarm at start-up)."""
        if dg.epoch == self.epoch and not (dg.sequenced and after(dg.seq, self._tx.seq)):
            if source is None or source in self._own_sources:
                self.counters.own += 1
                return
            if dg.sequenced and self._tx.sent(dg.seq, data):
                if len(self._own_sources) < 16:  # one per channel: a handful at most
                    self._own_sources.add(source)
                self.counters.own += 1
                return
            if not dg.sequenced and not self._own_sources:
                self.counters.own += 1
                return
        self.counters.duplicate_node += 1
        self._dup_seen = now
        if self._dup_reported is None or now - self._dup_reported >= _DUP_HOLDDOWN:
            self._dup_reported = now
            self._events.append(DuplicateNode(dg.node, dg.epoch, source))

    def _room_for_peer(self) -> bool:
        """A new node fits the table, if need be in place of the longest-silent peer down."""
        if len(self._peers) < self.config.max_peers:
            return True
        down = [p for p in self._peers.values() if not p.up]
        if not down:
            return False
        oldest = min(down, key=lambda p: p.last_seen)
        self._forget(oldest)
        return True

    def _forget(self, peer: Peer) -> None:
        self._dropped_before += peer.stream.reorder_dropped
        del self._peers[peer.node]
        self.counters.peers_forgotten += 1
        self._events.append(PeerForgotten(peer.node))

    def _on_stream(self, peer: Peer, dg: Datagram, data: bytes, now: float) -> None:
        c = self.counters
        seq = dg.seq
        is_begin = bool(dg.markers & _BEGIN_BIT)
        if not self._authenticated:  # (with a key, one number is one datagram)
            twin = peer.recent.get(seq)
            if twin is None:
                peer.remember(seq, data)
            elif twin != data:
                # two different datagrams with one number: one is forged (or a second host
                # uses its node id); what we delivered cannot be trusted
                c.forged += 1
                self._doubt(peer, now)
                return
        if peer.state is PeerState.DOUBTFUL:
            if not is_begin:
                self._alive(peer, now)  # heard, but nothing is delivered until a BEGIN
                return
            self._dropped_before += peer.stream.reorder_dropped
            peer.stream = self._new_stream(seq)  # re-anchored at a full resync's start
        stream = peer.stream
        if diff(seq, stream.highest) > self.config.seq_window:
            # far ahead of anything it sent before: not believed, and continuity is doubtful
            c.implausible += 1
            self._doubt(peer, now)
            return
        ready, skipped = stream.receive(seq, dg, is_begin, now)
        if ready is None:
            c.replayed += 1
            if not self._authenticated and diff(seq, stream.anchor) < 0:
                # unauthenticated, below where the stream last jumped: it may be the real
                # stream beneath a forged RESYNC_BEGIN (a healthy one delivers too), however
                # far ahead the forged one was (a doubtful stream re-anchors at any BEGIN):
                # live, so the gate says not ready, and stuck soon, so a resync is asked
                if peer.behind_since is None:
                    peer.behind_since = now
                self._alive(peer, now)
            return
        self._alive(peer, now)
        if ready:
            peer.behind_since = None
        if skipped:
            c.lost += skipped
            self._input(peer, PeerInput.GAP, now)
        for item in ready:
            self._deliver(peer, item, now)
        self._watch_backlog(peer, now)

    def _on_control_datagram(self, peer: Peer, dg: Datagram, now: float) -> None:
        c = self.counters
        stream = peer.stream
        if peer.state is not PeerState.DOUBTFUL:  # (a doubted stream's numbers are no guide)
            d = diff(dg.seq, stream.highest)
            if d < -self.config.control_replay_window:
                c.replayed += 1
                return
            if d > self.config.latest_window:
                c.implausible += 1  # claims a stream position we cannot believe: ignored
                return
            if d > 0:
                stream.note_latest(dg.seq, now)
                self._watch_backlog(peer, now)
        self._alive(peer, now)
        for m in dg.messages:
            self._on_control(peer, m, now)

    def _new_stream(self, start: int) -> Stream:
        if self._ftfw:
            return ReliableStream(self.config, start)
        return BestEffortStream(self.config, start)

    def _open_stream(self, dg: Datagram) -> Stream:
        # a stream still on its first lap began at 1: we will ask for what we missed of it
        return self._new_stream(1 if dg.first_lap else dg.seq if dg.sequenced
                                else add(dg.seq, 1))

    def _restart(self, peer: Peer, dg: Datagram, now: float) -> None:
        self._dropped_before += peer.stream.reorder_dropped
        peer.past_epochs.append(peer.epoch)
        peer.epoch = dg.epoch
        peer.stream = self._open_stream(dg)
        peer.forget_recent()
        peer.acked = None
        peer.stall_since = peer.behind_since = None
        peer.up = True
        peer.last_seen = peer.last_heard = now
        self._input(peer, PeerInput.CONTACT, now)  # a restart always asks for a resync
        self.counters.peer_restarts += 1
        self._events.append(PeerRestarted(peer.node, dg.epoch))
        self._release()

    def _alive(self, peer: Peer, now: float) -> None:
        peer.last_seen = peer.last_heard = now
        if not peer.up:
            peer.up = True
            self._events.append(PeerUp(peer.node, peer.epoch))

    def _input(self, peer: Peer, inp: PeerInput, now: float) -> None:
        """Feed the peer's state machine (peer.py) and perform what the transition means."""
        old, new = peer.handle(inp)
        c = self.counters
        if old in _BRACKET and (new not in _BRACKET or inp is PeerInput.BEGIN):
            if inp is PeerInput.END:
                c.resyncs_received += 1
                self._events.append(ResyncDone(peer.node))
            else:
                c.resyncs_aborted += 1
                if inp is not PeerInput.BEGIN:  # (a newer BEGIN restarts the marking)
                    self._events.append(ResyncAborted(peer.node))
        if inp is PeerInput.BEGIN and new in _BRACKET:
            peer.bracket_at = now
            self._events.append(ResyncStarted(peer.node))
        if new in _ASKING and (old is not new or inp in (PeerInput.ASK, PeerInput.CONTACT)):
            if peer.request_due is None or peer.request_due > now:
                peer.request_due = now
        elif new is PeerState.SYNCED:
            peer.request_due = None

    def _doubt(self, peer: Peer, now: float) -> None:
        if peer.state is not PeerState.DOUBTFUL:
            self.counters.doubts += 1
        peer.stall_since = peer.behind_since = None
        self._input(peer, PeerInput.DOUBT, now)

    def _watch_backlog(self, peer: Peer, now: float) -> None:
        """Stuck-stream detection, O(1) per datagram: the backlog known when it appeared
        must be resolved (delivered or jumped over) within `stall_timeout`."""
        st = peer.stream
        if st.complete:
            peer.stall_since = None
        elif peer.stall_since is None or after(st.expected, peer.stall_target):
            peer.stall_since = now
            peer.stall_target = st.highest

    def _stuck(self, p: Peer, now: float) -> bool:
        # (the same sums as get_timer's: a timer due must find the condition true)
        cfg = self.config
        return ((p.stall_since is not None and now >= p.stall_since + cfg.stall_timeout)
                # a bracket whose bulk stopped coming will never close
                or (p.state in _BRACKET and now >= p.bracket_at + cfg.stall_timeout)
                or (p.behind_since is not None
                    and now >= p.behind_since + 2 * cfg.alive_interval))

    def _deliver(self, peer: Peer, dg: Datagram, now: float) -> None:
        msgs = dg.messages
        if dg.markers & _BATCH_BIT:
            peer.bracket_at = now  # a full resync's bulk: a bracket is progressing
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
                self._input(peer, PeerInput.BEGIN, now)
            elif m is Kind.RESYNC_END:
                self._input(peer, PeerInput.END, now)
        if batch:
            self._flows(peer.node, batch, now)

    def _flows(self, origin: int, flows: list[FlowMessage], now: float) -> None:
        self.counters.flows_received += len(flows)
        self._events.append(RemoteFlows(origin, flows))
        if self._expiry is not None:
            self._expiry.refresh(origin, flows, now)

    def _on_control(self, peer: Peer, m: Message, now: float) -> None:
        c = self.counters
        if isinstance(m, ResyncRequest):
            if m.target in (wire.ALL_NODES, self.node_id):
                c.resync_requests_received += 1
                self._tx.on_resync_request(m, now)
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
        peer.tokens -= self._tx.on_nack(m.ranges, peer.acked, now, peer.tokens)

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
        c.resend_queue_depth = tx.queue_depth
        c.evicted = tx.evicted
        return out

    def _control_messages(self, now: float) -> list[Message]:
        msgs, self._control = self._control, []
        c = self.counters
        retry = self.config.resync_retry
        for p in self._peers.values():
            if not p.up:
                continue  # its timers wait until it is heard again
            state = p.state
            if state is not PeerState.DOUBTFUL:  # (no ACK or NACK of numbers not believed)
                ack, ranges = p.stream.control(now, self._max_ranges)
                if ack is not None:
                    msgs.append(Ack(p.node, p.epoch, ack))
                    c.acks_sent += 1
                if ranges:
                    msgs.append(Nack(p.node, p.epoch, tuple(ranges)))
                    c.nacks_sent += 1
            if p.request_due is not None and now >= p.request_due:
                if state in _BRACKET:  # one is arriving: its end will do
                    p.request_due = now + retry
                elif state in _ASKING:
                    # from seq 0: "continuity lost, start a new one" (PROTOCOL.md)
                    frm = 0 if state is PeerState.DOUBTFUL else p.stream.expected
                    msgs.append(ResyncRequest(p.node, p.epoch, frm))
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
        if self._control:
            return now
        t = tx.get_timer(now, window)
        if t <= now:
            return now
        cfg = self.config
        for p in self._peers.values():
            if not p.up:
                if p.last_seen + cfg.peer_expire < t:
                    t = p.last_seen + cfg.peer_expire
                continue
            # (a doubted stream's ACK/NACK timers are not served: nothing is acked in doubt)
            d = p.stream.deadline() if p.state is not PeerState.DOUBTFUL else None
            if d is not None and d < t:
                t = d
            if p.last_seen + cfg.peer_timeout < t:
                t = p.last_seen + cfg.peer_timeout
            if p.request_due is not None and p.request_due < t:
                t = p.request_due
            if p.state in _BRACKET and p.bracket_at + cfg.stall_timeout < t:
                t = p.bracket_at + cfg.stall_timeout
            if p.stall_since is not None and p.stall_since + cfg.stall_timeout < t:
                t = p.stall_since + cfg.stall_timeout
            if p.behind_since is not None and p.behind_since + 2 * cfg.alive_interval < t:
                t = p.behind_since + 2 * cfg.alive_interval
        if self._expiry is not None:
            d = self._expiry.deadline()
            if d is not None and d < t:
                t = d
        return t

    def handle_timer(self, now: float) -> None:
        self._now = now
        cfg = self.config
        went_down = False
        for p in list(self._peers.values()):
            if not p.up:
                if now >= p.last_seen + cfg.peer_expire:
                    self._forget(p)
                continue
            if now >= p.last_seen + cfg.peer_timeout:
                p.up = False
                p.stall_since = p.behind_since = None
                went_down = True
                self._events.append(PeerDown(p.node))
                continue
            if self._stuck(p, now):
                self.counters.stalls += 1
                self._doubt(p, now)
        if went_down:
            self._release()
        for p in self._peers.values():
            d = p.stream.deadline()
            if p.up and d is not None and now >= d and p.state is not PeerState.DOUBTFUL:
                ready, skipped = p.stream.expire(now)  # best effort: give up a gap
                if skipped:
                    self.counters.lost += skipped
                    self._input(p, PeerInput.GAP, now)
                for item in ready:
                    self._deliver(p, item, now)
        self._tx.handle_timer(now)
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
        """True when every live peer is SYNCED (a complete full resync delivered since we
        first heard it, its restart or our request, continuous since), its stream has no
        known gap and is not stuck, and no other host uses our node id (seen within
        `peer_timeout`). A node that has heard no peer counts as in sync once `startup_wait`
        has passed (as of the latest `now` given to any method; the ALIVE timer refreshes
        it every second)."""
        now = self._now
        cfg = self.config
        if self._dup_seen is not None and now - self._dup_seen < cfg.peer_timeout:
            return False
        # unauthenticated, a peer heard (even if what it sent could not be used) is live
        heard = None if self._authenticated else now - cfg.peer_timeout
        live = [p for p in self._peers.values()
                if p.up or (heard is not None and p.last_heard > heard)]
        if not live:
            return now - self._start >= cfg.startup_wait
        return all(p.state in _SYNCED and p.stream.complete and not self._stuck(p, now)
                   for p in live)

    def stats(self) -> SyncStats:
        """Counters, rejections by reason and per-peer state, as one frozen snapshot."""
        c = self.counters
        tx = self._tx
        c.resend_queue_depth = tx.queue_depth
        c.evicted = tx.evicted
        c.reorder_dropped = self._dropped_before + sum(
            p.stream.reorder_dropped for p in self._peers.values())
        now = self._now
        return SyncStats(
            node=self.node_id, epoch=self.epoch, mode=self.config.mode.value, seq=tx.seq,
            in_sync=self.in_sync(), counters=replace(c), rejected=dict(self.rejected),
            resync=ResyncStats(pending=tx.resync_pending, active=tx.resync_active,
                               remaining=tx.resync_remaining),
            resend_queue_bytes=tx.queue_bytes,
            duplicate_node=(self._dup_seen is not None
                            and now - self._dup_seen < self.config.peer_timeout),
            peers=tuple(PeerStats(
                node=p.node, epoch=p.epoch, up=p.up, state=p.state.value,
                last_seen=p.last_seen, silent_s=round(now - p.last_seen, 3),
                lag=None if p.acked is None else diff(tx.seq, p.acked),
                backlog=p.stream.backlog, in_bracket=p.state in _BRACKET,
                need_resync=p.state not in _SYNCED, stuck=self._stuck(p, now),
            ) for p in self._peers.values()),
        )
