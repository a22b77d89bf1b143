"""IPFIX export read by a collector nobody here wrote: nfdump's nfcapd in the server namespace
receives the stream the accounting writer sends from the firewall namespace, and `nfdump`
lists every flow with the addresses, ports, NAT'd source, protocol and byte and packet counts
of what the test sent, equal to the kernel's own counters (`conntrack -L -o extended` just
before `conntrack -F`). The JSON file sink runs at the same time and must agree.

UDP exchanges make the counts exact: each datagram is one packet of 28 (IPv4) or 48 (IPv6)
header bytes plus its payload, and the echo server answers each one once.
nfdump 1.7.1 reads postNATSourceIPv6Address (281) as nothing (it shows 0.0.0.0), so NAT'd
addresses are checked for IPv4 here and for IPv6 by the unit test's decoder; the NAT'd ports
are checked for both.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from conntrackd_py.accounting import Accounting, enable_kernel_accounting
from conntrackd_py.config import Accounting as AccCfg
from conntrackd_py.config import Ipfix
from conntrackd_py.netns import socket_in
from conntrackd_py.tracker import Tracker
from lab import FirewallTopology, terminate, udp_echo_server

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("nfcapd") is None, reason="nfdump (nfcapd) not installed"),
]

ECHO = 7070
COLLECTOR_PORT = 4739
#: (family, datagrams, payload size) per exchange
EXCHANGES: list[tuple[int, int, int]] = [
    (socket.AF_INET, 1, 10), (socket.AF_INET, 3, 200), (socket.AF_INET, 5, 1000),
    (socket.AF_INET6, 2, 300), (socket.AF_INET6, 4, 50)]
FMT = "fmt:%sa|%da|%sp|%dp|%pr|%ipkt|%ibyt|%opkt|%obyt|%xsa|%xda|%xsp|%xdp"


def ipfix_cfg(path: Path, collector: str) -> AccCfg:
    """`stats.accounting` with a file and one IPFIX collector: two sinks at once."""
    return AccCfg(enabled=True, file=str(path), ipfix=Ipfix(collectors=(collector,)))


def exchange(ns: str, family: int, dst: str, n: int, size: int) -> int:
    """n datagrams of `size` bytes to the echo server, each echoed; returns the source port."""
    with socket_in(ns, family, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((dst, ECHO))
        for _ in range(n):
            s.send(b"x" * size)
            assert len(s.recv(65536)) == size
        return int(s.getsockname()[1])


def kernel_counters(fw: object, port: int) -> dict[int, tuple[int, int, int, int]]:
    """sport -> (orig packets, orig bytes, reply packets, reply bytes) of the UDP flows to
    `port`, from conntrack's own listing."""
    out: dict[int, tuple[int, int, int, int]] = {}
    for family in ("ipv4", "ipv6"):
        text = fw.run("conntrack", "-L", "-f", family, "-p", "udp",  # type: ignore[attr-defined]
                      "--orig-port-dst", str(port), check=False).stdout
        for line in text.splitlines():
            sport = next(int(w[6:]) for w in line.split() if w.startswith("sport="))
            packets = [int(w.split("=")[1]) for w in line.split() if w.startswith("packets=")]
            nbytes = [int(w.split("=")[1]) for w in line.split() if w.startswith("bytes=")]
            out[sport] = (packets[0], nbytes[0], packets[1], nbytes[1])
    return out


