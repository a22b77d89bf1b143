"""Replication of conntrack state between cluster nodes, sans I/O (proto/PROTOCOL.md).

This package owns the sync protocol: the datagram codec (`wire`), the engine that decides what
received datagrams mean and when to send what (`engine`; its sending half `sender`, which
owns its timers; each peer's state machine in one table, `peer`), the datagram builder
(`builder`: space, framing, padding, sealing), the per-mode structures (`ftfw`, `notrack`,
`alarm`), typed snapshots (`stats`) and small helpers (`seqnum`, `outbox`).
It imports no trio, opens no socket and reads no clock: time is always an argument, input is
bytes, output is bytes and events (`events`). The trio shell (daemon.py) moves bytes and time
in and out; the usage contract is in `engine`'s docstring.
"""

from __future__ import annotations

from .config import Counters, Mode, SyncConfig, config_from
from .engine import Engine
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
from .peer import PeerState
from .seqnum import MASK, add, after
from .stats import PeerStats, ResyncStats, SyncStats
from .wire import BadDatagram, Datagram, KeyRing, Reason, decode_untrusted


def new_epoch(wall_clock: float, previous: int | None = None) -> int:
    """An epoch for a daemon starting now: whole seconds of the wall clock, but always after
    `previous` (the last epoch this node used, if the shell persisted it), never 0.

    Epochs must increase across restarts (serial arithmetic, like sequence numbers): peers
    drop a datagram of an older epoch as a replay while the newer one is alive.
    """
    e = int(wall_clock) & MASK or 1
    if previous is not None and not after(e, previous):
        e = add(previous, 1) or 1
    return e


__all__ = [
    "BadDatagram", "Counters", "Datagram", "DuplicateNode", "Engine", "Event", "KeyRing", "Mode",
    "PeerDown", "PeerForgotten", "PeerRestarted", "PeerState", "PeerStats", "PeerUp", "Reason",
    "RemoteFlows", "ResyncAborted", "ResyncDone", "ResyncStarted", "ResyncStats", "SyncConfig",
    "SyncStats", "config_from", "decode_untrusted", "new_epoch",
]
