"""The metrics collector over a real Daemon snapshot, and the HTTP server under hostile clients.

The server tests use loopback TCP (no root): a reset mid-request, more connections than the
cap, clients that never send. Each asserts the server still answers and what it counted.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from conntrackd_py.metrics import MetricsServer, StatsCollector, exposition, serve_metrics
from conntrackd_py.stats import ControlStats, Snapshot

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

P = "conntrackd_py_"


@functools.cache
def snapshot() -> Snapshot:
    import tempfile

    from test_daemon_shell import daemon_snapshot
    with tempfile.TemporaryDirectory() as tmp:
        return daemon_snapshot(Path(tmp))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_of_a_real_daemon_snapshot() -> None:
    snap = snapshot()
    s = samples(exposition(lambda: snap)().decode())
    assert snap.cache is not None
    assert snap.sync is not None
    assert snap.runtime is not None
    assert s[(P + "cache_flows", (("cache", "external"),))] == snap.cache.external == 10
    assert s[(P + "external_cache_flows", (("node", "2"),))] == 10
    assert s[(P + "cache_flows", (("cache", "internal"),))] == 3
    assert s[(P + "sync_datagrams_total", (("direction", "sent"),))] == \
        snap.sync.counters.datagrams_sent > 0
    assert s[(P + "peer_up", (("node", "2"),))] == 1
    assert s[(P + "peer_state", (("node", "2"), ("state", "synced")))] == 1
    assert s[(P + "in_sync", ())] == 1
    assert s[(P + "auth_enabled", ())] == 0  # the fixture runs with sync.auth.required: false
    assert s[(P + "commits_total", ())] == 1
    assert s[(P + "invalid_flows_total", (("reason", "zone"),))] == 1
    assert s[(P + "external_refused_total", (("node", "2"),))] == 2
    assert s[(P + "internal_errors_total", ())] == 0
    assert s[(P + "reload_failures_total", ())] == 0
    assert s[(P + "metrics_client_errors_total", ())] == 0
    assert s[(P + "accounting_flows_total", (("proto", "tcp"),))] == 1


def test_every_sync_counter_is_exported() -> None:
    # a new engine counter without a metric would otherwise be silently missing: give each
    # Counters field a value no other sample has, and find each value in the exposition
    import dataclasses

    from conntrackd_py.sync import Counters

    snap = snapshot()
    assert snap.sync is not None
    names = [f.name for f in dataclasses.fields(Counters)]
    values = {name: 7_000_003 + 10 * i for i, name in enumerate(names)}
    sync = dataclasses.replace(snap.sync, counters=Counters(**values), rejected={})
    got = set(samples(exposition(lambda: dataclasses.replace(snap, sync=sync))().decode())
              .values())
    assert [name for name, v in values.items() if v not in got] == []


def test_collector_copes_with_stats_only_mode() -> None:
    snap = snapshot()
    only = Snapshot(runtime=snap.runtime, cache=snap.cache)
    names = {m.name for m in StatsCollector(lambda: only).collect()}
    assert "conntrackd_py_cache_flows" in names
    assert not any(n.startswith("conntrackd_py_sync_") for n in names)


async def _get(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not cond():  # noqa: ASYNC110 (a counter of the server's, polled)
            await trio.sleep(0.01)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_a_reset_mid_request_is_counted_and_the_server_carries_on() -> None:
    """On main this killed the daemon: BrokenResourceError out of the listener's nursery."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, "127.0.0.1:0", lambda: b"x 1\n")
        for _ in range(3):
            s = trio.socket.socket()
            await s.connect(("127.0.0.1", port))
            await s.send(b"GET /metr")
            await trio.sleep(0.05)  # the server is inside receive_some
            _reset(s)  # type: ignore[arg-type]
        reply = await _get(port)
        assert reply.startswith(b"HTTP/1.0 200 OK")
        nursery.cancel_scope.cancel()


async def test_reset_clients_are_counted_by_the_metrics_server() -> None:
    server = MetricsServer("127.0.0.1:0", collect=lambda: b"x 1\n")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        for _ in range(3):
            s = trio.socket.socket()
            await s.connect(("127.0.0.1", port))
            await s.send(b"GET /metr")
            await trio.sleep(0.05)
            _reset(s)  # type: ignore[arg-type]
        await until(lambda: server.client_errors >= 3)
        assert (await _get(port)).startswith(b"HTTP/1.0 200 OK")
        assert server.requests == 1
        assert server.connections == 0
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_cap_are_closed_at_once_and_counted() -> None:
    server = MetricsServer("127.0.0.1:0", collect=lambda: b"x 1\n", max_connections=8,
                           timeout=0.5)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        idle = []
        for _ in range(20):
            s = trio.socket.socket()
            await s.connect(("127.0.0.1", port))
            idle.append(s)
        await until(lambda: server.refused >= 12)
        assert server.connections == 8
        # the idle ones time out (counted), then a scrape is answered again
        await until(lambda: not server.connections)
        assert server.client_errors == 8
        assert (await _get(port)).startswith(b"HTTP/1.0 200 OK")
        for s in idle:
            s.close()
        nursery.cancel_scope.cancel()


async def test_a_failing_collection_answers_500_and_is_reported() -> None:
    seen: list[str] = []

    def collect() -> bytes:
        raise KeyError("a renamed field")

    server = MetricsServer("127.0.0.1:0", collect=collect,
                           on_error=lambda where, e: seen.append(where))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        assert (await _get(port)).startswith(b"HTTP/1.0 500")
        assert seen == ["metrics collection"]
        nursery.cancel_scope.cancel()


def test_every_control_and_metrics_listener_counter_is_exported() -> None:
    # one ControlStats, read by attribute: a counter added there and not here fails this test
    fields = [f.name for f in dataclasses.fields(ControlStats)]
    snap = Snapshot(control=ControlStats(**{n: i + 7 for i, n in enumerate(fields)}))
    text = exposition(lambda: snap)().decode()
    for i, name in enumerate(fields):
        metric = name if name.startswith("metrics_") else f"control_{name}"
        assert re.search(rf"^conntrackd_py_{metric}(_total)? {i + 7}\.0$", text, re.M), name
