"""Typed snapshots of the replication engine's state (`Engine.stats()`).

This module owns the shape of what the engine reports: `SyncStats` (one frozen snapshot),
`PeerStats` (one per known peer) and `ResyncStats` (our own full resync). The control
channel and the metrics exporter read them by attribute, so a renamed field fails mypy
instead of silently reading 0; `as_dict()` gives the JSON form (peers keyed by node id as
text, as the control protocol has always shown them). It computes nothing and does no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .config import Counters


@dataclass(frozen=True, slots=True)
class PeerStats:
    node: int
    epoch: int
    up: bool
    state: str  # PeerState value: need_resync, in_resync, synced, doubtful
    last_seen: float  # engine clock of the last datagram accepted from it
    silent_s: float
    lag: int | None  # our datagrams it has not acked (None: it never acked this epoch)
    backlog: int  # its datagrams we know of and have not delivered yet
    in_bracket: bool
    need_resync: bool
    stuck: bool  # a backlog or a doubt unresolved for longer than the bound


@dataclass(frozen=True, slots=True)
class ResyncStats:
    pending: bool  # a full resync will start (when the rate limit allows)
    active: bool
    remaining: int  # flows of the active one not sent yet


@dataclass(frozen=True, slots=True)
class SyncStats:
    node: int
    epoch: int
    mode: str
    seq: int
    in_sync: bool
    counters: Counters  # a copy: it does not change afterwards
    rejected: dict[str, int]  # a copy: datagrams refused by reason
    resync: ResyncStats
    resend_queue_bytes: int
    peers: tuple[PeerStats, ...]
    duplicate_node: bool = False  # another host uses our node id (seen within peer_timeout)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, in the control protocol's shape."""
        return {
            "node": self.node, "epoch": self.epoch, "mode": self.mode, "seq": self.seq,
            "in_sync": self.in_sync, "counters": self.counters.as_dict(),
            "rejected": dict(self.rejected), "resync": asdict(self.resync),
            "resend_queue_bytes": self.resend_queue_bytes,
            "duplicate_node": self.duplicate_node,
            "peers": {str(p.node): {k: v for k, v in asdict(p).items() if k != "node"}
                      for p in self.peers},
        }
