"""The whole daemon on trio's MockClock, with a fake tracker and a fake transport (no root).

A real `Engine` plays the peer (node 2): what the daemon sends reaches it, what it sends
reaches the daemon's fake channel, all in virtual time, so the tests assert exact times.
`daemon_snapshot()` is also what the metrics and Grafana tests read: a real Daemon's stats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conntrackd_py import config as config_mod
from conntrackd_py import sync as sync_engine
from conntrackd_py.accounting import Accounting
from conntrackd_py.cache import InternalCache
from conntrackd_py.commands import Ops
from conntrackd_py.commit import CommitError, CommitJob
from conntrackd_py.config import Config
from conntrackd_py.ctlclient import ControlError
from conntrackd_py.daemon import Daemon, LockError, PidLock, next_epoch, raise_nofile_limit
from conntrackd_py.flow import Flow, Tuple, pack_flow
from conntrackd_py.kernel.codec import EventType
from conntrackd_py.kernel.events import EventBatch, EventStats
from conntrackd_py.kernel.table import CommitResult, Table
from conntrackd_py.stats import CommitReport, SinkStats, Snapshot
from conntrackd_py.sync.config import config_from
from conntrackd_py.tracker import Tracker, TrackerStats
from conntrackd_py.transport import Channel, ChannelSpec, Transport


def mkflow(i: int, proto: int = 6) -> Flow:
    t = Tuple(bytes([10, 0, i >> 8 & 255, i & 255]), b"\x0a\x01\x00\x01", proto, 1000 + i, 80)
    return Flow(t, t.invert(), timeout=300)


# --- fakes ---------------------------------------------------------------------------------------

class FakeEvents:
    """The tracker's event source: batches pushed by the test."""

    def __init__(self) -> None:
        self.stats = EventStats()
        self.new_subscribed = True
        self.ignore_ports: set[int] = set()
        self.send, self.recv = trio.open_memory_channel[EventBatch](100)

    def subscribe_new(self, on: bool) -> None:
        self.new_subscribed = on

    async def run(self, on_events: Callable[[EventBatch], None],
                  on_overrun: Callable[[], Awaitable[None]],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for batch in self.recv:
            self.stats.events += len(batch)
            on_events(batch)

    def close(self) -> None:
        pass


class FakeTracker(Tracker):
    """The real Tracker's logic (cache, deltas, reconcile) over a dict standing for the kernel."""

    def __init__(self, **kw: Any) -> None:  # no super().__init__: no netlink socket
        self.netns_name = None
        self.cache = InternalCache()
        self.accept = kw["accept"]
        self.on_delta = kw["on_delta"]
        self.on_flow_event = kw["on_flow_event"]
        self.on_change = None
        self.stats = TrackerStats()
        self.events = FakeEvents()  # type: ignore[assignment]
        self.ready = trio.Event()
        self.kernel: dict[bytes, bytes] = {}

    async def _dump_pairs(self) -> list[tuple[bytes, bytes]]:
        await trio.lowlevel.checkpoint()
        self.stats.dumps += 1
        return list(self.kernel.items())

    def close(self) -> None:
        pass


class FakeTransport(Transport):
    """One channel; sends are recorded with their virtual time and handed to `peer`."""

    def __init__(self, specs: list[ChannelSpec], **kw: Any) -> None:
        self.netns_name = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.channels = [Channel(specs[0], self.sock, [])]
        self.active = 0
        self.silence_timeout = kw["silence_timeout"]
        self.failback = True
        self.switches = 0
        self.sent: list[tuple[float, bytes]] = []
        self.inbox_send, self.inbox = trio.open_memory_channel[list[bytes]](1000)
        self.on_send: Callable[[list[bytes]], None] | None = None

    def send(self, datagrams: list[bytes]) -> None:
        now = trio.current_time()
        self.sent += [(now, d) for d in datagrams]
        self.channels[0].stats.sent += len(datagrams)
        if self.on_send is not None and datagrams:
            self.on_send(datagrams)

    async def receive_loop(self, index: int,
                           on_datagrams: Callable[[list[bytes], list[str | None]], None],
                           clock: Callable[[], float]) -> None:
        async for burst in self.inbox:
            self.channels[0].stats.received += len(burst)
            self.channels[0].stats.last_rx = clock()
            on_datagrams(burst, ["192.0.2.2"] * len(burst))

    async def watch_links(self, clock: Callable[[], float]) -> None:
        pass

    def reevaluate(self, now: float) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


class FakeTable(Table):
    """The kernel table for the direct writer: records what it was asked to write."""

    def __init__(self, *a: Any, **kw: Any) -> None:  # no super().__init__: no netlink socket
        self.written: list[Flow] = []
        self.deleted: list[tuple[int, Tuple]] = []
        TABLES.append(self)

    async def commit(self, flows: Iterable[Flow], *, be_liberal: bool = True) -> CommitResult:
        await trio.lowlevel.checkpoint()
        flows = list(flows)
        self.written.extend(flows)
        return CommitResult(created=len(flows))

    async def delete(self, zone: int, orig: Tuple) -> bool:
        await trio.lowlevel.checkpoint()
        self.deleted.append((zone, orig))
        return True

    @property
    def port_id(self) -> int:
        return 4242

    async def flush(self, match: Callable[[Flow], bool] | None = None) -> int:
        await trio.lowlevel.checkpoint()
        FLUSHES.append((trio.current_time(), match))
        return 0

    def close(self) -> None:
        pass


TABLES: list[FakeTable] = []
FLUSHES: list[tuple[float, Callable[[Flow], bool] | None]] = []


async def fake_commit(job: CommitJob, now: float) -> CommitReport:
    """In-process and without a kernel: 'creates' every entry the real plan would commit."""
    await trio.sleep(0.01)
    n = sum(1 for _ in job.external.commit_entries(now, commit_timeout=job.commit_timeout))
    return CommitReport(created=n, updated=0, failed=0, errors={}, seconds=0.01,
                        encode_seconds=0.0, plan_seconds=0.0, undecodable=0)


YAML = """\
node: {{id: 1}}
general: {{lock_file: {d}/lock, control_socket: {d}/ctl.sock}}
sync:
  mode: ftfw
  external_cache: {external}
  auth: {{required: false}}
  limits: {{max_flows_per_peer: {cap}}}
  channels:
    - udp: {{peers: [192.0.2.2], bind: 192.0.2.1, port: 3780}}
"""


def make_config(tmp: Path, external: bool = True, cap: int = 1000) -> Config:
    return config_mod.loads(YAML.format(d=tmp, external=str(external).lower(), cap=cap))


class Peer:
    """Node 2: a real engine wired to the daemon's fake transport."""

    def __init__(self, cfg: Config, transport: FakeTransport) -> None:
        peer_cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, id=2))
        self.cache: dict[bytes, bytes] = {}
        self.engine = sync_engine.Engine(config_from(peer_cfg, ()), epoch=7,
                                         source=lambda: self.cache, now=trio.current_time())
        self.transport = transport
        self.received: list[sync_engine.Event] = []
        transport.on_send = self.receive

    def receive(self, datagrams: list[bytes]) -> None:
        now = trio.current_time()
        for d in datagrams:
            self.engine.receive_datagram(d, now)
        self.pump()

    def pump(self) -> None:
        now = trio.current_time()
        out = self.engine.datagrams_to_send(now)
        self.received += self.engine.events()
        if out:
            self.transport.inbox_send.send_nowait(out)

    def update(self, flows: list[Flow]) -> None:
        now = trio.current_time()
        for f in flows:
            k, v = pack_flow(f)
            self.cache[k] = v
            self.engine.local_update(k, v, now)
        self.pump()

    async def run(self) -> None:
        """The peer's timer task."""
        while True:
            t = self.engine.get_timer()
            await trio.sleep_until(t if t is not None else trio.current_time() + 1.0)
            self.engine.handle_timer(trio.current_time())
            self.pump()


