"""What the replication engine tells the shell (`Engine.next_event()` / `Engine.events()`).

This module owns the event types only. Apply them in the order they come:

- `RemoteFlows(origin, flows)`: a batch of flow messages from node `origin`, in stream order;
  each item is `(key, value)` (store it) or `(key, None)` (remove the key). One event per
  datagram: the receive path allocates no object per flow.
- `ResyncStarted(origin)` / `ResyncDone(origin)`: a full resync of `origin` brackets the flows
  between them. At `ResyncStarted` mark all of `origin`'s entries; every flow of `origin`
  stored or removed afterwards unmarks its key; at `ResyncDone` drop the still-marked ones.
  `ResyncAborted(origin)` ends a bracket that will not complete: stop marking, drop nothing.
  A `ResyncStarted` while one is running restarts the marking.
- `PeerUp`, `PeerDown`, `PeerRestarted` (a new epoch; implies up): information only, entries
  are kept (a restarted peer's stream starts with a full resync that sweeps its old ones).
- `PeerForgotten(node)`: a peer down longer than `peer_expire` left the engine's table
  (information: its entries stay until a commit or purge decides).
- `DuplicateNode(node, epoch, source)`: a datagram carrying our own node id from another
  epoch (or another host): two nodes share an id and cannot replicate; log it as an error.
  Reported once per episode; `in_sync()` is false while it lasts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wire import FlowMessage


@dataclass(frozen=True, slots=True)
class RemoteFlows:
    origin: int
    flows: list[FlowMessage]  # owned by the event: do not mutate


@dataclass(frozen=True, slots=True)
class ResyncStarted:
    origin: int


@dataclass(frozen=True, slots=True)
class ResyncDone:
    origin: int


@dataclass(frozen=True, slots=True)
class ResyncAborted:
    origin: int


@dataclass(frozen=True, slots=True)
class PeerUp:
    node: int
    epoch: int


@dataclass(frozen=True, slots=True)
class PeerDown:
    node: int


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    node: int
    epoch: int


@dataclass(frozen=True, slots=True)
class PeerForgotten:
    node: int


@dataclass(frozen=True, slots=True)
class DuplicateNode:
    node: int  # our node id, used by another host
    epoch: int  # the epoch in its datagram
    source: str | None  # its address, when the transport told us


Event = (RemoteFlows | ResyncStarted | ResyncDone | ResyncAborted | PeerUp | PeerDown
         | PeerRestarted | PeerForgotten | DuplicateNode)
