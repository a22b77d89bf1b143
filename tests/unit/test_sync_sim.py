"""Replication engines on a scripted lossy bus with a hand-advanced clock: convergence proofs.

The harness here (`Cluster`, `Bus`, `Node`, `Workload`) is shared by the other test_sync_*
modules. A `Node` is what the daemon does around an `Engine`: an internal dict (the kernel
table's flows) that `source()` reads, and one external dict per origin kept by applying the
engine's events, with mark-and-sweep on ResyncStarted/ResyncDone exactly as events.py says.
The `Bus` is a multicast link: each datagram goes to every other attached node, independently
dropped, duplicated and delayed (so reordered) by a seeded random generator. Time only moves
when the harness moves it, to the next delivery or engine timer, so runs are deterministic.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from conntrackd_py.flow import Flow, Status, Tuple, pack_flow, pack_value
from conntrackd_py.sync import (
    Engine,
    PeerDown,
    PeerRestarted,
    PeerUp,
    RemoteFlows,
    ResyncAborted,
    ResyncDone,
    ResyncStarted,
    SyncConfig,
)

# --- flows -----------------------------------------------------------------------------------


def udp_flow(node: int, i: int, timeout: int = 30) -> Flow:
    """A typical IPv4 UDP flow (client 10.<node>.x.y -> 192.168.1.2:53), as the kernel has it."""
    src = bytes((10, node & 0xFF, (i >> 8) & 0xFF, i & 0xFF))
    dst = bytes((192, 168, 1, 2))
    orig = Tuple(src, dst, 17, 1024 + (i * 7919) % 60000, 53)
    return Flow(orig=orig, reply=orig.invert(),
                status=int(Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED
                           | Status.SRC_NAT_DONE | Status.DST_NAT_DONE), timeout=timeout)


def tcp_flow(node: int, i: int) -> Flow:
    src = bytes((172, 16, node & 0xFF, i & 0xFF))
    orig = Tuple(src, bytes((10, 9, 8, 7)), 6, 30000 + i, 443)
    return Flow(orig=orig, reply=orig.invert(), status=int(Status.CONFIRMED | Status.ASSURED),
                timeout=432000, state=3, tcp_flags_orig=0x2B, tcp_flags_reply=0x23,
                tcp_wscale_orig=7, tcp_wscale_reply=7)


# --- the bus ----------------------------------------------------------------------------------


@dataclass
class Faults:
    loss: float = 0.0
    dup: float = 0.0
    delay: tuple[float, float] = (0.0002, 0.0008)  # uniform; overlapping delays reorder


class Bus:
    def __init__(self, seed: int, faults: Faults | None = None) -> None:
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.nodes: dict[int, Node] = {}
        self._q: list[tuple[float, int, int, int, bytes]] = []
        self._n = 0
        self.sent = 0
        self.dropped = 0
        self.tap: Callable[[int, int, bytes], bool] | None = None  # (src, dst, data) -> deliver?

    def send(self, src: int, data: bytes, now: float) -> None:
        self.sent += 1
        f = self.faults
        for dst in self.nodes:
            if dst == src:
                continue
            copies = 2 if f.dup and self.rng.random() < f.dup else 1
            for _ in range(copies):
                if f.loss and self.rng.random() < f.loss:
                    self.dropped += 1
                    continue
                t = now + self.rng.uniform(*f.delay)
                self._n += 1
                heapq.heappush(self._q, (t, self._n, src, dst, data))

    def next_time(self) -> float | None:
        return self._q[0][0] if self._q else None

    def pop_due(self, now: float) -> list[tuple[int, int, bytes]]:
        out = []
        while self._q and self._q[0][0] <= now:
            _, _, src, dst, data = heapq.heappop(self._q)
            if self.tap is None or self.tap(src, dst, data):
                out.append((src, dst, data))
        return out

    def in_flight(self) -> int:
        return len(self._q)


# --- a node: engine + internal dict + external views ------------------------------------------


class Node:
    def __init__(self, cluster: Cluster, node_id: int, epoch: int, **cfg: Any) -> None:
        self.cluster = cluster
        self.id = node_id
        self.internal: dict[bytes, bytes] = {}
        self.views: dict[int, dict[bytes, bytes]] = {}
        self.marks: dict[int, set[bytes]] = {}
        self.log: list[tuple[float, Any]] = []  # non-flow events with their time
        self.cfg = SyncConfig(node_id=node_id, **cfg)
        self.engine = Engine(self.cfg, epoch, source=lambda: self.internal.items(),
                             now=cluster.now)
        self.attached = True

    # local changes (the tracker's job in the daemon: cache first, then the engine)
    def update(self, key: bytes, value: bytes) -> None:
        self.internal[key] = value
        self.engine.local_update(key, value, self.cluster.now)

    def destroy(self, key: bytes) -> None:
        del self.internal[key]
        self.engine.local_destroy(key, self.cluster.now)

    def restart(self, epoch: int, **cfg: Any) -> None:
        """A new daemon on this node: external views are lost, the internal dict (the kernel
        table) survives."""
        self.views.clear()
        self.marks.clear()
        self.cfg = replace(self.cfg, **cfg)
        self.engine = Engine(self.cfg, epoch, source=lambda: self.internal.items(),
                             now=self.cluster.now)

    def apply(self, ev: Any) -> None:
        if isinstance(ev, RemoteFlows):
            view = self.views.setdefault(ev.origin, {})
            marks = self.marks.get(ev.origin)
            for k, v in ev.flows:
                if v is None:
                    view.pop(k, None)
                else:
                    view[k] = v
                if marks is not None:
                    marks.discard(k)
            return
        self.log.append((self.cluster.now, ev))
        if isinstance(ev, ResyncStarted):
            self.marks[ev.origin] = set(self.views.get(ev.origin, ()))
        elif isinstance(ev, ResyncDone):
            view = self.views.setdefault(ev.origin, {})
            for k in self.marks.pop(ev.origin, ()):
                del view[k]
        elif isinstance(ev, ResyncAborted):
            self.marks.pop(ev.origin, None)

    def pump(self) -> None:
        now = self.cluster.now
        for d in self.engine.datagrams_to_send(now):
            if self.attached:
                self.cluster.bus.send(self.id, d, now)
        for ev in self.engine.events():
            self.apply(ev)

    def events_of(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.log if isinstance(e, kind)]


class Cluster:
    def __init__(self, n: int = 2, *, seed: int = 1, faults: Faults | None = None,
                 **cfg: Any) -> None:
        self.now = 0.0
        self.bus = Bus(seed, faults)
        self.nodes: dict[int, Node] = {}
        for i in range(1, n + 1):
            self.add(i, epoch=1000 + i, **cfg)

    def add(self, node_id: int, epoch: int, **cfg: Any) -> Node:
        node = Node(self, node_id, epoch, **cfg)
        self.nodes[node_id] = node
        self.bus.nodes[node_id] = node
        return node

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def step(self, limit: float) -> bool:
        """Advance to the next delivery or timer (at most `limit`); False if none before it."""
        cands = [t for t in (n.engine.get_timer() for n in self.nodes.values()) if t is not None]
        bt = self.bus.next_time()
        if bt is not None:
            cands.append(bt)
        t = min(cands, default=None)
        if t is None or t > limit:
            return False
        self.now = max(self.now, t)
        touched = set()
        for _src, dst, data in self.bus.pop_due(self.now):
            node = self.nodes.get(dst)
            if node is None or not node.attached:
                continue
            node.engine.receive_datagram(data, self.now)
            touched.add(dst)
        for node in self.nodes.values():
            timer = node.engine.get_timer()
            if timer is not None and timer <= self.now:
                node.engine.handle_timer(self.now)
                touched.add(node.id)
        for i in sorted(touched):
            self.nodes[i].pump()
        return True

    def run_until(self, t: float, max_steps: int = 500_000) -> None:
        stuck = 0
        for _ in range(max_steps):
            before = self.now
            if not self.step(t):
                break
            stuck = stuck + 1 if self.now == before else 0
            if stuck > 20_000:  # a timer that never moves on: an engine bug
                raise AssertionError(f"time stuck at {self.now}: "
                                     f"{[n.engine.get_timer() for n in self.nodes.values()]}")
        else:
            raise AssertionError("the cluster does not settle: too many steps")
        self.now = max(self.now, t)

    def run(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def pump_all(self) -> None:
        for node in self.nodes.values():
            node.pump()

    # the property every test ends with
    def mismatches(self) -> list[str]:
        out = []
        for a in self.nodes.values():
            if not a.attached:
                continue
            for b in self.nodes.values():
                if b is a or not b.attached:
                    continue
                view = a.views.get(b.id, {})
                if view != b.internal:
                    missing = len(b.internal.keys() - view.keys())
                    extra = len(view.keys() - b.internal.keys())
                    stale = sum(1 for k in view.keys() & b.internal.keys()
                                if view[k] != b.internal[k])
                    out.append(f"node {a.id}'s view of {b.id}: {missing} missing, "
                               f"{extra} extra, {stale} stale")
        return out

    def assert_converged(self) -> None:
        assert self.mismatches() == []
        for n in self.nodes.values():
            if n.attached:
                assert n.engine.in_sync(), f"node {n.id} not in sync: {n.engine.stats()}"


@dataclass
class Workload:
    """Random creates, updates and destroys on every node, in batches over time."""

    cluster: Cluster
    seed: int = 7
    creates: int = 1500
    batch: int = 50
    interval: float = 0.01
    rng: random.Random = field(init=False)
    flows: dict[int, dict[bytes, Flow]] = field(default_factory=dict)
    counters: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def one_batch(self, node: Node) -> None:
        mine = self.flows.setdefault(node.id, {})
        for _ in range(self.batch):
            r = self.rng.random()
            if r < 0.6 or len(mine) < 10:
                i = self.counters.get(node.id, 0)
                self.counters[node.id] = i + 1
                f = udp_flow(node.id, i) if i % 5 else tcp_flow(node.id, i)
                k, v = pack_flow(f)
                mine[k] = f
                node.update(k, v)
            elif r < 0.85:
                k = self.rng.choice(list(mine))
                f = mine[k] = mine[k].with_(timeout=self.rng.randrange(1, 600),
                                            mark=self.rng.randrange(4))
                node.update(k, pack_value(f))
            else:
                k = self.rng.choice(list(mine))
                del mine[k]
                node.destroy(k)

    def run(self, nodes: Iterable[Node] | None = None) -> None:
        """Play `creates` ops per node (roughly), interleaved with the cluster's time."""
        nodes = list(nodes or self.cluster.nodes.values())
        rounds = max(1, int(self.creates / 0.6 / self.batch))
        for _ in range(rounds):
            for node in nodes:
                self.one_batch(node)
                node.pump()
            self.cluster.run(self.interval)


