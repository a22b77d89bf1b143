"""Accounting records, totals, heavy hitters, the bounded buffer, the writer; metrics text."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from prometheus_client.parser import text_string_to_metric_families

from conntrackd_py.accounting import (
    Accounting,
    HeavyHitters,
    enable_kernel_accounting,
    json_line,
    record,
)
from conntrackd_py.acctwriter import flow_from_wire
from conntrackd_py.config import Accounting as AccCfg
from conntrackd_py.flow import Counters, Flow, Status, TcpState, Tuple
from conntrackd_py.kernel.codec import EventType
from conntrackd_py.metrics import exposition, parse_listen, serve_metrics
from conntrackd_py.stats import Direction, ProtoTotals, RuntimeStats, Snapshot

D = EventType.DESTROY


def ip(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in s else socket.AF_INET, s)


C0 = Counters(10, 1000, 8, 4000)


def mkflow(src: str = "10.0.0.2", dst: str = "192.0.2.1", sport: int = 40000, dport: int = 80,
           proto: int = 6, counters: Counters | None = C0,
           nat: bool = False, start_ns: int = 1_700_000_000_000_000_000,
           stop_ns: int = 1_700_000_002_500_000_000) -> Flow:
    orig = Tuple(ip(src), ip(dst), proto, sport, dport)
    reply = orig.invert()
    status = int(Status.ASSURED | Status.SEEN_REPLY)
    if nat:
        reply = Tuple(ip(dst), ip("203.0.113.1"), proto, dport, 61000)
        status |= Status.SRC_NAT
    return Flow(orig, reply, status=status, mark=7, zone=0,
                state=TcpState.TIME_WAIT if proto == 6 else None, counters=counters,
                start_ns=start_ns, stop_ns=stop_ns)


def cfg(tmp_path: Path | None = None, **kw: Any) -> AccCfg:
    base: dict[str, Any] = {"enabled": True,
                            "file": str(tmp_path / "acct.log") if tmp_path else None}
    base.update(kw)
    return AccCfg(**base)


def read_lines(*paths: Path) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        if p.exists():
            out += [json.loads(line) for line in p.read_text().splitlines()]
    return out


# --- records and totals ----------------------------------------------------------------------

def test_record_has_both_tuples_nat_counters_and_times() -> None:
    r = record(mkflow(nat=True), end_fallback=0.0)
    assert r["orig"] == "src=10.0.0.2 dst=192.0.2.1 sport=40000 dport=80"
    assert r["reply"] == "src=192.0.2.1 dst=203.0.113.1 sport=80 dport=61000"
    assert r["snat"] == "203.0.113.1:61000"
    assert r["dnat"] is None
    assert (r["proto"], r["state"], r["mark"], r["zone"]) == ("tcp", "TIME_WAIT", 7, 0)
    assert (r["orig_packets"], r["orig_bytes"], r["reply_packets"], r["reply_bytes"]) == (
        10, 1000, 8, 4000)
    assert r["start"] == pytest.approx(1_700_000_000.0)
    assert r["end"] == pytest.approx(1_700_000_002.5)
    assert r["duration"] == pytest.approx(2.5)
    json.dumps(r)


def test_record_without_timestamps_uses_the_event_time() -> None:
    r = record(mkflow(start_ns=0, stop_ns=0, proto=17), end_fallback=123.0)
    assert (r["start"], r["end"], r["duration"], r["state"]) == (None, 123.0, None, None)
    r6 = record(mkflow(src="2001:db8::1", dst="2001:db8::2", nat=False), 0.0)
    assert r6["orig"].startswith("src=2001:db8::1 dst=2001:db8::2")


def test_only_destroy_events_with_counters_count() -> None:
    acc = Accounting(cfg(), clock=lambda: 5.0)
    acc.on_flow_event(EventType.NEW, mkflow())
    acc.on_flow_event(EventType.UPDATE, mkflow())
    acc.on_flow_event(D, mkflow(counters=None))
    assert acc.flows == 0
    acc.on_flow_event(D, mkflow())
    acc.on_flow_event(D, mkflow(proto=17, counters=Counters(1, 100, 2, 200)))
    s = acc.snapshot()
    assert s.flows == 2
    assert s.packets == 21
    assert s.bytes == 5300
    assert s.totals["tcp"] == ProtoTotals(1, Direction(10, 1000), Direction(8, 4000))
    assert s.totals["udp"].reply.bytes == 200
    assert s.records_pending == 0  # no file, no syslog: nothing to buffer
    assert json.loads(json.dumps(asdict(s)))["totals"]["tcp"]["orig"] == {
        "packets": 10, "bytes": 1000}


# --- heavy hitters -----------------------------------------------------------------------------

def test_heavy_hitters_find_the_big_sources_in_bounded_memory() -> None:
    hh = HeavyHitters(20)
    heavy = {f"10.1.0.{i}".encode(): 1_000_000 * (i + 1) for i in range(5)}
    n = 0
    for rnd in range(50):
        for k, w in heavy.items():
            hh.add(k, w // 50)
        for j in range(400):  # 20000 distinct small sources overall
            hh.add(f"small-{rnd}-{j}".encode(), 1000)
            n += 1
        assert len(hh.counts) <= 80
    top = hh.top(5)
    assert {k for k, _ in top} == set(heavy)
    for k, v in top:
        assert heavy[k] - hh.error <= v <= heavy[k]
    assert hh.error <= hh.total / 21


def test_top_talkers_in_snapshot_are_addresses_sorted_by_bytes() -> None:
    acc = Accounting(cfg(top_talkers=2))
    for i in range(1, 200):
        acc.on_flow_event(D, mkflow(src=f"10.9.{i // 250}.{i % 250}",
                                    counters=Counters(1, 10, 1, 10)))
    acc.on_flow_event(D, mkflow(src="10.0.0.99", counters=Counters(1, 10**6, 1, 10**6)))
    acc.on_flow_event(D, mkflow(src="2001:db8::5", counters=Counters(1, 10**5, 1, 10**5)))
    top = acc.snapshot().top_talkers
    assert [t.source for t in top] == ["10.0.0.99", "2001:db8::5"]
    assert top[0].bytes <= 2 * 10**6
    assert len(acc.talkers.counts) <= 4 * 20


# --- the buffer and the writer -------------------------------------------------------------------

def test_full_buffer_drops_and_counts() -> None:
    acc = Accounting(cfg(file="/nonexistent/x", buffer=3))
    for _ in range(10):
        acc.on_flow_event(D, mkflow())
    s = acc.snapshot()
    assert (s.records_pending, s.records_dropped, s.flows) == (3, 7, 10)


@contextlib.asynccontextmanager
async def writing(acc: Accounting) -> AsyncIterator[None]:
    """The writer (and its child process) running; everything written when the block ends."""
    async with trio.open_nursery() as nursery:
        await nursery.start(acc.writer)
        yield
        with trio.fail_after(10):
            await acc.settled()
        nursery.cancel_scope.cancel()


async def test_writer_writes_json_lines(tmp_path: Path) -> None:
    acc = Accounting(cfg(tmp_path))
    async with writing(acc):
        for port in range(5):
            acc.on_flow_event(D, mkflow(sport=port + 1))
    lines = read_lines(tmp_path / "acct.log")
    assert [r["orig"].split("sport=")[1].split()[0] for r in lines] == ["1", "2", "3", "4", "5"]
    assert lines[0] == record(mkflow(sport=1), 0.0)
    assert acc.snapshot().records_written == 5
    assert acc.snapshot().records_pending == 0


@pytest.mark.parametrize(("priority", "policy", "nice"), [
    ("idle", os.SCHED_IDLE, 0), ("low", os.SCHED_OTHER, 10), ("normal", os.SCHED_OTHER, 0)])
async def test_writer_process_runs_at_the_configured_priority(
        tmp_path: Path, priority: str, policy: int, nice: int) -> None:
    acc = Accounting(cfg(tmp_path, writer_priority=priority))
    async with writing(acc):
        acc.on_flow_event(D, mkflow())
        assert acc.writer_pid is not None
        pid = acc.writer_pid
        want = (policy, os.getpriority(os.PRIO_PROCESS, 0) + nice)
        with trio.fail_after(5):  # the child sets its priority as it starts
            while (os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid)) != want:  # noqa: ASYNC110
                await trio.sleep(0.01)
    assert read_lines(tmp_path / "acct.log")[0] == record(mkflow(), 0.0)


@pytest.mark.parametrize("flow", [
    mkflow(), mkflow(nat=True), mkflow(counters=None, start_ns=0, stop_ns=0),
    mkflow(src="fd00::2", dst="fd00:1::9", proto=17),
    mkflow(proto=1, sport=0, dport=0), mkflow(proto=250),
    Flow(Tuple(ip("10.0.0.1"), ip("10.0.0.2"), 6, 1, 2), Tuple(ip("10.0.0.9"), ip("10.0.0.1"),
         6, 3, 1), status=int(Status.DST_NAT), state=42, zone=3, mark=2**32 - 1),
])
def test_json_line_is_json_dumps_of_the_record(flow: Flow) -> None:
    assert json_line(flow, 1_700_000_003.25) == json.dumps(record(flow, 1_700_000_003.25),
                                                          separators=(",", ":"))


def test_flow_survives_the_trip_to_the_writer_process() -> None:
    import msgpack
    f = mkflow(nat=True)._replace(master=Tuple(ip("10.0.0.2"), ip("192.0.2.1"), 6, 1, 21),
                                  labels=b"\x01" * 16, helper="ftp")
    back = msgpack.unpackb(msgpack.packb([f]), use_list=False, raw=False)[0]
    assert flow_from_wire(back) == f


async def test_writer_text_format(tmp_path: Path) -> None:
    acc = Accounting(cfg(tmp_path, format="text"))
    async with writing(acc):
        acc.on_flow_event(D, mkflow())
    (line,) = (tmp_path / "acct.log").read_text().splitlines()
    assert line.startswith("[")
    assert "]\ttcp     6  0 TIME_WAIT src=10.0.0.2" in line
    assert "packets=10 bytes=1000" in line
    assert "packets=8 bytes=4000" in line
    assert line.endswith("delta-time=2")


async def test_rotation_by_rename_and_by_sighup_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "acct.log"
    acc = Accounting(cfg(tmp_path))
    async with writing(acc):
        sent = 0

        async def some(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                sent += 1
                acc.on_flow_event(D, mkflow(sport=sent))
            await trio.sleep(0.5)

        await some(10)
        os.rename(path, tmp_path / "acct.log.1")  # logrotate without copytruncate
        await some(10)  # may still land in .1 until the inode check: still not lost
        await trio.sleep(1.3)
        await some(10)
        assert path.exists()
        os.rename(path, tmp_path / "acct.log.2")
        acc.reopen()  # SIGHUP
        await trio.sleep(0.3)
        await some(10)
    got = read_lines(tmp_path / "acct.log.1", tmp_path / "acct.log.2", path)
    ports = sorted(int(r["orig"].split("sport=")[1].split()[0]) for r in got)
    assert ports == list(range(1, 41))
    assert len(read_lines(path)) == 10  # the records after the SIGHUP went to a new file
    assert acc.records_written == 40
    assert acc.records_dropped == 0
    assert acc.reopens >= 1


async def test_stalled_writer_does_not_block_ingestion(tmp_path: Path) -> None:
    """The writer process stopped (SIGSTOP: a disk that hangs): the event path stays fast, the
    bounded buffer fills, the rest is dropped and counted; after SIGCONT all that was kept is
    written."""
    acc = Accounting(cfg(tmp_path, buffer=1000))
    async with writing(acc):
        acc.on_flow_event(D, mkflow())
        with trio.fail_after(10):
            await acc.settled()
        assert acc.writer_pid is not None
        os.kill(acc.writer_pid, signal.SIGSTOP)
        try:
            n = 50_000
            flow = mkflow()
            t0 = time.perf_counter()
            for i in range(n):
                acc.on_flow_event(D, flow)
                if i % 500 == 0:
                    await trio.lowlevel.checkpoint()  # the feeder runs, fills the pipe, then blocks
            elapsed = time.perf_counter() - t0
            assert elapsed < 2.0, f"{n} events took {elapsed:.2f} s with a stalled writer"
            assert acc.buffered == 1000  # the buffer is full ...
            assert acc.records_dropped >= n - 1000 - acc.in_flight  # ... the rest counted
            assert acc.records_written == 1
        finally:
            os.kill(acc.writer_pid, signal.SIGCONT)
    assert acc.records_written + acc.records_dropped == n + 1
    assert acc.records_written >= 1001
    assert len(read_lines(tmp_path / "acct.log")) == acc.records_written


async def test_write_error_counts_and_drops(tmp_path: Path) -> None:
    acc = Accounting(cfg(file=str(tmp_path / "no" / "such" / "dir.log")))
    async with writing(acc):
        acc.on_flow_event(D, mkflow())
    assert acc.write_errors == 1
    assert acc.records_dropped == 1
    assert acc.records_written == 0


async def test_writer_process_that_dies_is_started_again(tmp_path: Path) -> None:
    acc = Accounting(cfg(tmp_path))
    async with writing(acc):
        acc.on_flow_event(D, mkflow(sport=1))
        with trio.fail_after(10):
            await acc.settled()
        first = acc.writer_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with trio.fail_after(10):
            while acc.writer_restarts == 0 or acc.writer_pid == first:  # noqa: ASYNC110
                await trio.sleep(0.05)
        acc.on_flow_event(D, mkflow(sport=2))
    assert [r["orig"].split("sport=")[1].split()[0]
            for r in read_lines(tmp_path / "acct.log")] == ["1", "2"]
    assert acc.records_written == 2


def test_enable_kernel_accounting_sets_both_sysctls(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(key: str, value: int | str, ns: str | None = None) -> str:
        calls.append((key, value, ns))
        return "0"

    monkeypatch.setattr("conntrackd_py.accounting.set_sysctl", fake)
    enable_kernel_accounting("fw")
    assert calls == [("net.netfilter.nf_conntrack_acct", 1, "fw"),
                     ("net.netfilter.nf_conntrack_timestamp", 1, "fw")]


# --- metrics -----------------------------------------------------------------------------------

def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9477") == ("127.0.0.1", 9477)
    assert parse_listen("[::1]:9477") == ("::1", 9477)
    with pytest.raises(ValueError, match="ADDRESS:PORT"):
        parse_listen("localhost")


async def _http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_metrics_server_answers_get_metrics() -> None:
    counter = {"n": 0}
    base = Snapshot(runtime=RuntimeStats(
        node=1, epoch="00000001", uptime_s=1.0, pid=1, mode="ftfw", in_sync=True, commits=0,
        last_commit=None, auth_enabled=True, reloads=0, reload_failures=0, internal_errors=0,
        internal_errors_by_kind={}, fd_exhausted=0, oversize_datagrams=0, duplicate_node=0,
        peers_forgotten=0))

    def stats() -> Snapshot:
        counter["n"] += 1
        assert base.runtime is not None
        return replace(base, runtime=replace(base.runtime, commits=counter["n"]))

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, "127.0.0.1:0", exposition(stats))
        r1 = await _http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        r2 = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        bad = await _http(port, b"GET /nope HTTP/1.0\r\n\r\n")
        post = await _http(port, b"POST /metrics HTTP/1.0\r\n\r\n")
        nursery.cancel_scope.cancel()
    head, _, body = r1.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert b"text/plain; version=0.0.4" in head
    assert samples(body.decode())[("conntrackd_py_commits_total", ())] == 1
    assert samples(r2.partition(b"\r\n\r\n")[2].decode())[("conntrackd_py_commits_total",
                                                            ())] == 2
    assert bad.startswith(b"HTTP/1.0 404")
    assert post.startswith(b"HTTP/1.0 405")


def test_writer_process_drops_a_malformed_record_and_says_so(tmp_path: Path) -> None:
    """The child's loop, in-process: a record that is not a packed Flow is reported as lost
    (the daemon counts it) and the next one is still written."""
    import io

    import msgpack

    from conntrackd_py.acctwriter import Sink, serve
    r, w = os.pipe()
    os.write(w, msgpack.packb([(1, 2, 3), 0.0]))  # a 3-field "flow"
    os.write(w, msgpack.packb([mkflow(sport=7), 0.0]))
    os.close(w)
    out = io.BytesIO()
    sink = Sink(str(tmp_path / "acct.log"), "json", False)
    try:
        serve(r, out, sink)
    finally:
        os.close(r)
    reports = list(msgpack.Unpacker(io.BytesIO(out.getvalue()), raw=False))
    assert [1, 1, "dropped 1 malformed accounting records"] in reports
    assert sum(m[1] for m in reports if m[0] == 0) == 1
    (line,) = read_lines(tmp_path / "acct.log")
    assert "sport=7" in line["orig"]