def nfdump_rows(files: list[Path], port: int = ECHO) -> dict[int, list[str]]:
    """sport -> FMT's columns, as `nfdump -r` lists the flows to `port`."""
    rows: dict[int, list[str]] = {}
    for f in files:
        out = subprocess.run(["nfdump", "-q", "-N", "-r", str(f), "-o", FMT, f"port {port}"],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            cols = [c.strip() for c in line.split("|")]
            rows[int(cols[2])] = cols
    return rows


async def test_nfcapd_receives_every_flow_with_the_kernels_counts(
        fw_topo: FirewallTopology, tmp_path: Path) -> None:
    t = fw_topo
    enable_kernel_accounting(t.fw.name)
    flows_dir = tmp_path / "flows"
    flows_dir.mkdir()
    nfcapd = t.server.popen("nfcapd", "-w", str(flows_dir), "-b", t.server_ip,
                            "-p", str(COLLECTOR_PORT), "-t", "3600",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    echo = udp_echo_server(t.server, ECHO)
    path = tmp_path / "acct.jsonl"
    collector = f"{t.server_ip}:{COLLECTOR_PORT}"
    acc = Accounting(ipfix_cfg(path, collector), node_id=42, netns_name=t.fw.name)
    tracker = Tracker(netns_name=t.fw.name, rcvbuf=8 << 20, on_flow_event=acc.on_flow_event)
    sent: dict[int, tuple[int, int, int]] = {}  # sport -> (family, datagrams, size)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)
            await nursery.start(acc.writer)
            for family, n, size in EXCHANGES:
                dst = t.server_ip if family == socket.AF_INET else t.server_ip6
                sport = await trio.to_thread.run_sync(exchange, t.client.name, family, dst, n,
                                                      size)
                sent[sport] = (family, n, size)
            kernel = kernel_counters(t.fw, ECHO)
            assert set(kernel) == set(sent), (kernel, sent)
            t.fw.conntrack_flush()  # conntrack -F in the firewall namespace: DESTROY events
            with trio.fail_after(10):
                while acc.sinks.get(f"ipfix {collector}", [0])[0] < len(sent):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        await trio.sleep(0.5)  # the last datagrams reach nfcapd
    finally:
        tracker.close()
        terminate(echo, 5)
        terminate(nfcapd, 10)  # SIGTERM: nfcapd writes out what it has
    log = nfcapd.stdout.read() if nfcapd.stdout else ""
    assert "Observation domain 42" in log, log
    assert acc.sinks[f"ipfix {collector}"][1] == 0
    assert acc.records_dropped == 0

    files = sorted(flows_dir.glob("nfcapd.*"))
    assert files, log
    rows = nfdump_rows(files)
    assert set(rows) == set(sent), (rows, sent)
    records = {int(r["orig"].split("sport=")[1].split()[0]): r
               for r in map(json.loads, path.read_text().splitlines())
               if f"dport={ECHO}" in r["orig"]}
    for sport, (family, n, size) in sent.items():
        sa, da, sp, dp, pr, ipkt, ibyt, opkt, obyt, xsa, _xda, xsp, xdp = rows[sport]
        v4 = family == socket.AF_INET
        wire = n * ((28 if v4 else 48) + size)
        assert (sa, da) == ((t.client_ip, t.server_ip) if v4 else (t.client_ip6, t.server_ip6))
        assert (int(sp), int(dp), int(pr)) == (sport, ECHO, 17)
        assert (int(ipkt), int(ibyt), int(opkt), int(obyt)) == (n, wire, n, wire)
        assert (int(ipkt), int(ibyt), int(opkt), int(obyt)) == kernel[sport]
        snat = records[sport]["snat"]
        assert snat is not None
        assert xsp == snat.rsplit(":", 1)[1]
        assert int(xdp) == ECHO
        if v4:
            assert xsa == t.fw_wan_ip == snat.split(":")[0]
        r = records[sport]
        assert (r["orig_packets"], r["orig_bytes"], r["reply_packets"], r["reply_bytes"]) == \
            kernel[sport]


def test_daemon_exports_what_its_config_says(fw_topo: FirewallTopology, tmp_path: Path) -> None:
    """The daemon itself (stats mode, the YAML keys `stats.accounting.ipfix`): records reach
    nfcapd under observation domain = the node id, and `-s accounting` counts them per sink."""
    from lab import PAYLOAD, DaemonProc, udp_flows
    t = fw_topo
    flows_dir = tmp_path / "flows"
    flows_dir.mkdir()
    nfcapd = t.server.popen("nfcapd", "-w", str(flows_dir), "-b", t.server_ip,
                            "-p", str(COLLECTOR_PORT), "-t", "3600",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    collector = f"{t.server_ip}:{COLLECTOR_PORT}"
    extra = ("stats:\n  accounting:\n    enabled: true\n"
             f"    ipfix: {{collectors: [\"{collector}\"], template_refresh: 60}}\n")
    d = DaemonProc(t.fw, str(tmp_path / "d"), 3, "10.255.0.1", general_mode="stats",
                   extra=extra)
    try:
        udp_flows(t.client, t.server_ip, 5, dport=7001)
        deadline = time.monotonic() + 10
        while len(d.call("dump", cache="internal")) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        t.fw.run("conntrack", "-D", "-p", "udp", "--orig-port-dst", "7001")

        def sink() -> dict[str, int]:
            out = d.cli("-s", "accounting", "-o", "json")
            assert out.returncode == 0, out.stderr
            sinks: dict[str, dict[str, int]] = json.loads(out.stdout)["accounting"]["sinks"]
            return sinks.get(f"ipfix {collector}", {"written": 0, "lost": 0})

        deadline = time.monotonic() + 10
        while sink()["written"] < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sink() == {"written": 5, "lost": 0}
        time.sleep(0.3)
    finally:
        d.stop()
        terminate(nfcapd, 10)
    log = nfcapd.stdout.read() if nfcapd.stdout else ""
    assert "Observation domain 3" in log, log
    rows = nfdump_rows(sorted(flows_dir.glob("nfcapd.*")), port=7001)
    assert len(rows) == 5, rows
    for cols in rows.values():
        assert cols[0] == t.client_ip
        assert cols[1] == t.server_ip
        assert cols[4] == "17"
        assert cols[5:9] == ["1", str(28 + len(PAYLOAD)), "0", "0"]
        assert cols[9] == t.fw_wan_ip
