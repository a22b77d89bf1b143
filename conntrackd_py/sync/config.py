"""The replication engine's settings and counters.

This module owns `SyncConfig` (frozen, validated once in its constructor: nothing below the
config edge sees YAML) and `Counters` (plain ints the engine increments; the metrics and
`stats` exporters read them). It does no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from . import wire


class Mode(StrEnum):
    FTFW = "ftfw"  # reliable: sequence numbers, ACK/NACK, resend queue
    NOTRACK = "notrack"  # best effort, optional periodic full resync
    ALARM = "alarm"  # best effort, every flow refreshed periodically, receivers expire


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Everything the engine needs to know; times are float seconds.

    `mtu` is the UDP payload size a datagram may take (header and tag included).
    `keys`: BLAKE2b keys (16-64 bytes); the first signs, any verifies; empty = no tag.
    `ack_every`/`ack_interval`: a receiver acks after that many in-order datagrams or that
    long after the first unacked one. `reorder_delay`: a gap is NACKed once it has stayed
    open that long (reordering fills it sooner). `nack_interval`: how often missing ranges
    are asked again. `retransmit_holdoff`: a datagram is not resent twice within this (several
    receivers NACK the same loss on a multicast link).
    `resend_queue_max`/`resend_queue_bytes`: the sender's bound; what falls out of it and is
    NACKed later is replaced by a full resync, never silently lost. `resync_window`: a full
    resync pauses while this many datagrams are unacked by some live peer (flow control).
    `reorder_max`: out-of-order datagrams a receiver buffers per sender.
    `burst`: at most this many datagrams per `datagrams_to_send` call (the shell calls again
    when `get_timer()` says now).
    `peer_timeout`: a peer silent that long is reported down. `startup_wait`: with no peer
    heard after that long, a lone node counts as in sync.
    `resync_retry`: an unanswered resync request is repeated after this long.
    `periodic_resync`: send a full resync that often (None: never); useful in NOTRACK.
    `alarm_refresh`/`cache_timeout`: ALARM mode: every flow is re-sent once per refresh
    period, and receivers drop a peer's flow not refreshed for `cache_timeout`.
    `allowed_peers`: node ids accepted (None: any node that passes authentication).
    `control_replay_window`: an unsequenced datagram whose header seq is further than this
    behind the newest seq seen from its sender is dropped as a replay.

    Limits against hostile or broken peers (proto/PROTOCOL.md, "Limits"):
    `seq_window`: a sequence number further than this ahead of the newest one seen from a live
    peer is not believed (the datagram is dropped and a full resync of the peer requested);
    `latest_window` bounds likewise what a control datagram's header may claim.
    `stall_timeout`: a live peer's stream whose backlog (or, without auth, whose datagrams
    heard behind its last resync) has not been resolved for that long is doubted: a full
    resync is requested and `in_sync()` is false meanwhile.
    `max_peers`: peer nodes tracked at once (datagrams from more are dropped and counted);
    `peer_expire`: a peer down that long is forgotten. `resync_min_interval`: full resyncs
    peers ask for are served 3 at once, then one per this (requests meanwhile coalesce).
    `resend_ratio`: per peer, the bytes we retransmit for its NACKs are at most this times
    the bytes received from it (a token bucket holding at most `resend_burst` received
    bytes' worth).
    `oversize_slack`: a datagram longer than `mtu` plus this is dropped before decoding.
    """

    node_id: int
    mode: Mode = Mode.FTFW
    mtu: int = 1400
    keys: tuple[bytes, ...] = ()
    ack_every: int = 64
    ack_interval: float = 0.05
    nack_interval: float = 0.1
    reorder_delay: float = 0.002
    retransmit_holdoff: float = 0.02
    alive_interval: float = 1.0
    resend_queue_max: int = 131072
    resend_queue_bytes: int = 8 << 20
    resync_window: int = 1024
    reorder_max: int = 1024
    burst: int = 64
    peer_timeout: float = 5.0
    startup_resync: bool = True
    startup_wait: float = 2.0
    resync_retry: float = 1.0
    periodic_resync: float | None = None
    alarm_refresh: float = 15.0
    cache_timeout: float = 180.0
    allowed_peers: frozenset[int] | None = None
    control_replay_window: int = 64
    seq_window: int = 1 << 20
    latest_window: int = 1024
    stall_timeout: float = 15.0
    max_peers: int = 32
    peer_expire: float = 3600.0
    resync_min_interval: float = 5.0
    resend_ratio: float = 10.0
    resend_burst: int = 64 << 10
    oversize_slack: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.node_id <= 0xFFFFFFFF:
            raise ValueError("node_id must be 1..4294967295 (0 means 'all nodes')")
        object.__setattr__(self, "mode", Mode(self.mode))
        if not 512 <= self.mtu <= wire.MAX_DATAGRAM:
            raise ValueError(f"mtu must be 512..{wire.MAX_DATAGRAM}")
        wire.KeyRing(self.keys)  # validates lengths and duplicates
        for name in ("ack_every", "resend_queue_max", "resend_queue_bytes", "resync_window",
                     "reorder_max", "burst", "control_replay_window", "seq_window",
                     "latest_window", "max_peers", "resend_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("ack_interval", "nack_interval", "alive_interval", "peer_timeout",
                     "resync_retry", "alarm_refresh", "cache_timeout", "stall_timeout",
                     "peer_expire"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds")
        for name in ("retransmit_holdoff", "startup_wait", "reorder_delay",
                     "resync_min_interval", "resend_ratio", "oversize_slack"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0")
        if self.periodic_resync is not None and not self.periodic_resync > 0:
            raise ValueError("periodic_resync must be positive or None")
        if self.resync_window > self.resend_queue_max:
            raise ValueError("resync_window must not exceed resend_queue_max")
        if self.mode is Mode.ALARM and self.cache_timeout <= self.alarm_refresh:
            raise ValueError("cache_timeout must be longer than alarm_refresh")
        if self.peer_timeout <= self.alive_interval:
            raise ValueError("peer_timeout must be longer than alive_interval")
        if self.seq_window >= 1 << 30 or self.latest_window > self.seq_window:
            raise ValueError("seq_window must be < 2**30 and >= latest_window")
        if self.stall_timeout <= self.resync_min_interval + self.resync_retry:
            # a gap filled by a full resync may legitimately wait that long for its BEGIN
            raise ValueError("stall_timeout must be longer than resync_min_interval + "
                             "resync_retry")
        if self.peer_expire < self.peer_timeout:
            raise ValueError("peer_expire must not be shorter than peer_timeout")


def config_from(cfg: Any, keys: tuple[bytes, ...]) -> SyncConfig:
    """Build a SyncConfig from the daemon's parsed configuration (`conntrackd_py.config.Config`,
    read by attribute name so this package does not import the config layer) and the keys
    `config.load_keys` read. Settings the YAML does not expose keep their defaults here."""
    s = cfg.sync
    ftfw, notrack, alarm = s.ftfw, s.notrack, s.alarm
    queue = int(ftfw.resend_queue)
    limits = s.limits
    return SyncConfig(
        node_id=int(cfg.node.id), mode=Mode(s.mode), mtu=int(s.mtu), keys=tuple(keys),
        ack_every=int(ftfw.ack_every), ack_interval=float(ftfw.ack_interval),
        alive_interval=float(ftfw.alive_interval), resend_queue_max=queue,
        resync_window=min(queue, 1024),
        peer_timeout=float(s.peer_timeout), startup_resync=bool(s.startup_resync),
        periodic_resync=float(notrack.resync_interval) or None,
        alarm_refresh=float(alarm.refresh), cache_timeout=float(alarm.cache_timeout),
        allowed_peers=frozenset(s.peers) if s.peers else None,
        max_peers=int(limits.max_peers), peer_expire=float(limits.peer_expire),
        resync_min_interval=float(limits.resync_min_interval),
        resend_ratio=float(limits.resend_ratio),
    )


@dataclass(slots=True)
class Counters:
    """What the engine saw and did; monotonic except `resend_queue_depth` (a gauge)."""

    datagrams_sent: int = 0
    datagrams_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    flows_sent: int = 0  # flow messages in new (not retransmitted) datagrams
    flows_received: int = 0  # flow messages delivered, in order
    retransmitted: int = 0
    bytes_retransmitted: int = 0
    acks_sent: int = 0
    acks_received: int = 0
    nacks_sent: int = 0
    nacks_received: int = 0
    resync_requests_sent: int = 0
    resync_requests_received: int = 0
    resyncs_sent: int = 0  # full resyncs started (RESYNC_BEGIN sent)
    resyncs_received: int = 0  # full resyncs received complete (RESYNC_END in order)
    resyncs_aborted: int = 0  # received resyncs cut by a gap, a newer one or a restart
    bad_mac: int = 0  # untagged, unexpected tag, unknown key id, wrong tag
    malformed: int = 0
    replayed: int = 0  # seq already delivered (incl. duplicates of others' retransmissions)
    stale_epoch: int = 0  # an older epoch of a node whose newer epoch we follow
    unknown_node: int = 0  # node id not in allowed_peers
    own: int = 0  # our own datagrams looped back by multicast
    unknown_kind: int = 0  # messages or fields from a newer version, skipped
    lost: int = 0  # datagrams given up: skipped by a resync jump (FTFW) or gaps (others)
    reorder_dropped: int = 0  # out-of-order datagrams beyond reorder_max, dropped
    evicted: int = 0  # resend-queue entries dropped unacked by the bound
    expired: int = 0  # ALARM: remote flows dropped after cache_timeout
    peer_restarts: int = 0
    oversize: int = 0  # flows too big for any datagram, never sent (a bug upstream)
    oversize_received: int = 0  # datagrams longer than the MTU plus slack, dropped undecoded
    implausible: int = 0  # sequence numbers too far ahead of a peer's stream to be believed
    unconfirmed_epoch: int = 0  # a new epoch in a control datagram while the old one is alive
    doubts: int = 0  # times a peer's stream continuity was doubted (a resync was requested)
    stalls: int = 0  # of which: a backlog or a silence of delivery past the bound
    forged: int = 0  # without auth: two different datagrams with one sequence number
    duplicate_node: int = 0  # datagrams with our node id from another epoch (same id twice)
    peers_refused: int = 0  # datagrams from a new node while max_peers are tracked
    peers_forgotten: int = 0  # peers down longer than peer_expire, dropped from the table
    resends_limited: int = 0  # retransmissions refused by the per-peer byte budget
    resync_requests_coalesced: int = 0  # full resync requests within resync_min_interval
    resend_queue_depth: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
