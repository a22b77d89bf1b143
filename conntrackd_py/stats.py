"""Typed snapshots of the daemon's state: what `-s`, the control channel and metrics read.

This module owns the shape of the daemon's statistics: one frozen dataclass per section
(runtime, cache, sync, link, direct writes, accounting, control), assembled by the daemon
at the moment of a request and read by attribute everywhere (metrics, tests, the control
server's JSON via `dataclasses.asdict`): a renamed field fails mypy, not a dashboard.
It must not compute anything or hold live state: the daemon and its parts count, this
module only names what they report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .kernel.events import EventStats
from .sync import SyncStats
from .tracker import TrackerStats

__all__ = [
    "AccountingStats", "CacheStats", "ChannelSnapshot", "CommitReport", "ControlStats",
    "DirectStats", "Direction", "EventStats", "LinkStats", "ProtoTotals", "RuntimeStats",
    "SinkStats", "Snapshot", "SyncStats", "TopTalker", "TrackerStats", "sections",
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


@dataclass(frozen=True, slots=True)
class DirectStats:
    """Kernel writes of peers' flows with the external cache off."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    undecodable: int = 0


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
