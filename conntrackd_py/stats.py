"""Typed snapshots of the daemon's state: what `-s`, the control channel and metrics read.

This module owns the shape of the daemon's statistics: one frozen dataclass per section
(runtime, cache, sync, link, direct writes, accounting, control), assembled by the daemon
at the moment of a request and read by attribute everywhere (metrics, tests, the control
server's JSON via `dataclasses.asdict`): a renamed field fails mypy, not a dashboard.
It also assembles a snapshot from the parts that count (`snapshot`, `runtime_stats`,
`cache_stats`, `control_stats`: pure functions given those parts, never the daemon, which
this module does not import). It must not count or hold live state itself: the daemon and
its parts count, this module names and gathers what they report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .kernel.events import EventStats
from .sync import SyncStats
from .tracker import TrackerStats

if TYPE_CHECKING:  # the parts a snapshot reads; they import this module for their shapes
    from .accounting import Accounting
    from .cache import ExternalCache
    from .config import Config
    from .control import ControlServer
    from .metrics import MetricsServer
    from .remote import Remote
    from .sync import Engine
    from .tracker import Tracker
    from .transport import Transport
    from .vrrp import Follower

__all__ = [
    "AccountingStats", "CacheStats", "ChannelSnapshot", "CommitReport", "ControlStats",
    "DirectStats", "Direction", "EventStats", "LinkStats", "ProtoTotals", "RuntimeStats",
    "SinkStats", "Snapshot", "SyncStats", "TopTalker", "TrackerStats", "cache_stats",
    "control_stats", "runtime_stats", "sections", "snapshot",
]

#: `-s KIND` -> the sections it shows (conntrackd's names map onto ours)
_KINDS: dict[str | None, frozenset[str]] = {
    None: frozenset({"runtime", "cache", "sync", "link", "direct", "accounting", "control"}),
    "all": frozenset({"runtime", "cache", "sync", "link", "direct", "accounting", "control"}),
    "runtime": frozenset({"runtime", "control"}),
    "general": frozenset({"runtime", "control"}),
    "cache": frozenset({"cache"}),
    "network": frozenset({"sync", "link", "direct"}),
    "sync": frozenset({"sync", "direct"}),
    "queue": frozenset({"sync"}),
    "link": frozenset({"link"}),
    "accounting": frozenset({"accounting"}),
    "control": frozenset({"control"}),
}


def sections(kind: str | None) -> frozenset[str]:
    """The sections `-s kind` shows; an unknown kind shows none (commands.py refuses those
    before the daemon is asked)."""
    return _KINDS.get(kind, frozenset())


@dataclass(frozen=True, slots=True)
class CommitReport:
    """What one forked commit did (commit.py builds it in the child and checks it back)."""

    created: int
    updated: int
    failed: int
    errors: dict[str, int]
    seconds: float
    encode_seconds: float
    plan_seconds: float
    #: entries whose bytes did not describe a flow, skipped
    undecodable: int


@dataclass(frozen=True, slots=True)
class RuntimeStats:
    node: int
    epoch: str
    uptime_s: float
    pid: int
    mode: str
    in_sync: bool
    commits: int
    last_commit: CommitReport | None
    #: sync datagrams must carry a valid MAC (sync.auth.required and a key)
    auth_enabled: bool
    reloads: int
    reload_failures: int
    #: unexpected exceptions contained while serving one input, total and by kind
    internal_errors: int
    internal_errors_by_kind: dict[str, int]
    #: descriptors exhausted (EMFILE/ENFILE) somewhere, survived
    fd_exhausted: int
    #: datagrams dropped before decoding: longer than the MTU plus slack
    oversize_datagrams: int
    #: DuplicateNode events: another host sends with our node id
    duplicate_node: int
    peers_forgotten: int
    #: flows our own commit put in the kernel, not sent to peers as ours (a commit's echo)
    commit_echoes: int = 0
    #: keepalived notify FIFO: transitions acted on, lines that were not a transition
    keepalived_transitions: int = 0
    keepalived_lines_ignored: int = 0
    #: the role keepalived last gave this node (MASTER, BACKUP, FAULT), when followed
    keepalived_state: str | None = None


@dataclass(frozen=True, slots=True)
class CacheStats:
    internal: int
    external: int
    external_by_node: dict[int, int]
    external_undecodable: int
    #: peers' entries refused by the per-peer cap (sync.limits.max_flows_per_peer), by origin
    external_refused: dict[int, int]
    #: peers' flows refused by validation (flow.filter_untrusted), by reason
    invalid_flows: dict[str, int]
    kernel_events: EventStats | None
    tracker: TrackerStats | None


@dataclass(frozen=True, slots=True)
class ChannelSnapshot:
    channel: str
    up: bool
    sent: int
    received: int
    send_errors: int
    bytes_sent: int
    bytes_received: int
    last_rx: float
    oversize: int
    gso: bool
    gso_datagrams: int


@dataclass(frozen=True, slots=True)
class LinkStats:
    active: str
    switches: int
    channels: list[ChannelSnapshot]


@dataclass(slots=True)
class DirectStats:
    """Kernel writes of peers' flows with the external cache off: counted in place by
    `remote.Remote`, copied into a snapshot (`dataclasses.replace`)."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    undecodable: int = 0
    #: peers' flows refused because the writer's queue was full (`Remote.max_pending`)
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Direction:
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class ProtoTotals:
    flows: int
    orig: Direction
    reply: Direction


@dataclass(frozen=True, slots=True)
class TopTalker:
    source: str
    bytes: int
    max_undercount: int


