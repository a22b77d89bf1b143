"""The node's own flows: kernel events and dumps kept in the internal cache, deltas handed on.

This module owns the rule "the internal cache equals the kernel table": it loads a dump at
start, applies events, and after an overrun reconciles with a fresh dump. Every change it makes
is reported to `on_delta(key, value_or_None)` (None = destroyed), which is how replication
learns what to send. It does no replication and no filtering policy of its own (a `accept`
predicate decides which flows are tracked).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .cache import InternalCache
from .flow import Flow, pack_key, pack_value
from .kernel import codec
from .kernel.events import EventBatch, EventSource
from .kernel.nl import set_sysctl
from .kernel.table import Table

log = logging.getLogger(__name__)

Delta = Callable[[bytes, bytes | None], None]
Change = Callable[[str, bytes, bytes | None], None]


@dataclass
class TrackerStats:
    dumps: int = 0
    reconciles: int = 0
    reconcile_added: int = 0
    reconcile_updated: int = 0
    reconcile_removed: int = 0
    ignored: int = 0
    last_dump_seconds: float = 0.0


def _accept_all(flow: Flow) -> bool:
    return True


class Tracker:
    def __init__(self, *, netns_name: str | None = None, rcvbuf: int = 64 << 20,
                 reliable: bool = False, set_events_sysctl: bool = True,
                 accept: Callable[[Flow], bool] = _accept_all,
                 on_delta: Delta | None = None,
                 on_flow_event: Callable[[codec.EventType, Flow], None] | None = None,
                 cache: InternalCache | None = None) -> None:
        self.netns_name = netns_name
        self.cache = cache if cache is not None else InternalCache()
        self.accept = accept
        self.on_delta = on_delta
        self.on_flow_event = on_flow_event
        #: while someone watches (-E): each change as ("new"|"update"|"destroy", key, value)
        self.on_change: Change | None = None
        self.stats = TrackerStats()
        if set_events_sysctl:
            try:
                old = set_sysctl("net.netfilter.nf_conntrack_events", 1, netns_name)
            except OSError as e:  # e.g. /proc/sys read-only in a container
                old = None
                log.warning("cannot set net.netfilter.nf_conntrack_events=1 (%s): flows created "
                            "with no listener may never emit events; set it on the host", e)
            if old is not None and old != "1":
                log.info("set net.netfilter.nf_conntrack_events=1 (was %s) so that every flow "
                         "emits events", old)
        self.events = EventSource(rcvbuf=rcvbuf, reliable=reliable, netns_name=netns_name)
        self.table = Table(netns_name)
        self.ready = trio.Event()

    def close(self) -> None:
        self.events.close()
        self.table.close()

    async def _dump_pairs(self) -> list[tuple[bytes, bytes]]:
        pairs: list[tuple[bytes, bytes]] = []
        accept = self.accept
        t0 = time.perf_counter()

        def take(flows: list[Flow]) -> None:
            for f in flows:
                if accept(f):
                    pairs.append((pack_key(f.zone, f.orig), pack_value(f)))

        await self.table.dump_into(take)
        self.stats.dumps += 1
        self.stats.last_dump_seconds = time.perf_counter() - t0
        return pairs

    async def resync_from_kernel(self) -> None:
        """Make the cache equal to a fresh dump; report every difference as a delta."""
        pairs = await self._dump_pairs()
        # a dump reports the remaining timeout: a change of that alone is not news for peers
        res = self.cache.reconcile(pairs, ignore_timeout=True)
        st = self.stats
        st.reconciles += 1
        st.reconcile_added += len(res.added)
        st.reconcile_updated += len(res.updated)
        st.reconcile_removed += len(res.removed)
        if res.added or res.updated or res.removed:
            log.info("reconciled internal cache with the kernel: %d added, %d updated, "
                     "%d removed", len(res.added), len(res.updated), len(res.removed))
        if self.on_delta is not None:
            for k, v in res.added:
                self.on_delta(k, v)
            for k, v in res.updated:
                self.on_delta(k, v)
            for k in res.removed:
                self.on_delta(k, None)
        change = self.on_change
        if change is not None:
            for k, v in res.added:
                change("new", k, v)
            for k, v in res.updated:
                change("update", k, v)
            for k in res.removed:
                change("destroy", k, None)
        gc.freeze()

    def apply(self, batch: EventBatch) -> None:
        cache = self.cache
        accept = self.accept
        on_delta = self.on_delta
        on_flow = self.on_flow_event
        change = self.on_change
        destroy = codec.EventType.DESTROY
        for kind, flow in batch:
            if on_flow is not None:
                on_flow(kind, flow)
            if not accept(flow):
                self.stats.ignored += 1
                continue
            key = pack_key(flow.zone, flow.orig)
            if kind == destroy:
                if cache.remove(key):
                    if on_delta is not None:
                        on_delta(key, None)
                    if change is not None:
                        change("destroy", key, None)
            else:
                value = pack_value(flow)
                if change is not None:  # only while watched: one more lookup per event
                    event = "update" if key in cache else "new"
                if cache.upsert(key, value):
                    if on_delta is not None:
                        on_delta(key, value)
                    if change is not None:
                        change(event, key, value)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dump, then read events. The socket subscribed in __init__, so events that race the
        dump queue up and are applied after it, in kernel order: nothing is missed or undone."""
        await self.resync_from_kernel()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.events.run, self.apply, self.resync_from_kernel)
            self.ready.set()
            task_status.started()