@contextlib.asynccontextmanager
async def running(tmp: Path, external: bool = True,
                  cap: int = 1000) -> AsyncIterator[tuple[Daemon, Peer]]:
    cfg = make_config(tmp, external, cap)
    transports: list[FakeTransport] = []

    def transport(*a: Any, **kw: Any) -> Transport:
        transports.append(FakeTransport(*a, **kw))
        return transports[-1]

    d = Daemon(cfg, tracker=FakeTracker, transport=transport, table=FakeTable,
               commit=fake_commit, wall=lambda: 1000.0 + trio.current_time())
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        peer = Peer(cfg, transports[0])
        nursery.start_soon(peer.run)
        peer.pump()
        yield d, peer
        nursery.cancel_scope.cancel()


def tracker_of(d: Daemon) -> FakeTracker:
    assert isinstance(d.tracker, FakeTracker)
    return d.tracker


def transport_of(d: Daemon) -> FakeTransport:
    assert isinstance(d.transport, FakeTransport)
    return d.transport


async def wait_for(cond: Callable[[], bool], limit: float = 30.0) -> float:
    """Virtual seconds until `cond` holds (polled every 10 ms of virtual time)."""
    t0 = trio.current_time()
    with trio.fail_after(limit):
        while not cond():  # noqa: ASYNC110 (a condition on plain state, polled)
            await trio.sleep(0.01)
    return trio.current_time() - t0


