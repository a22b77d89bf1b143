"""Peers' flows into this node: the engine's events applied to the external cache, or queued
for the kernel when the external cache is off (direct mode).

This module owns what the shell does with each engine event (one `match`, `assert_never` for
the ones forgotten), the validation of every peer flow before anything stores it
(`flow.filter_untrusted`; refusals counted by reason), the direct writer's queue and its
planning (latest state per flow, creates and deletes), rate-limited log lines for events
that can repeat (a duplicate node id, a peer forgotten), and the text views of cache entries
(`dump_entries`, `dump_lines`, `watch_line`: a peer's bytes that do not describe a flow are
counted or shown as such, never raised). It is pure: no trio, no socket, no clock (time is
an argument); the daemon does the kernel writes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import assert_never

from . import sync as sync_engine
from .cache import ExternalCache
from .flow import Flow, PackError, Tuple, unpack_flow, unpack_key
from .stats import DirectStats

log = logging.getLogger(__name__)

Pair = tuple[bytes, bytes | None]
Validate = Callable[[Sequence[Pair]], tuple[list[Pair], dict[str, int]]]
#: a watcher's change: event ("new", "update", "destroy"), origin (None: internal), key, value
Watch = Callable[[str, int | None, bytes, bytes | None], None]

def default_validate() -> Validate:
    """flow.filter_untrusted: every field of a peer's flow in the kernel's range."""
    from .flow import filter_untrusted
    return filter_untrusted


class LogLimiter:
    """At most one log line per kind per `interval` seconds of the caller's clock; the lines
    held back are counted and named in the next one."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def allow(self, kind: str, now: float) -> int | None:
        """None: stay quiet; else log now, and the int is how many were held back."""
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] += 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)


@dataclass(frozen=True, slots=True)
class DirectPlan:
    """One turn of the direct writer: flows to create or update, keys to delete."""

    updates: list[Flow]
    deletes: list[tuple[int, Tuple]]
    undecodable: int


def plan_direct(batch: Sequence[Pair]) -> DirectPlan:
    """The latest state per flow wins; entries whose bytes do not describe a flow are counted."""
    latest: dict[bytes, bytes | None] = dict(batch)
    ups: list[Flow] = []
    dels: list[tuple[int, Tuple]] = []
    bad = 0
    for k, v in latest.items():
        try:
            if v is None:
                dels.append(unpack_key(k))
            else:
                ups.append(unpack_flow(k, v))
        except PackError:
            bad += 1
    return DirectPlan(ups, dels, bad)


_DERIVED_ID_HINT = (
    ". node.id was derived from the sync address of a conntrackd.conf: give the nodes sync "
    "addresses that differ in their last byte, or convert with `conntrackd-py import-conf` and "
    "set node.id")


@dataclass
class Remote:
    """Applies the engine's events. `direct`: flows go to `pending` for the kernel writer
    (which `take()`s them) instead of the external cache."""

    external: ExternalCache
    direct: bool = False
    peer_timeout: float = 3.0
    validate: Validate = field(default_factory=default_validate)
    #: peers' flows refused by validation, by reason
    invalid: Counter[str] = field(default_factory=Counter)
    pending: list[Pair] = field(default_factory=list)
    #: the direct writer's queue bound: with the external cache off nothing else caps what
    #: peers can make this node hold while the writer waits for the kernel
    max_pending: int = 1 << 20
    direct_counts: DirectStats = field(default_factory=DirectStats)
    duplicate_node: int = 0
    peers_forgotten: int = 0
    limiter: LogLimiter = field(default_factory=LogLimiter)
    #: node.id came from a conntrackd.conf's sync address (Config.import_warning set)
    derived_node_id: bool = False

    def take(self) -> list[Pair]:
        """The direct writer's queue, emptied."""
        batch, self.pending = self.pending, []
        return batch

    def apply(self, ev: sync_engine.Event, now: float, watch: Watch | None = None) -> bool:
        """Apply one event; True when the direct writer has new work."""
        ext = self.external
        match ev:
            case sync_engine.RemoteFlows(origin=origin, flows=flows):
                good, refused = self.validate(flows)
                if refused:
                    self._refused(origin, refused, now)
                if watch is not None:  # before applying: "new" is a key the cache lacks
                    get = ext.get
                    changes = [("destroy" if v is None else "update"
                                if get(origin, k) is not None else "new", k, v) for k, v in good]
                if self.direct:
                    room = self.max_pending - len(self.pending)
                    if len(good) > room:
                        refused_n = len(good) - max(room, 0)
                        self.direct_counts.refused += refused_n
                        if self.limiter.allow("direct_full", now) is not None:
                            log.error("direct writer queue full (%d flows): %d flows from node "
                                      "%d refused (counted in -s direct); the kernel table "
                                      "is not keeping up", self.max_pending, refused_n, origin)
                        good = good[:max(room, 0)]
                    self.pending.extend(good)
                else:
                    ext.apply(origin, good, now)
                if watch is not None:
                    for event, k, v in changes:
                        watch(event, origin, k, v)
                return self.direct and bool(good)
            case sync_engine.ResyncAborted(origin=origin):
                log.warning("full resync from node %d aborted; its stale entries stay until the "
                            "next one", origin)
            case sync_engine.ResyncStarted(origin=origin):
                ext.begin_sweep(origin, now)
                log.info("full resync from node %d started", origin)
            case sync_engine.ResyncDone(origin=origin):
                if ext.sweeping(origin) is not None:
                    n = ext.end_sweep(origin)
                    log.info("full resync from node %d done; %d stale entries removed", origin, n)
            case sync_engine.PeerUp(node=node, epoch=epoch):
                log.info("peer node %d is up (epoch %08x)", node, epoch)
            case sync_engine.PeerRestarted(node=node, epoch=epoch):
                log.warning("peer node %d restarted (new epoch %08x)", node, epoch)
            case sync_engine.PeerDown(node=node):
                log.warning("peer node %d is down: silent for %.1f s; its %d flows are kept",
                            node, self.peer_timeout, ext.count(node))
            case sync_engine.PeerForgotten(node=node):
                self.peers_forgotten += 1
                held = self.limiter.allow("peer_forgotten", now)
                if held is not None:
                    log.info("peer node %d was down longer than sync.limits.peer_expire: "
                             "forgotten%s", node,
                             f" ({held} more peers forgotten since the last line)" if held
                             else "")
            case sync_engine.DuplicateNode(node=node, epoch=epoch, source=source):
                self.duplicate_node += 1
                held = self.limiter.allow("duplicate_node", now)
                if held is not None:
                    log.error("another host%s sends with our node id %d (epoch %08x): node ids "
                              "must be unique; not in sync until it stops%s%s",
                              f" ({source})" if source else "", node, epoch,
                              f" ({held} more such datagrams since the last line)" if held
                              else "", _DERIVED_ID_HINT if self.derived_node_id else "")
            case _:
                assert_never(ev)
        return False

    def _refused(self, origin: int, refused: dict[str, int], now: float) -> None:
        self.invalid.update(refused)
        held = self.limiter.allow("invalid_flows", now)
        if held is not None:
            log.warning("node %d sent flows out of the kernel's range, refused: %s%s", origin,
                        ", ".join(f"{n} {r}" for r, n in sorted(refused.items())),
                        f" ({held} similar batches not logged)" if held else "")