# --- convergence under faults -----------------------------------------------------------------


def _converge(cluster: Cluster, seconds: float = 10.0) -> None:
    cluster.bus.faults = Faults()
    cluster.run(seconds)
    cluster.assert_converged()


@pytest.mark.parametrize("loss", [0.0, 0.05, 0.20])
def test_two_nodes_converge_with_loss_from_time_zero(loss: float) -> None:
    c = Cluster(2, seed=11, faults=Faults(loss=loss, dup=0.02, delay=(0.0001, 0.003)))
    c.pump_all()
    Workload(c, creates=2000).run()
    _converge(c)
    if loss:
        assert c[1].engine.counters.nacks_sent + c[2].engine.counters.nacks_sent > 0
        assert c[1].engine.counters.retransmitted + c[2].engine.counters.retransmitted > 0


@pytest.mark.parametrize("loss", [0.05, 0.20])
def test_three_nodes_on_one_group_converge_with_loss(loss: float) -> None:
    c = Cluster(3, seed=23, faults=Faults(loss=loss, dup=0.02, delay=(0.0001, 0.003)))
    c.pump_all()
    Workload(c, creates=1200, seed=3).run()
    _converge(c)


def test_loss_during_startup_is_recovered() -> None:
    c = Cluster(2, seed=5, faults=Faults(loss=0.5, delay=(0.0001, 0.002)))
    for i in range(300):  # flows already in the kernel table when the daemons start
        for n in c.nodes.values():
            k, v = pack_flow(udp_flow(n.id, i))
            n.internal[k] = v
    c[1].restart(epoch=2001)
    c[2].restart(epoch=2002)
    c.pump_all()
    Workload(c, creates=500, interval=0.02).run()  # ~0.4 s of changes at 50% loss
    _converge(c)