# --- the tests -----------------------------------------------------------------------------------

async def test_peer_datagrams_fill_the_external_cache(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        peer.update([mkflow(i) for i in range(50)])
        await wait_for(lambda: d.external.count(2) == 50)
        assert len(d.dump("external", 6, None, 2, False)) == 50
        assert d.dump("external", 17, None, None, False) == []
        assert len(d.dump("external", None, None, None, True)) == 50
        snap = d.stats(None)
        assert snap.cache is not None
        assert snap.cache.external_by_node == {2: 50}
        assert snap.runtime is not None
        assert snap.runtime.in_sync
        assert snap.runtime.auth_enabled is False
        assert snap.sync is not None
        assert {p.node for p in snap.sync.peers} == {2}


async def test_kernel_events_are_pumped_to_the_peer(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        tr = tracker_of(d)
        sent_before = len(transport_of(d).sent)
        t_event = trio.current_time()
        await tr.events.send.send([(EventType.NEW, mkflow(i)) for i in range(5)])  # type: ignore[attr-defined]
        await wait_for(lambda: sum(1 for e in peer.received
                                   if isinstance(e, sync_engine.RemoteFlows)) > 0)
        assert len(tr.cache) == 5
        # the pump sent at the event's own (virtual) time: no timer in between
        first = transport_of(d).sent[sent_before]
        assert first[0] == t_event
        flows = [kv for e in peer.received if isinstance(e, sync_engine.RemoteFlows)
                 for kv in e.flows]
        assert {k for k, _ in flows} == set(tr.cache.mapping())


async def test_the_protocol_timer_fires_at_its_exact_virtual_time(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, _peer):
        await wait_for(d.in_sync)
        eng = d.engine
        assert eng is not None
        await trio.sleep(0.5)  # everything settled: only the periodic timer is left
        t = eng.get_timer()
        assert t is not None
        assert t > trio.current_time()
        n = len(transport_of(d).sent)
        await trio.sleep_until(t + 0.001)
        later = [when for when, _ in transport_of(d).sent[n:]]
        assert later
        assert later[0] == t


async def test_commit_reports_and_reconciles(tmp_path: Path,
                                             autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, peer):
        peer.update([mkflow(i) for i in range(20)])
        await wait_for(lambda: d.external.count(2) == 20)
        tr = tracker_of(d)
        dumps = tr.stats.dumps
        report = await d.commit()
        assert report.created == 20
        assert tr.events.new_subscribed  # type: ignore[attr-defined]
        await wait_for(lambda: tr.stats.dumps == dumps + 1)  # learnt by a dump after
        snap = d.stats("runtime")
        assert snap.runtime is not None
        assert snap.runtime.commits == 1
        assert snap.runtime.last_commit == report
        assert snap.cache is None  # only what was asked


async def test_invalid_peer_flows_are_refused_and_counted(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        k, v = pack_flow(mkflow(1))
        import msgpack
        bad_zone = msgpack.packb([70000, *msgpack.unpackb(k)[1:]])
        now = trio.current_time()
        peer.cache[bad_zone] = v
        peer.engine.local_update(bad_zone, v, now)
        peer.update([mkflow(2)])
        await wait_for(lambda: d.external.count(2) == 1)
        snap = d.stats("cache")
        assert snap.cache is not None
        assert sum(snap.cache.invalid_flows.values()) == 1


async def test_the_per_peer_cap_refuses_and_counts(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path, cap=5) as (d, peer):
        await wait_for(d.in_sync)
        peer.update([mkflow(i) for i in range(8)])
        await wait_for(lambda: sum(d.external.refused.values()) == 3)
        snap = d.stats("cache")
        assert snap.cache is not None
        assert snap.cache.external_by_node == {2: 5}
        assert snap.cache.external_refused == {2: 3}


async def test_direct_mode_writes_peer_flows_through_the_table(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path, external=False) as (d, peer):
        table = TABLES[-1]
        peer.update([mkflow(i) for i in range(7)])
        await wait_for(lambda: len(table.written) == 7)
        peer.cache.clear()
        now = trio.current_time()
        for i in range(3):
            peer.engine.local_destroy(pack_flow(mkflow(i))[0], now)
        peer.pump()
        await wait_for(lambda: len(table.deleted) == 3)
        snap = d.stats(None)
        assert snap.direct is not None
        assert (snap.direct.created, snap.direct.deleted) == (7, 3)
        assert len(d.external) == 0


async def test_a_failing_input_is_contained_and_counted(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A bug triggered by one datagram (here: the engine raising) never stops the daemon."""
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        eng = d.engine
        assert eng is not None
        real = eng.receive_datagram
        calls = {"n": 0}

        def flaky(data: bytes, now: float, source: str | None = None) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("a bug")
            real(data, now, source)

        eng.receive_datagram = flaky  # type: ignore[method-assign]
        peer.update([mkflow(1)])
        peer.update([mkflow(2)])
        await wait_for(lambda: d.external.count(2) >= 1)
        rt = d.stats("runtime").runtime
        assert rt is not None
        assert rt.internal_errors == 1
        assert list(rt.internal_errors_by_kind) == ["receiving a sync datagram: KeyError"]


async def test_a_supervised_task_that_fails_is_restarted(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, _peer):
        tr = tracker_of(d)
        tr.accept = lambda f: 1 / 0 > 0
        await tr.events.send.send([(EventType.NEW, mkflow(1))])  # type: ignore[attr-defined]
        await wait_for(lambda: sum(d.errors.internal_errors.values()) == 1)
        tr.accept = lambda f: True
        dumps = tr.stats.dumps
        k, v = pack_flow(mkflow(1))
        tr.kernel[k] = v  # the flow of the failed burst, in the kernel all along
        await trio.sleep(1.5)  # RESTART_DELAY: the event task runs again, after a dump
        assert tr.stats.dumps == dumps + 1
        assert k in tr.cache
        await tr.events.send.send([(EventType.NEW, mkflow(2))])  # type: ignore[attr-defined]
        await wait_for(lambda: len(tr.cache) == 2)


async def test_reload_failure_of_any_kind_keeps_the_running_config(
        tmp_path: Path, autojump_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(tmp_path) as (d, _peer):
        cfg_file = tmp_path / "c.yaml"
        cfg_file.write_text(YAML.format(d=tmp_path, external="true", cap=1000))
        d.cfg = dataclasses.replace(d.cfg, path=str(cfg_file))
        before = d.cfg

        def boom(path: str) -> Config:
            raise RecursionError("maximum recursion depth exceeded")

        monkeypatch.setattr("conntrackd_py.daemon.load", boom)
        d.reload()
        cfg_file.write_text("node: [")
        monkeypatch.undo()
        d.reload()
        assert d.cfg is before
        rt = d.stats("runtime").runtime
        assert rt is not None
        assert rt.reload_failures == 2
        assert rt.reloads == 0


async def test_ops_refuse_with_control_errors(tmp_path: Path,
                                              autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, _peer):
        d.engine = None
        with pytest.raises(ControlError, match="replication is off"):
            d.request_resync(None)
        with pytest.raises(ControlError, match="replication is off"):
            d.bulk_send()


# --- a real Daemon's snapshot, for the metrics and dashboard tests ------------------------------

def daemon_snapshot(tmp: Path, external: bool = True) -> Snapshot:
    """A running Daemon's `stats(None)` after some replication (12 flows from node 2, 2 of
    them beyond its cap of 10), 3 of its own, a commit and an invalid flow counted;
    with the accounting section of a real `Accounting` (the daemon's needs root)."""
    out: list[Snapshot] = []

    async def main() -> None:
        async with running(tmp, external, cap=10) as (d, peer):
            await wait_for(d.in_sync)
            peer.update([mkflow(i) for i in range(12)])  # 2 beyond the per-peer cap
            await tracker_of(d).events.send.send(  # type: ignore[attr-defined]
                [(EventType.NEW, mkflow(100 + i)) for i in range(3)])
            await wait_for(lambda: sum(d.external.refused.values()) == 2
                           or d.remote.direct_counts.created == 12)
            eng = d.engine
            assert eng is not None
            await wait_for(lambda: all(p.lag is not None for p in eng.stats().peers))
            if external:
                await d.commit()
            d.remote.invalid["zone"] += 1
            out.append(d.stats(None))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    snap = out[0]
    from test_accounting import cfg as acc_cfg
    from test_accounting import mkflow as acc_flow
    acc = Accounting(acc_cfg())
    acc.on_flow_event(EventType.DESTROY, acc_flow())
    acc_snap = acc.snapshot()
    if not acc_snap.sinks:  # the writer process fills them; it does not run here
        acc_snap = dataclasses.replace(acc_snap, sinks={"file": SinkStats(written=1, lost=0)})
    return dataclasses.replace(snap, accounting=acc_snap)


def test_snapshot_has_every_section(tmp_path: Path) -> None:
    snap = daemon_snapshot(tmp_path)
    for f in dataclasses.fields(Snapshot):
        if f.name != "direct":
            assert getattr(snap, f.name) is not None, f.name
    assert snap.runtime is not None
    assert snap.runtime.commits == 1
    js = snap.as_dict()
    assert js["sync"]["peers"]["2"]["up"] is True
    assert js["cache"]["external_by_node"] == {2: 10}
    direct = daemon_snapshot(tmp_path / "direct", external=False)
    assert direct.direct is not None
    assert direct.direct.created == 12  # no cache, no cap


# --- lock, epoch and descriptor limit -------------------------------------------------------------

def test_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    """On main the lock was opened through the link and its target truncated."""
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    (tmp_path / "lock").symlink_to(target)
    with pytest.raises(LockError, match="symbolic link"):
        PidLock(str(tmp_path / "lock")).acquire()
    assert target.read_text() == "root's data\n"


def test_epoch_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    (tmp_path / "lock.epoch").symlink_to(target)
    epoch = next_epoch(str(tmp_path / "lock.epoch"), 1_700_000_000.0)
    assert epoch == 1_700_000_000
    assert target.read_text() == "root's data\n"


def test_epoch_grows_across_restarts_even_if_the_clock_steps_back(tmp_path: Path) -> None:
    path = str(tmp_path / "lock.epoch")
    first = next_epoch(path, 1_700_000_000.0)
    assert next_epoch(path, 1_600_000_000.0) == first + 1


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    a = PidLock(str(tmp_path / "lock"))
    a.acquire()
    try:
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            PidLock(str(tmp_path / "lock")).acquire()
    finally:
        a.release()


def test_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert raise_nofile_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_commit_without_descriptors_is_an_error_reply_and_counted(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, _peer):
        async def no_fds(job: CommitJob, now: float) -> CommitReport:
            raise CommitError("no pipe for the commit process: Too many open files", 24)

        d._run_commit = no_fds
        with pytest.raises(ControlError, match="commit failed"):
            await d.commit()
        assert tracker_of(d).events.new_subscribed  # type: ignore[attr-defined]
        rt = d.stats("runtime").runtime
        assert rt is not None
        assert rt.fd_exhausted == 1
        assert rt.commits == 0
        d._run_commit = fake_commit
        assert (await d.commit()).created == 0  # and the next one works


async def test_a_commit_that_cannot_open_its_socket_changes_nothing(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # the commit's netlink socket is opened before the daemon leaves the NEW group or opens
    # the echo window: out of descriptors, the commit is refused and replication goes on
    async with running(tmp_path) as (d, _peer):
        def no_socket(*a: Any, **kw: Any) -> Table:
            raise OSError(24, "Too many open files")

        real = d._make_table
        d._make_table = no_socket
        with pytest.raises(ControlError, match="cannot open a netlink socket"):
            await d.commit()
        assert tracker_of(d).events.new_subscribed  # type: ignore[attr-defined]
        assert d.echo.contains is None
        rt = d.stats("runtime").runtime
        assert rt is not None
        assert rt.fd_exhausted == 1
        d._make_table = real
        assert (await d.commit()).created == 0  # and the next one works


async def test_another_host_with_our_node_id_is_logged_counted_and_not_in_sync(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, _peer):
        await wait_for(d.in_sync)
        twin = sync_engine.Engine(config_from(d.cfg, ()), epoch=12345,
                                  source=lambda: {}, now=trio.current_time())
        inbox = transport_of(d).inbox_send
        for _ in range(20):
            now = trio.current_time()
            twin.handle_timer(now)
            out = twin.datagrams_to_send(now)
            if out:
                await inbox.send(out)
            if d.remote.duplicate_node:
                break
            await trio.sleep(0.5)
        assert d.remote.duplicate_node >= 1
        assert not d.in_sync()
        rt = d.stats("runtime").runtime
        assert rt is not None
        assert rt.duplicate_node >= 1


async def test_a_send_failure_is_contained_and_the_protocol_recovers(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        tp = transport_of(d)
        real = tp.send
        failures = {"n": 0}

        def failing(datagrams: list[bytes]) -> None:
            if datagrams and failures["n"] == 0:
                failures["n"] += 1
                raise OSError(22, "Invalid argument")
            real(datagrams)

        tp.send = failing  # type: ignore[method-assign]
        await tracker_of(d).events.send.send(  # type: ignore[attr-defined]
            [(EventType.NEW, mkflow(i)) for i in range(4)])
        await wait_for(lambda: sum(len(e.flows) for e in peer.received
                                   if isinstance(e, sync_engine.RemoteFlows)) >= 4)
        assert failures["n"] == 1
        assert d.errors.internal_errors == {"sending sync datagrams: OSError": 1}
        await wait_for(d.in_sync)


async def test_stop_ends_the_daemon_and_releases_its_lock(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    cfg = make_config(tmp_path)
    d = Daemon(cfg, tracker=FakeTracker, transport=FakeTransport, table=FakeTable,
               commit=fake_commit)
    ops: Ops = d  # the control commands' side of the interface, checked by mypy
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
        assert ops.stop() == "stopping"
    assert not (tmp_path / "lock").exists()
    assert int((tmp_path / "lock.epoch").read_text()) == d.epoch


async def test_a_supervised_task_that_returns_is_not_started_again(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    d = Daemon(make_config(tmp_path), tracker=FakeTracker, transport=FakeTransport)
    runs = {"n": 0}

    async def once() -> None:
        runs["n"] += 1
        await trio.lowlevel.checkpoint()

    await d._supervised("nothing to watch", once)
    assert runs["n"] == 1


def keys_sent_to(peer: Peer) -> set[bytes]:
    return {k for e in peer.received if isinstance(e, sync_engine.RemoteFlows) for k, _ in e.flows}


async def test_a_commit_is_not_echoed_until_the_flow_changes_here(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """#14: the flows a commit writes come back in the dump after it; they are the peer's, so
    they are not sent to it as ours, while a connection of this node opened meanwhile is; a
    committed flow that then changes here is sent."""
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        peer.update([mkflow(i) for i in range(20)])
        await wait_for(lambda: d.external.count(2) == 20)
        tr = tracker_of(d)
        own_key, own_value = pack_flow(mkflow(100))

        async def commit_into_the_fake_kernel(job: CommitJob, now: float) -> CommitReport:
            # the commit's socket, opened before the fork: its events are dropped meanwhile
            assert job.table is not None
            assert tr.events.ignore_ports == {4242}
            for _o, k, v, _s in job.external.items():
                tr.kernel[k] = v
            tr.kernel[own_key] = own_value  # opened on this node during the commit
            return await fake_commit(job, now)

        d._run_commit = commit_into_the_fake_kernel
        dumps = tr.stats.dumps
        await d.commit()
        await wait_for(lambda: tr.stats.dumps == dumps + 1)
        assert len(tr.cache) == 21  # the internal cache has them all (-B sends them)
        assert not tr.events.ignore_ports
        await wait_for(lambda: own_key in keys_sent_to(peer))
        committed = {k for _o, k, _v, _s in d.external.items()}
        assert not committed & keys_sent_to(peer)
        rt = d.stats("runtime").runtime
        assert rt is not None
        assert rt.commit_echoes == 20
        # later, one committed flow changes state on this node: news for the peer
        t = mkflow(3).orig
        changed = Flow(t, t.invert(), timeout=100)
        await tr.events.send.send([(EventType.UPDATE, changed)])  # type: ignore[attr-defined]
        await wait_for(lambda: pack_flow(changed)[0] in keys_sent_to(peer))
        assert len(committed & keys_sent_to(peer)) == 1


async def test_a_flush_during_the_commit_window_keeps_what_the_commit_wrote(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """primary-backup.sh runs -f right after -c: the dump after the commit may end after the
    external cache is gone, and still must not send the committed flows as ours."""
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        peer.update([mkflow(i) for i in range(10)])
        await wait_for(lambda: d.external.count(2) == 10)
        tr = tracker_of(d)
        committed = {k for _o, k, _v, _s in d.external.items()}

        async def commit_into_the_fake_kernel(job: CommitJob, now: float) -> CommitReport:
            for _o, k, v, _s in job.external.items():
                tr.kernel[k] = v
            return await fake_commit(job, now)

        d._run_commit = commit_into_the_fake_kernel
        dumps = tr.stats.dumps
        await d.commit()
        assert d.flush_caches("both") == {"internal": 0, "external": 10}
        await wait_for(lambda: tr.stats.dumps == dumps + 1)
        await trio.sleep(1.0)
        assert len(tr.cache) == 10
        assert not committed & keys_sent_to(peer)
        d.bulk_send()  # -B: everything, as conntrackd
        await wait_for(lambda: committed <= keys_sent_to(peer))


async def test_keepalived_transitions_run_primary_backup_sh_steps(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    from conntrackd_py.vrrp import Transition, run_transition
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        peer.update([mkflow(i) for i in range(5)])
        await wait_for(lambda: d.external.count(2) == 5)
        await run_transition(d.keepalived, Transition("INSTANCE", "VI_1", "MASTER", 100), d)
        rt = d.stats("runtime").runtime
        assert rt is not None
        assert rt.commits == 1
        assert rt.keepalived_transitions == 1
        assert len(d.external) == 0  # -f after -c
        await run_transition(d.keepalived, Transition("INSTANCE", "VI_1", "MASTER", 100), d)
        assert d.commits == 1  # the same role again: nothing


async def test_purge_schedules_one_filtered_flush_that_a_commit_cancels(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """-t as conntrackd 1.4.7's: one flush of the kernel table (entries the filters would
    replicate) and of the internal cache, purge_timeout later; not re-armed while pending;
    -c and -f cancel it."""
    FLUSHES.clear()
    async with running(tmp_path) as (d, _peer):
        tr = tracker_of(d)
        own_key, own_value = pack_flow(mkflow(1))
        tr.cache.upsert(own_key, own_value)
        t0 = trio.current_time()
        assert await d.purge(5) == {"flush_in": 5}
        await trio.sleep(2)
        assert await d.purge(5) == {"flush_in": 3}  # pending: not re-armed
        await trio.sleep(2.9)
        assert FLUSHES == []
        await trio.sleep(0.2)
        assert [(round(t - t0, 3), m) for t, m in FLUSHES] == [(5.0, tr.accept)]
        assert len(tr.cache) == 0
        # armed again, then a commit cancels it; and again, then -f internal
        FLUSHES.clear()
        await d.purge(1)
        await d.commit()
        await d.purge(1)
        d.flush_caches("internal")
        await d.purge(1)
        d.flush_caches("external")  # not this one: the flush happens
        await trio.sleep(3)
        assert len(FLUSHES) == 1


async def test_watch_yields_structured_changes_of_both_caches(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """-E: [event, where, origin, key hex, value hex or None]; "new" only for a key the cache
    did not hold. The tracker's hook is set while someone watches, and only then."""
    async with running(tmp_path) as (d, peer):
        await wait_for(d.in_sync)
        tr = tracker_of(d)
        assert tr.on_change is None
        items: list[object] = []

        async def watch() -> None:
            async for item in d.watch():
                items.append(item)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await wait_for(lambda: tr.on_change is not None)
            f = mkflow(7)
            k, v = pack_flow(f)
            t = f.orig
            changed = Flow(t, t.invert(), timeout=99)
            send = tr.events.send  # type: ignore[attr-defined]
            await send.send([(EventType.NEW, f), (EventType.UPDATE, changed),
                             (EventType.DESTROY, changed)])
            peer.update([mkflow(8)])
            peer.update([Flow(mkflow(8).orig, mkflow(8).reply, timeout=5)])
            await wait_for(lambda: len(items) == 5)
            nursery.cancel_scope.cancel()
        pk = pack_flow(mkflow(8))[0].hex()
        assert items[:3] == [["new", "internal", None, k.hex(), v.hex()],
                             ["update", "internal", None, k.hex(), pack_flow(changed)[1].hex()],
                             ["destroy", "internal", None, k.hex(), None]]
        assert [(i[0], i[1], i[2], i[3]) for i in items[3:]] == [  # type: ignore[index]
            ("new", "external", 2, pk), ("update", "external", 2, pk)]
        await wait_for(lambda: tr.on_change is None)