def dump_lines(pairs: Iterable[tuple[int | None, bytes, bytes]], proto: int | None,
               nat: str | None) -> tuple[list[str], int]:
    """`conntrack -L`-style lines of (origin or None, key, value) entries, filtered by protocol
    number and NAT kind ("src", "dst", "any"); and how many entries did not unpack."""
    out: list[str] = []
    bad = 0
    for o, k, v in pairs:
        try:
            f = unpack_flow(k, v)
        except PackError:  # a peer's bytes that do not describe a flow: not listed
            bad += 1
            continue
        if proto is not None and f.orig.proto != proto:
            continue
        if (nat == "src" and not f.is_snat) or (nat == "dst" and not f.is_dnat):
            continue
        if nat == "any" and not (f.is_snat or f.is_dnat):
            continue
        line = f.format()
        out.append(line if o is None else f"{line} [node={o}]")
    return out, bad


def dump_entries(which: str, internal: Iterable[tuple[bytes, bytes]] | None,
                 external: ExternalCache, proto: int | None, nat: str | None,
                 origin: int | None, raw: bool) -> list[object]:
    """`-L`/`-i` (which "internal": `internal`'s entries; None in a mode without the internal
    cache) or `-e` (the external cache, one origin's or all): `dump_lines`, or with `raw` the
    exact bytes as [origin, key hex, value hex] (for convergence checks)."""
    pairs: Iterable[tuple[int | None, bytes, bytes]]
    if which == "internal":
        if internal is None:
            return []
        pairs = ((None, k, v) for k, v in internal)
    else:
        pairs = ((o, k, v) for o, k, v, _seen in external.items(origin))
    if raw:
        return [[o, k.hex(), v.hex()] for o, k, v in pairs]
    lines, bad = dump_lines(pairs, proto, nat)
    if bad:
        log.warning("dump of the %s cache: %d entries do not describe a flow (a peer's "
                    "bytes); not listed", which, bad)
    return list(lines)


def watch_item(event: str, origin: int | None, key: bytes,
               value: bytes | None) -> list[object]:
    """One `watch` item: [event, where, origin, key hex, value hex or None], event "new",
    "update" or "destroy", where "internal" or "external" (origin None for internal). The
    client formats it (`conntrack -E` lines); the bytes are the caches' own."""
    return [event, "internal" if origin is None else "external", origin, key.hex(),
            None if value is None else value.hex()]


def watch_line(where: str, key: bytes, value: bytes | None) -> str:
    """One `watch` line for a change of the cache `where`."""
    try:
        if value is None:
            zone, orig = unpack_key(key)
            return f"[DESTROY] {where}: zone={zone} {orig.format()}"
        return f"[UPDATE] {where}: {unpack_flow(key, value).format()}"
    except PackError:  # a peer's bytes that do not describe a flow
        return (f"[{'DESTROY' if value is None else 'UPDATE'}] {where}: undecodable, "
                f"key {key.hex()}")
