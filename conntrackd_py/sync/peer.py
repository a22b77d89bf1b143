"""What a receiver knows of one peer: its resync state machine, in one table (h11's habit).

This module owns `PeerState`, `PeerInput` and `TRANSITIONS`, the only place that says how a
peer's replication state changes, and `Peer`, the per-peer record the engine keeps. The
engine turns datagrams and timers into inputs and performs the effects a transition implies
(events, resync requests); nothing else assigns `Peer.state`.

States, from the receiver's side (what do we hold of this peer's flows?):

- NEED_RESYNC: we want a complete full resync of its flows (first contact, a restart, an
  operator's request, a bracket cut by a gap); a RESYNC_REQUEST is repeated until one begins.
- IN_RESYNC: between its RESYNC_BEGIN and RESYNC_END, delivered in order (the mark and sweep
  of events.py runs).
- SYNCED: a complete full resync arrived and the stream has been continuous since.
- REFRESHING: SYNCED, and another full resync of it is arriving (sent for another node, or
  periodic): we still count as in sync; its end sweeps as usual.
- DOUBTFUL: the stream's continuity cannot be trusted (a sequence number far outside the
  plausible window, or a stream stuck past `stall_timeout`). Nothing is delivered; the stream
  is re-anchored at the next RESYNC_BEGIN, which a repeated request asks for.

Liveness (`up`) is separate: a peer goes down when silent and comes back when heard; its state
is kept across. `in_sync()` needs every live peer SYNCED or REFRESHING.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from .ftfw import ReliableStream
from .notrack import BestEffortStream
from .wire import Datagram

Stream = ReliableStream[Datagram] | BestEffortStream[Datagram]

RECENT = 1024  # datagrams remembered per peer without auth, to tell a forged twin


class PeerState(Enum):
    NEED_RESYNC = "need_resync"
    IN_RESYNC = "in_resync"
    SYNCED = "synced"
    REFRESHING = "refreshing"
    DOUBTFUL = "doubtful"


class PeerInput(Enum):
    CONTACT = "contact"  # first datagram of a (node, epoch): a new peer or a confirmed restart
    ASK = "ask"  # we want its flows again (operator, startup)
    BEGIN = "begin"  # its RESYNC_BEGIN delivered in order (or re-anchoring a doubted stream)
    END = "end"  # its RESYNC_END delivered in order
    GAP = "gap"  # datagrams of its stream given up (a resync jump, best-effort loss)
    DOUBT = "doubt"  # continuity cannot be trusted any more


S, In = PeerState, PeerInput

#: (state, input) -> next state, for every pair. Effects the engine performs on a transition:
#: leaving a bracket (IN_RESYNC, REFRESHING) other than by END reports ResyncAborted, and BEGIN
#: in one restarts it; BEGIN into a bracket reports ResyncStarted; END out of one reports
#: ResyncDone; entering NEED_RESYNC or DOUBTFUL (or ASK/CONTACT there) schedules a
#: RESYNC_REQUEST now; reaching SYNCED cancels it.
TRANSITIONS: dict[tuple[PeerState, PeerInput], PeerState] = {
    (S.NEED_RESYNC, In.CONTACT): S.NEED_RESYNC,
    (S.NEED_RESYNC, In.ASK): S.NEED_RESYNC,
    (S.NEED_RESYNC, In.BEGIN): S.IN_RESYNC,
    (S.NEED_RESYNC, In.END): S.NEED_RESYNC,  # an end without its begin proves nothing
    (S.NEED_RESYNC, In.GAP): S.NEED_RESYNC,
    (S.NEED_RESYNC, In.DOUBT): S.DOUBTFUL,
    (S.IN_RESYNC, In.CONTACT): S.NEED_RESYNC,  # aborted: a new epoch's stream
    (S.IN_RESYNC, In.ASK): S.IN_RESYNC,  # the one arriving will do
    (S.IN_RESYNC, In.BEGIN): S.IN_RESYNC,  # a newer one restarts the marking
    (S.IN_RESYNC, In.END): S.SYNCED,
    (S.IN_RESYNC, In.GAP): S.NEED_RESYNC,  # aborted: its sweep would drop flows we missed
    (S.IN_RESYNC, In.DOUBT): S.DOUBTFUL,  # aborted
    (S.SYNCED, In.CONTACT): S.NEED_RESYNC,
    (S.SYNCED, In.ASK): S.NEED_RESYNC,
    (S.SYNCED, In.BEGIN): S.REFRESHING,  # one sent for another node: swept all the same
    (S.SYNCED, In.END): S.SYNCED,
    (S.SYNCED, In.GAP): S.SYNCED,  # FTFW: only a jump to a BEGIN (which follows); else lossy
    (S.SYNCED, In.DOUBT): S.DOUBTFUL,
    (S.REFRESHING, In.CONTACT): S.NEED_RESYNC,  # aborted
    (S.REFRESHING, In.ASK): S.IN_RESYNC,  # this one will do, but until it ends we ask
    (S.REFRESHING, In.BEGIN): S.REFRESHING,
    (S.REFRESHING, In.END): S.SYNCED,
    (S.REFRESHING, In.GAP): S.SYNCED,  # aborted; what was lost is as in SYNCED
    (S.REFRESHING, In.DOUBT): S.DOUBTFUL,  # aborted
    (S.DOUBTFUL, In.CONTACT): S.NEED_RESYNC,
    (S.DOUBTFUL, In.ASK): S.DOUBTFUL,  # already asking
    (S.DOUBTFUL, In.BEGIN): S.IN_RESYNC,  # the stream re-anchors there
    (S.DOUBTFUL, In.END): S.DOUBTFUL,
    (S.DOUBTFUL, In.GAP): S.DOUBTFUL,
    (S.DOUBTFUL, In.DOUBT): S.DOUBTFUL,
}


class Peer:
    """One other node (and its current epoch's stream), as the engine tracks it."""

    __slots__ = ("_order", "acked", "behind_since", "bracket_at", "epoch", "last_heard",
                 "last_seen", "node", "past_epochs", "recent", "request_due", "stall_since",
                 "stall_target", "state", "stream", "tokens", "up")

    def __init__(self, node: int, epoch: int, stream: Stream, now: float) -> None:
        self.node = node
        self.epoch = epoch
        self.stream = stream
        self.state = PeerState.NEED_RESYNC
        self.last_seen = now  # last datagram accepted (liveness)
        self.last_heard = now  # unauthenticated: last datagram of its node, usable or not
        self.up = True
        self.acked: int | None = None  # our seq it has acked (our current epoch)
        self.request_due: float | None = now  # when to (re)send it a RESYNC_REQUEST
        # stuck-stream detection: the backlog known at `stall_since` must be resolved
        # (`expected` past `stall_target`) within stall_timeout
        self.stall_since: float | None = None
        self.stall_target = 0
        self.behind_since: float | None = None  # without auth: heard below its anchor
        self.bracket_at = now  # in a bracket: when its BEGIN or its last bulk arrived
        self.tokens = 0.0  # retransmission budget, bytes (see SyncConfig.resend_ratio)
        self.recent: dict[int, bytes] = {}  # seq -> the datagram accepted (no auth only)
        self._order: deque[int] = deque()
        # epochs of it we followed before: never again (a replay), even once it is silent
        self.past_epochs: deque[int] = deque(maxlen=8)

    def forget_recent(self) -> None:
        self.recent.clear()
        self._order.clear()

    def remember(self, seq: int, data: bytes) -> None:
        """Keep the last RECENT datagrams accepted, by number (a reference each)."""
        recent = self.recent
        if seq not in recent:
            self._order.append(seq)
            if len(self._order) > RECENT:
                recent.pop(self._order.popleft(), None)
        recent[seq] = data

    def handle(self, event: PeerInput) -> tuple[PeerState, PeerState]:
        """Apply `event`; returns (old state, new state)."""
        old = self.state
        self.state = TRANSITIONS[old, event]
        return old, self.state