def test_node_started_late_gets_everything_from_a_busy_peer() -> None:
    c = Cluster(2, seed=9, faults=Faults(loss=0.05))
    late = c.nodes.pop(2)
    del c.bus.nodes[2]
    c.pump_all()
    Workload(c, creates=1500).run([c[1]])
    c.run(3.0)  # node 1's stream is far past its beginning and partly released
    c.nodes[2] = late
    c.bus.nodes[2] = late
    late.restart(epoch=3002)
    late.pump()
    Workload(c, creates=300, seed=8).run()
    _converge(c)
    assert not next(p for p in late.engine.stats().peers if p.node == 1).need_resync


def test_resend_queue_overflow_forces_full_resync_and_converges() -> None:
    # a queue of 8 (production: 131072) so 2000 flows at 20% loss overflow it
    c = Cluster(2, seed=13, faults=Faults(loss=0.2, delay=(0.0001, 0.003)),
                resend_queue_max=8, resync_window=4, ack_every=2, ack_interval=0.05)
    c.pump_all()
    Workload(c, creates=2000, batch=200).run()
    _converge(c, 20.0)
    c1, c2 = c[1].engine.counters, c[2].engine.counters
    assert c1.evicted + c2.evicted > 0
    assert c1.resyncs_sent + c2.resyncs_sent > 2  # more than each stream's initial one
    assert c1.lost + c2.lost > 0  # gaps given up were covered by the resyncs