@dataclass(frozen=True, slots=True)
class SinkStats:
    """One accounting sink's records: written, and lost (a collector unreachable, a full disk)."""

    written: int
    lost: int


@dataclass(frozen=True, slots=True)
class AccountingStats:
    flows: int
    packets: int
    bytes: int
    totals: dict[str, ProtoTotals]
    top_talkers: list[TopTalker]
    records_written: int
    records_dropped: int
    records_pending: int
    buffer: int
    write_errors: int
    writer_restarts: int
    file: str | None
    format: str
    #: per sink ("file", "syslog", "ipfix 10.0.0.1:4739"): records written and lost
    sinks: dict[str, SinkStats] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ControlStats:
    """The control socket's and the metrics listener's counters."""

    requests: int = 0
    bad_requests: int = 0
    #: unexpected exceptions while serving one control client, contained
    errors: int = 0
    refused_clients: int = 0
    dropped_clients: int = 0
    metrics_requests: int = 0
    metrics_client_errors: int = 0
    #: connections closed at once: more than the cap were open
    metrics_refused: int = 0
    metrics_connections: int = 0
    #: accept() failures of the metrics listener (EMFILE and the like), retried
    metrics_accept_errors: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One `-s` answer: the sections asked for, None for the others (or where the mode has
    none: no sync section with general.mode stats)."""

    runtime: RuntimeStats | None = None
    cache: CacheStats | None = None
    sync: SyncStats | None = None
    link: LinkStats | None = None
    direct: DirectStats | None = None
    accounting: AccountingStats | None = None
    control: ControlStats | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, in the control protocol's shape: sections asked for only, the sync
        section as the engine shapes it (peers keyed by node id)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f.name] = v.as_dict() if isinstance(v, SyncStats) else asdict(v)
        return out


# --- assembly: what each section reads, from the parts that count it ---------------------
def snapshot(kind: str | None, *, runtime: Callable[[], RuntimeStats],
             tracker: Tracker | None, external: ExternalCache, invalid: Mapping[str, int],
             engine: Engine | None, transport: Transport | None, direct: DirectStats | None,
             accounting: Accounting | None, control: ControlServer | None,
             metrics: MetricsServer | None) -> Snapshot:
    """`-s kind` now: the sections it shows (`sections`), each read from its part; None where
    the part is absent (no engine in mode stats; `direct` None with the external cache on)."""
    want = sections(kind)
    return Snapshot(
        runtime=runtime() if "runtime" in want else None,
        cache=cache_stats(tracker, external, invalid) if "cache" in want else None,
        sync=engine.stats() if "sync" in want and engine is not None else None,
        link=transport.snapshot() if "link" in want and transport is not None else None,
        direct=dataclasses.replace(direct) if direct is not None and "direct" in want
        else None,
        accounting=accounting.snapshot()
        if "accounting" in want and accounting is not None else None,
        control=control_stats(control, metrics) if "control" in want else None,
    )


def runtime_stats(cfg: Config, *, epoch: int, uptime_s: float, pid: int, in_sync: bool,
                  commits: int, last_commit: CommitReport | None, auth_enabled: bool,
                  reloads: int, reload_failures: int, internal_errors: Mapping[str, int],
                  fd_exhausted: int, transport: Transport | None, remote: Remote,
                  commit_echoes: int, keepalived: Follower,
                  keepalived_followed: bool) -> RuntimeStats:
    return RuntimeStats(
        node=cfg.node.id, epoch=f"{epoch:08x}", uptime_s=round(uptime_s, 1), pid=pid,
        mode=cfg.sync.mode if cfg.general.mode == "sync" else "stats",
        in_sync=in_sync, commits=commits, last_commit=last_commit,
        auth_enabled=auth_enabled, reloads=reloads, reload_failures=reload_failures,
        internal_errors=sum(internal_errors.values()),
        internal_errors_by_kind=dict(internal_errors),
        fd_exhausted=fd_exhausted,
        oversize_datagrams=sum(c.stats.oversize for c in transport.channels)
        if transport is not None else 0,
        duplicate_node=remote.duplicate_node, peers_forgotten=remote.peers_forgotten,
        commit_echoes=commit_echoes,
        keepalived_transitions=keepalived.transitions,
        keepalived_lines_ignored=keepalived.ignored,
        keepalived_state=keepalived.state if keepalived_followed else None)


def cache_stats(tracker: Tracker | None, external: ExternalCache,
                invalid: Mapping[str, int]) -> CacheStats:
    """Both caches' sizes and refusals; copies of the counters (a snapshot does not move)."""
    return CacheStats(
        internal=len(tracker.cache) if tracker is not None else 0, external=len(external),
        external_by_node={o: external.count(o) for o in external.origins()},
        external_undecodable=external.undecodable,
        external_refused=dict(external.refused),
        invalid_flows=dict(invalid),
        kernel_events=dataclasses.replace(tracker.events.stats) if tracker is not None
        else None,
        tracker=dataclasses.replace(tracker.stats) if tracker is not None else None)


def control_stats(control: ControlServer | None, metrics: MetricsServer | None) -> ControlStats:
    c = control
    m = metrics
    return ControlStats(
        requests=c.requests if c else 0, bad_requests=c.bad_requests if c else 0,
        errors=c.errors if c else 0, refused_clients=c.refused_clients if c else 0,
        dropped_clients=c.dropped_clients if c else 0,
        metrics_requests=m.requests if m is not None else 0,
        metrics_client_errors=m.client_errors if m is not None else 0,
        metrics_refused=m.refused if m is not None else 0,
        metrics_connections=m.connections if m is not None else 0,
        metrics_accept_errors=m.accept_errors if m is not None else 0)
