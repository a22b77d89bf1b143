"""Accounting against the real kernel: a known TCP transfer through the firewall yields a
DESTROY record whose byte and packet counts match what was sent.

Tolerance: conntrack counts layer-3 bytes per skb, so bytes = payload + headers, and each
counted packet carries between 40 (IPv4 + TCP, no options) and 80 (IPv4 + TCP with the most
options the stack sends) bytes of headers. GSO/GRO may merge segments into one counted packet,
which changes the packet count but not this per-packet bound. A segment TCP sends again is
counted again when the first copy had passed the firewall (a spurious retransmission on a busy
machine: CI saw one resend a whole 64 KiB window), so each side reads how many bytes its TCP
resent (TCP_INFO's tcpi_bytes_retrans) and the upper bound includes them.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest
import trio

from conntrackd_py.accounting import Accounting, enable_kernel_accounting
from conntrackd_py.config import Accounting as AccCfg
from conntrackd_py.netns import socket_in
from conntrackd_py.tracker import Tracker
from lab import FirewallTopology

pytestmark = pytest.mark.kernel

PORT = 9099
UP = 1 << 20  # client -> server
DOWN = 10 * 1024  # server -> client
HDR_MIN, HDR_MAX = 40, 80
_TCPI_BYTES_RETRANS = 208  # offset in struct tcp_info (include/uapi/linux/tcp.h, Linux 4.19+)


def _bytes_resent(s: socket.socket) -> int:
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
    return int(struct.unpack_from("=Q", info, _TCPI_BYTES_RETRANS)[0])


def _server(sock: socket.socket) -> tuple[int, int]:
    conn, _ = sock.accept()
    with conn:
        got = 0
        while chunk := conn.recv(65536):
            got += len(chunk)
        conn.sendall(b"r" * DOWN)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):  # the client's close: everything sent is acknowledged
            pass
        return got, _bytes_resent(conn)


def _client(ns: str, dst: str) -> tuple[int, int, int]:
    with socket_in(ns, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect((dst, PORT))
        s.sendall(b"u" * UP)
        s.shutdown(socket.SHUT_WR)
        back = 0
        while chunk := s.recv(65536):
            back += len(chunk)
        return s.getsockname()[1], back, _bytes_resent(s)


async def test_destroy_record_counts_match_a_known_transfer(
        fw_topo: FirewallTopology, tmp_path: Path) -> None:
    t = fw_topo
    enable_kernel_accounting(t.fw.name)
    assert t.fw.sysctl_get("net.netfilter.nf_conntrack_acct") == "1"
    assert t.fw.sysctl_get("net.netfilter.nf_conntrack_timestamp") == "1"
    path = tmp_path / "acct.jsonl"
    acc = Accounting(AccCfg(enabled=True, file=str(path)))
    tracker = Tracker(netns_name=t.fw.name, rcvbuf=8 << 20, on_flow_event=acc.on_flow_event)
    listener = socket_in(t.server.name, socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("0.0.0.0", PORT))
        listener.listen(1)
        listener.settimeout(20)
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)
            await nursery.start(acc.writer)
            t0 = time.time()
            async with trio.open_nursery() as io:
                got: list[tuple[int, int]] = []

                async def serve() -> None:
                    got.append(await trio.to_thread.run_sync(_server, listener))

                io.start_soon(serve)
                await trio.sleep(0.1)
                sport, back, resent_up = await trio.to_thread.run_sync(
                    _client, t.client.name, t.server_ip)
            ((received, resent_down),) = got
            assert received == UP
            assert back == DOWN
            await trio.sleep(0.3)  # the last ACKs pass the firewall
            t.fw.run("conntrack", "-D", "-p", "tcp", "--orig-port-src", str(sport))
            t1 = time.time()
            with trio.move_on_after(10):
                while acc.records_written < 1:  # noqa: ASYNC110 - the writer's thread
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        tracker.close()
        listener.close()

    records = [json.loads(line) for line in path.read_text().splitlines()]
    mine = [r for r in records if f"sport={sport} dport={PORT}" in r["orig"]]
    assert len(mine) == 1, records
    r = mine[0]
    assert r["proto"] == "tcp"
    assert r["state"] is not None
    assert r["orig"] == f"src={t.client_ip} dst={t.server_ip} sport={sport} dport={PORT}"
    assert r["snat"] is not None
    assert r["snat"].startswith(f"{t.fw_wan_ip}:")
    for direction, payload, resent in (("orig", UP, resent_up), ("reply", DOWN, resent_down)):
        packets, nbytes = r[f"{direction}_packets"], r[f"{direction}_bytes"]
        headers = nbytes - payload
        assert packets >= 3, r  # SYN (or SYN-ACK), data, FIN at least
        assert HDR_MIN * packets <= headers <= HDR_MAX * packets + resent, (
            direction, resent, r)
    assert t0 - 1 <= r["start"] <= r["end"] <= t1 + 1
    assert 0 <= r["duration"] < 30
    snap = acc.snapshot()
    assert snap.totals["tcp"].orig.bytes >= UP
    assert snap.top_talkers[0].source == t.client_ip
    assert snap.records_dropped == 0


def test_stats_only_mode_accounts_without_replicating(fw_topo: FirewallTopology,
                                                       tmp_path: Path) -> None:
    """general.mode: stats, from the same config format: the daemon turns kernel accounting on,
    writes a record per finished flow and answers `-s accounting`, with no sync socket open and
    replication commands refused with an error (the daemon keeps running)."""
    from lab import PAYLOAD as _PAYLOAD
    from lab import DaemonProc, udp_flows
    t = fw_topo
    acct = tmp_path / "acct.jsonl"
    extra = f"stats:\n  accounting: {{enabled: true, file: {acct}, format: json}}\n"
    d = DaemonProc(t.fw, str(tmp_path / "d"), 1, "10.255.0.1", general_mode="stats",
                   extra=extra)
    try:
        assert t.fw.sysctl_get("net.netfilter.nf_conntrack_acct") == "1"
        assert "accounting" in d.read_log()
        udp_flows(t.client, t.server_ip, 5, dport=7000)
        deadline = time.monotonic() + 10
        while len(d.call("dump", cache="internal")) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(d.call("dump", cache="internal")) == 5
        t.fw.run("conntrack", "-D", "-p", "udp", "--orig-port-dst", "7000")
        deadline = time.monotonic() + 10
        while (not acct.exists() or len(acct.read_text().splitlines()) < 5) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        records = [json.loads(line) for line in acct.read_text().splitlines()]
        assert len(records) == 5
        assert all(r["proto"] == "udp" and r["orig_packets"] == 1 for r in records)
        # one packet each: IPv4 header + UDP header + the generator's payload
        assert all(r["orig_bytes"] == 28 + len(_PAYLOAD) for r in records)

        out = d.cli("-s", "accounting", "-o", "json")
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)["accounting"]
        assert snap["totals"]["udp"]["orig"]["packets"] == 5
        assert snap["top_talkers"][0]["source"] == t.client_ip
        text = d.cli("-s", "accounting")
        assert text.returncode == 0
        assert t.client_ip in text.stdout

        ss = t.fw.run("ss", "-uaH").stdout
        assert ":3780" not in ss, ss
        refused = d.cli("-n")
        assert refused.returncode != 0
        assert "replication is off" in refused.stderr
        assert d.proc is not None
        assert d.proc.poll() is None
    finally:
        d.stop()