def test_peer_restart_new_epoch_catches_up_both_ways() -> None:
    c = Cluster(3, seed=17, faults=Faults(loss=0.05))
    c.pump_all()
    w = Workload(c, creates=800)
    w.run()
    c.run(1.0)
    # node 2 dies; while it is gone its kernel table changes (flows end, new ones start)
    two = c[2]
    two.attached = False
    c.run(0.5)
    for k in list(two.internal)[:200]:
        del two.internal[k]
        del w.flows[2][k]
    for i in range(100):
        f = udp_flow(2, 50_000 + i)
        k, v = pack_flow(f)
        two.internal[k] = v
        w.flows[2][k] = f
    w.run([c[1], c[3]])
    two.restart(epoch=9002)
    two.attached = True
    two.pump()
    w.run()
    _converge(c)
    for n in (c[1], c[3]):
        assert [e.epoch for _, e in n.events_of(PeerRestarted)] == [9002]


def test_every_node_reports_peer_up_once_per_peer() -> None:
    c = Cluster(3, seed=2)
    c.pump_all()
    c.run(2.0)
    for n in c.nodes.values():
        assert sorted(e.node for _, e in n.events_of(PeerUp)) == sorted(set(c.nodes) - {n.id})


def test_harness_is_deterministic() -> None:
    def run() -> list[int]:
        c = Cluster(2, seed=4, faults=Faults(loss=0.1, dup=0.05))
        c.pump_all()
        Workload(c, creates=300).run()
        c.run(2.0)
        return [c.bus.sent, c.bus.dropped, c[1].engine.counters.retransmitted]

    assert run() == run()


def test_peer_down_then_up_keeps_entries() -> None:
    c = Cluster(2, seed=3)
    c.pump_all()
    Workload(c, creates=200).run()
    c.run(1.0)
    c[2].attached = False
    c.run(c[1].cfg.peer_timeout + 1.0)
    assert [e.node for _, e in c[1].events_of(PeerDown)] == [2]
    assert c[1].views[2] == c[2].internal  # kept
    c[2].attached = True
    c.run(2.0)
    assert [e.node for _, e in c[1].events_of(PeerUp)] == [2, 2]
    c.assert_converged()
