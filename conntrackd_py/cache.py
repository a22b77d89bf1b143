"""The flow caches: this node's own flows (internal) and the flows its peers own (external).

This module owns how flows are *stored* in memory: packed key bytes -> packed value bytes
(`flow.pack_key` / `flow.pack_value`), in plain dicts of bytes. At a million typical IPv4 UDP
flows that costs ~161 B per flow of Python objects, ~180-210 B resident (`bench/cache_mem.py`;
a dict of dicts costs ~1 kB, slotted objects ~730 B), and because bytes hold no references such
a dict is not tracked by the cyclic garbage collector at all: millions of cached flows add no
GC work and no GC pauses.

It also owns the cache-level rules replication relies on: reconciling with a kernel dump
(`InternalCache.reconcile`), mark-and-sweep of a peer's flows during a full resync, ALARM-mode
expiry, and the commit plan (timeout estimate, masters before RELATED flows, one winner per key).

It must not do I/O, read a clock (every `now` is an argument, float seconds of a monotonic
clock) or import trio; it knows nothing of the wire, the kernel or the replication protocol.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack

from .flow import (
    K_PROTO,
    KEY_LEN,
    V_STATUS,
    V_TIMEOUT,
    VALUE_LEN,
    Flow,
    Proto,
    Status,
    flows_of_entries,
    unpack_flow,
)

#: a peer's node id, as the replication layer names it
Origin = int

Pair = tuple[bytes, bytes]


def same_but_timeout(a: bytes, b: bytes) -> bool:
    """True if two packed values describe the same flow state apart from the timeout.

    The kernel reports the *remaining* timeout, so two dumps of an idle flow a second apart
    differ in that field only. Values that do not unpack count as different.
    """
    try:
        va = msgpack.unpackb(a, raw=False, use_list=True)
        vb = msgpack.unpackb(b, raw=False, use_list=True)
    except (ValueError, msgpack.UnpackException):
        return False
    if not (isinstance(va, list) and isinstance(vb, list) and len(va) > V_TIMEOUT
            and len(vb) > V_TIMEOUT):
        return False
    va[V_TIMEOUT] = vb[V_TIMEOUT] = None
    return bool(va == vb)


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """What `InternalCache.reconcile` changed: exactly the deltas to replicate.

    `refreshed` counts entries whose value changed in the timeout only, when the caller asked
    for those not to be reported (`ignore_timeout=True`); they are stored all the same.
    """

    added: list[Pair] = field(default_factory=list)
    updated: list[Pair] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    refreshed: int = 0


class InternalCache:
    """The node's own flows: packed key -> packed value, equal to the kernel table.

    Iterators (`items`, `flows`) are live views: do not change the cache while consuming one.
    """

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def get(self, key: bytes) -> bytes | None:
        return self._d.get(key)

    def upsert(self, key: bytes, value: bytes) -> bool:
        """Store `value` under `key`; True if the key is new or its value changed."""
        d = self._d
        if d.get(key) == value:
            return False
        d[key] = value
        return True

    def remove(self, key: bytes) -> bool:
        """Forget `key`; True if it was there."""
        return self._d.pop(key, None) is not None

    def items(self) -> Iterator[Pair]:
        return iter(self._d.items())

    def mapping(self) -> Mapping[bytes, bytes]:
        """A read-only live view (what a full resync snapshots, key and value lists at once)."""
        return MappingProxyType(self._d)

    def flows(self) -> Iterator[Flow]:
        """The cached flows as `Flow` objects, unpacked one at a time."""
        for k, v in self._d.items():
            yield unpack_flow(k, v)

    def clear(self) -> None:
        # a new dict rather than dict.clear(): gives the old table back to the allocator at once
        self._d = {}

    def load(self, pairs: Iterable[Pair]) -> None:
        """Add (or overwrite) many entries at once, then `gc.freeze()`.

        The cache itself is invisible to the GC (bytes -> bytes), but a bulk load allocates
        millions of short-lived tracked objects (tuples, lists, Flows) and that churn triggers
        full collections, each of which walks every tracked object the daemon holds. Freezing
        after the load moves everything alive now into the permanent generation, so later
        collections only look at what is allocated afterwards: no pauses that grow with the
        table. (`gc.freeze` is process-wide; it is cheap and idempotent.)
        """
        self._d.update(pairs)
        gc.freeze()

    def reconcile(self, pairs: Iterable[Pair], *, ignore_timeout: bool = False) -> ReconcileResult:
        """Make the cache equal to a fresh kernel dump, entry for entry; return the differences.

        `added` are keys only in the dump, `updated` keys whose value differs, `removed` keys
        no longer in the dump, each in dump (or, for removed, cache) order. A key repeated in
        `pairs` keeps its last value. With `ignore_timeout=True`, a value that differs only in
        the remaining timeout is stored but not reported (counted in `refreshed`): otherwise
        every idle flow would be "updated" by every dump and replicated again.
        """
        new = dict(pairs)
        old = self._d
        added: list[Pair] = []
        updated: list[Pair] = []
        refreshed = 0
        for k, v in new.items():
            was = old.get(k)
            if was is None:
                added.append((k, v))
            elif was != v:
                if ignore_timeout and same_but_timeout(was, v):
                    refreshed += 1
                else:
                    updated.append((k, v))
        removed = [k for k in old if k not in new] if len(old) + len(added) != len(new) else []
        self._d = new
        return ReconcileResult(added, updated, removed, refreshed)


# --- external cache ------------------------------------------------------------------------
#
# Each value is stored as packed value + a 4-byte big-endian "seen" stamp: deciseconds since
# the cache epoch (the first `now` it was given, unless set). uint32 deciseconds last 13.6
# years; big-endian makes `stamp_a < stamp_b` a plain bytes comparison. Appending costs ~4 B
# per flow, where a parallel dict of floats would cost ~60 B.

_TICKS = 10  # stamps per second
_STAMP_MAX = 0xFFFFFFFF

#: the timeout a committed flow gets when its estimate has run out (conntrackd does the same):
#: the kernel refreshes timeouts on traffic without sending an event, so a peer's flow whose
#: estimate reached 0 is most likely alive, and committing it briefly is far cheaper than
#: breaking a live connection on failover.
STALE_COMMIT_TIMEOUT = 60


class ExternalCache:
    """Flows owned by peers, one table per origin node, each entry with when it was last seen.

    Times (`now`, `seen`) are float seconds of one monotonic clock, the caller's; `seen` comes
    back rounded to 0.1 s. The epoch is `epoch` or else the first `now` given; a time before it
    is stored as the epoch (a monotonic clock never goes there). ~165 B per flow at 1M flows.
    Iterators (`items`) are live views: do not change the cache while consuming one.

    With `max_per_origin`, an origin holds at most that many entries (conntrackd's HashLimit):
    a new key beyond it is refused, not stored, and counted in `refused` (origin -> how many,
    never reset); a change or refresh of a key it holds is never refused, and removals, sweeps
    and purges make room again.
    """

    __slots__ = ("_by_origin", "_epoch", "_last_now", "_last_stamp", "_sweeps", "max_per_origin",
                 "refused", "undecodable")

    def __init__(self, max_per_origin: int | None = None, *, epoch: float | None = None) -> None:
        self.max_per_origin = max_per_origin
        #: origin -> new keys refused because the origin held `max_per_origin` entries
        self.refused: dict[Origin, int] = {}
        self._by_origin: dict[Origin, dict[bytes, bytes]] = {}
        self._epoch = epoch
        self._last_now = math.nan
        self._last_stamp = b"\0\0\0\0"
        # origin -> (started, keys not refreshed yet since begin_sweep)
        self._sweeps: dict[Origin, tuple[float, set[bytes]]] = {}
        #: entries `commit_plan` skipped because their bytes did not unpack (a bug upstream)
        self.undecodable = 0

    # --- time stamps ---------------------------------------------------------------------
    def _ticks(self, t: float) -> int:
        if self._epoch is None:
            self._epoch = t
        return min(max(round((t - self._epoch) * _TICKS), 0), _STAMP_MAX)

    def _stamp(self, now: float) -> bytes:
        # a batch of upserts shares one `now`: convert it once
        if now != self._last_now:
            self._last_stamp = self._ticks(now).to_bytes(4, "big")
            self._last_now = now
        return self._last_stamp

    def _seen(self, stored: bytes) -> float:
        assert self._epoch is not None  # something is stored, so a stamp was made
        return self._epoch + int.from_bytes(stored[-4:], "big") / _TICKS

    # --- entries -------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(d) for d in self._by_origin.values())

    def count(self, origin: Origin) -> int:
        d = self._by_origin.get(origin)
        return 0 if d is None else len(d)

    def origins(self) -> list[Origin]:
        """Origins that have at least one entry, in ascending order."""
        return sorted(o for o, d in self._by_origin.items() if d)

    def upsert(self, origin: Origin, key: bytes, value: bytes, now: float) -> bool:
        """Store a peer's flow seen at `now` (one `apply` update); True if new or changed (a
        refresh alone, or a refusal: False)."""
        d = self._by_origin.get(origin)
        old = None if d is None else d.get(key)
        refused = self.refused.get(origin, 0)
        self.apply(origin, ((key, value),), now)
        if old is None:
            return self.refused.get(origin, 0) == refused
        return len(old) != len(value) + 4 or not old.startswith(value)

    def apply(self, origin: Origin, flows: Sequence[tuple[bytes, bytes | None]],
              now: float) -> None:
        """A peer's batch of changes, in order: (key, value) stores the flow as seen at `now`,
        (key, None) removes it. One call per received datagram: a full resync arrives as
        thousands of these per second."""
        d = self._by_origin.get(origin)
        if d is None:
            d = self._by_origin[origin] = {}
        stamp = self._stamp(now)
        touched: list[bytes] = []
        note = touched.append
        pop = d.pop
        cap = self.max_per_origin
        if cap is None or len(d) + len(flows) <= cap:  # the batch cannot reach the cap
            for k, v in flows:
                if v is None:
                    pop(k, None)
                else:
                    d[k] = v + stamp
                note(k)
        else:
            refused = 0
            for k, v in flows:
                if v is None:
                    pop(k, None)
                elif len(d) < cap or k in d:
                    d[k] = v + stamp
                else:
                    refused += 1
                    continue
                note(k)
            if refused:
                self.refused[origin] = self.refused.get(origin, 0) + refused
        if not d:
            del self._by_origin[origin]
        sweep = self._sweeps.get(origin) if self._sweeps else None
        if sweep is not None:
            sweep[1].difference_update(touched)

    def remove(self, origin: Origin, key: bytes) -> bool:
        """Forget a peer's flow (one `apply` removal); False if it was not there."""
        d = self._by_origin.get(origin)
        if d is None or key not in d:
            return False
        # an entry exists, so a stamp was made and `_last_now` is a real time (unused here)
        self.apply(origin, ((key, None),), self._last_now)
        return True

    def get(self, origin: Origin, key: bytes) -> tuple[bytes, float] | None:
        """(packed value, seen) or None."""
        d = self._by_origin.get(origin)
        stored = None if d is None else d.get(key)
        if stored is None:
            return None
        return stored[:-4], self._seen(stored)

    def items(self, origin: Origin | None = None) -> Iterator[tuple[Origin, bytes, bytes, float]]:
        """(origin, key, packed value, seen) for one origin or all, origins in ascending order."""
        origins = self.origins() if origin is None else [origin]
        epoch = self._epoch
        for o in origins:
            for k, stored in self._by_origin.get(o, {}).items():
                assert epoch is not None
                yield o, k, stored[:-4], epoch + int.from_bytes(stored[-4:], "big") / _TICKS

    def purge(self, origin: Origin | None = None) -> int:
        """Drop every entry of `origin` (or of all origins); return how many."""
        if origin is None:
            n = len(self)
            self._by_origin = {}
            for _, keys in self._sweeps.values():
                keys.clear()
            return n
        d = self._by_origin.pop(origin, None)
        sweep = self._sweeps.get(origin)
        if sweep is not None:
            sweep[1].clear()
        return 0 if d is None else len(d)

    # --- full resync: mark and sweep -----------------------------------------------------
    def begin_sweep(self, origin: Origin, now: float) -> None:
        """Start a full resync of `origin`: every entry it has now is marked.

        Upserts of the origin unmark entries; `remove` and `purge` unmark them too. The marks
        are a set of the current keys (sharing the key objects: ~34 B per entry at 1M, for the
        duration of the resync only), which makes the sweep exact whatever the clock does:
        an entry refreshed in the same tick as `begin_sweep` is still told apart.
        Beginning again restarts the sweep.
        """
        self._sweeps[origin] = (now, set(self._by_origin.get(origin, ())))

    def sweeping(self, origin: Origin) -> float | None:
        """When the sweep of `origin` began, or None if none is running."""
        sweep = self._sweeps.get(origin)
        return None if sweep is None else sweep[0]

    def end_sweep(self, origin: Origin) -> int:
        """Finish the resync of `origin`: drop its entries not refreshed since `begin_sweep`.

        Returns how many were dropped (0 if no sweep was running).
        """
        sweep = self._sweeps.pop(origin, None)
        d = self._by_origin.get(origin)
        if sweep is None or d is None:
            return 0
        stale = sweep[1]
        for k in stale:
            del d[k]
        if not d:
            del self._by_origin[origin]
        return len(stale)

    def expire(self, now: float, timeout: float) -> int:
        """ALARM mode: drop entries not refreshed within `timeout` seconds; return how many."""
        if self._epoch is None:
            return 0
        limit = round((now - timeout - self._epoch) * _TICKS)
        if limit <= 0:
            return 0
        limit_b = min(limit, _STAMP_MAX).to_bytes(4, "big")
        n = 0
        for o in list(self._by_origin):
            d = self._by_origin[o]
            old = [k for k, stored in d.items() if stored[-4:] < limit_b]
            if not old:
                continue
            sweep = self._sweeps.get(o)
            for k in old:
                del d[k]
                if sweep is not None:
                    sweep[1].discard(k)
            if not d:
                del self._by_origin[o]
            n += len(old)
        return n

    # --- commit ------------------------------------------------------------------------
    def _winners(self) -> Iterator[tuple[bytes, bytes]]:
        """One (key, stored) per key: the latest seen wins; on a tie, the higher origin id."""
        tables = [self._by_origin[o] for o in self.origins()]
        if len(tables) == 1:
            yield from tables[0].items()
            return
        best: dict[bytes, bytes] = {}
        for d in tables:  # ascending origin: `>=` lets the higher origin win ties
            for k, stored in d.items():
                cur = best.get(k)
                if cur is None or stored[-4:] >= cur[-4:]:
                    best[k] = stored
        yield from best.items()

    def commit_plan(self, now: float, *, commit_timeout: int | None = None,
                    stale_timeout: int | None = STALE_COMMIT_TIMEOUT) -> list[Flow]:
        """The flows to create in the kernel when this node takes over, in a safe order:
        `commit_entries` as Flows, each after its master (`masters_first`)."""
        flows, bad = flows_of_entries(self.commit_entries(
            now, commit_timeout=commit_timeout, stale_timeout=stale_timeout))
        self.undecodable += bad
        return flows

    def commit_entries(self, now: float, *, commit_timeout: int | None = None,
                       stale_timeout: int | None = STALE_COMMIT_TIMEOUT
                       ) -> list[tuple[list[Any], list[Any]]]:
        """What a takeover commits: each entry's key and value as unpacked lists (flow.py's
        packed forms, the value's timeout already adjusted), in commit order.

        Timeouts: `commit_timeout`, if given, for every flow (conntrackd's CommitTimeout).
        Otherwise the estimate `timeout - (now - seen)`, rounded up (so at least 1 s while any
        time is left); when nothing is left, `stale_timeout` (see STALE_COMMIT_TIMEOUT), or
        the flow is skipped if `stale_timeout` is None.

        Order: assured TCP connections first, then most recently refreshed first (masters are
        the caller's business: `commit_plan`). A key held by several origins is committed
        once, from the origin that refreshed it last (a tie goes to the higher origin id).
        Entries that do not unpack are skipped and counted in `undecodable` rather than
        aborting a failover commit.
        """
        epoch = self._epoch
        out: list[tuple[list[Any], list[Any]]] = []
        append = out.append
        unpackb = msgpack.unpackb
        # Most recently refreshed first: live connections (the ones a failover must save) get
        # into the kernel before idle ones, so the outage does not grow with the table size.
        winners = sorted(self._winners(), key=lambda kv: kv[1][-4:], reverse=True)
        last_stamp = b""  # sorted by stamp: the time since it was seen changes rarely
        age = 0.0
        for key, stored in winners:
            assert epoch is not None
            try:
                k = unpackb(key, raw=False, use_list=True)
                v = unpackb(stored[:-4], raw=False, use_list=True)
            except (ValueError, msgpack.UnpackException):
                self.undecodable += 1
                continue
            if (type(k) is not list or len(k) != KEY_LEN or type(v) is not list
                    or len(v) < VALUE_LEN or type(v[V_STATUS]) is not int
                    or type(v[V_TIMEOUT]) is not int):
                self.undecodable += 1
                continue
            if commit_timeout is not None:
                v[V_TIMEOUT] = commit_timeout
            else:
                stamp = stored[-4:]
                if stamp != last_stamp:
                    last_stamp = stamp
                    age = max(now - (epoch + int.from_bytes(stamp, "big") / _TICKS), 0.0)
                left = math.ceil(v[V_TIMEOUT] - age)
                if left <= 0:
                    if stale_timeout is None:
                        continue
                    left = stale_timeout
                v[V_TIMEOUT] = left
            append((k, v))
        # Assured TCP connections first: they are what a takeover must keep alive, and they
        # emit no events between state changes, so recency alone would put them last.
        out.sort(key=lambda kv: not (kv[0][K_PROTO] == _TCP and kv[1][V_STATUS] & _ASSURED))
        return out


_TCP = int(Proto.TCP)
_ASSURED = int(Status.ASSURED)
