"""The lab builds working topologies and leaves nothing behind (real namespaces, real kernel)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conntrackd_py.netns import socket_in
from lab import (
    MARK,
    MARK_DPORT,
    SYNC_GROUP,
    DaemonProc,
    FirewallTopology,
    Keepalived,
    Lab,
    add_sync_loss,
    cluster_topology,
    lab_namespaces,
    notify_script,
    udp_echo_server,
    udp_flows,
    udp_flows_popen,
    wait_until,
)
from lab.bench import OURS, REF, start_pair, wait_ready

pytestmark = pytest.mark.kernel

SYNC_PORT = 3780
SO_RCVBUFFORCE = 33  # not in Python's socket module


def _receiver(ns_name: str, port: int, group: str | None = None,
              iface_ip: str = "0.0.0.0") -> socket.socket:
    sock = socket_in(ns_name, socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    sock.bind(("", port))
    if group:
        mreq = socket.inet_aton(group) + socket.inet_aton(iface_ip)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(2048))
        except BlockingIOError:
            return got


def test_ping_crosses_the_firewall_in_both_families(fw_topo: FirewallTopology) -> None:
    assert fw_topo.client.ping(fw_topo.server_ip)
    assert fw_topo.client.ping(fw_topo.server_ip6)
    assert not fw_topo.server.ping(fw_topo.client_ip6, timeout=0.3)  # new flows only from lan0


def test_firewall_masquerades_and_sees_the_reply(fw_topo: FirewallTopology) -> None:
    udp_echo_server(fw_topo.server, 7000)
    with socket_in(fw_topo.client.name, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.bind((fw_topo.client_ip, 40000))
        sock.sendto(b"hello", (fw_topo.server_ip, 7000))
        assert sock.recv(100) == b"hello"
    [line] = [x for x in fw_topo.fw.conntrack_list() if "dport=7000" in x]
    assert (f"src={fw_topo.client_ip} dst={fw_topo.server_ip} sport=40000 dport=7000 "
            f"src={fw_topo.server_ip} dst={fw_topo.fw_wan_ip} sport=7000") in line
    assert "[UNREPLIED]" not in line


def test_flows_to_the_mark_port_get_the_mark(fw_topo: FirewallTopology) -> None:
    udp_flows(fw_topo.client, fw_topo.server_ip, 3, dport=MARK_DPORT)
    udp_flows(fw_topo.client, fw_topo.server_ip6, 3, dport=MARK_DPORT + 10)
    lines = fw_topo.fw.conntrack_list()
    marked = [x for x in lines if f"mark={MARK} " in x]
    assert len(marked) == 3
    assert all(f"dport={MARK_DPORT}" in x and x.startswith("ipv4") for x in marked)
    assert sum(x.startswith("ipv6") and "udp" in x for x in lines) == 3


def test_udp_flows_create_one_conntrack_entry_per_flow(fw_topo: FirewallTopology) -> None:
    burst = udp_flows(fw_topo.client, fw_topo.server_ip, 20_000)
    assert burst.sent == 20_000
    assert fw_topo.fw.conntrack_count() >= 20_000
    print(f"udp_flows: {burst.sent} flows in {burst.seconds:.3f} s = {burst.rate:,.0f} flows/s")


def test_udp_flows_past_one_port_block_stay_distinct_under_masquerade(
    fw_topo: FirewallTopology,
) -> None:
    # 64512 source ports per destination port; the 64513th flow moves to dport 5001
    proc = udp_flows_popen(fw_topo.client, fw_topo.server_ip6, 64_520, max_seconds=20)
    out, _ = proc.communicate(timeout=30)
    assert int(out.split()[0]) == 64_520
    assert fw_topo.fw.conntrack_count() >= 64_520
    orig_dports = [x.split(" dport=")[1].split()[0] for x in fw_topo.fw.conntrack_list()]
    assert orig_dports.count("5001") == 8


def test_multicast_on_the_sync_link_reaches_every_peer(lab: Lab) -> None:
    topo = cluster_topology(lab, n_fw=3)
    receivers = [_receiver(fw.name, SYNC_PORT, SYNC_GROUP, topo.sync_ip(k))
                 for k, fw in enumerate(topo.fws[1:], 2)]
    try:
        with socket_in(topo.fws[0].name, socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(3):
                tx.sendto(b"sync", (SYNC_GROUP, SYNC_PORT))
                time.sleep(0.05)
        assert [len(_drain(r)) for r in receivers] == [3, 3]
    finally:
        for r in receivers:
            r.close()


def test_sync_loss_drops_about_the_requested_share(lab: Lab) -> None:
    topo = cluster_topology(lab, n_fw=2, vip_on=None)
    add_sync_loss(topo.fws[1], SYNC_PORT, 20)
    with _receiver(topo.fws[1].name, SYNC_PORT) as rx, \
            socket_in(topo.fws[0].name, socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for i in range(2000):
            tx.sendto(struct.pack("!I", i), (topo.sync_ip(2), SYNC_PORT))
        time.sleep(0.05)
        got = len(_drain(rx))
    assert 0.10 <= 1 - got / 2000 <= 0.30, f"{2000 - got} of 2000 dropped"


def test_moving_the_vip_moves_the_traffic(lab: Lab) -> None:
    topo = cluster_topology(lab, n_fw=2)
    fw1, fw2 = topo.fws
    assert topo.client.ping(topo.server_ip)
    assert any(" icmp " in x for x in fw1.conntrack_list())
    assert not any(" icmp " in x for x in fw2.conntrack_list())
    topo.move_vip(fw2)
    assert topo.client.ping(topo.server_ip)
    assert topo.client.ping(topo.server_ip6)
    [line] = [x for x in fw2.conntrack_list() if x.startswith("ipv4")]
    assert f"dst={topo.wan_vip}" in line  # SNAT to the shared server-side VIP


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().count("State:\tZ") == 1
    except FileNotFoundError:
        return True


def test_close_kills_processes_and_deletes_namespaces(require_root: None) -> None:
    with pytest.raises(RuntimeError, match="test body failed"), Lab() as lab:  # noqa: PT012
        a, b = lab.netns("a"), lab.netns("b")
        lab.link(a, "eth0", b, "eth0")
        tracked = a.popen("sleep", "60")
        b.run("sh", "-c", "sleep 60 >/dev/null 2>&1 &")  # untracked: found via its namespace
        [stray] = subprocess.run(["ip", "netns", "pids", b.name], capture_output=True,
                                 text=True, check=True).stdout.split()
        names = [a.name, b.name]
        assert set(names) <= set(os.listdir("/run/netns"))
        raise RuntimeError("test body failed")
    assert tracked.returncode is not None
    deadline = time.monotonic() + 2
    while not _gone(int(stray)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gone(int(stray))
    assert not set(names) & set(os.listdir("/run/netns"))
    assert lab_namespaces() == []


def test_daemons_authenticate_with_the_labs_cluster_key_by_default(lab: Lab,
                                                                   tmp_path: Path) -> None:
    """Auth is required by default (issue 13): DaemonProc gives every daemon of a lab the same
    random 32-byte key in a 0600 file, and the two nodes then see each other in sync."""
    topo = cluster_topology(lab, n_fw=2)
    ds = [DaemonProc(fw, str(tmp_path / f"d{k}"), k, topo.sync_ip(k))
          for k, fw in enumerate(topo.fws, 1)]
    keys = []
    for d in ds:
        assert d.key_file is not None
        assert os.stat(d.key_file).st_mode & 0o777 == 0o600
        keys.append(bytes.fromhex(Path(d.key_file).read_text()))
        assert f"key_files: [{d.key_file}]" in Path(d.conf).read_text()
    assert keys[0] == keys[1] == lab.sync_key
    assert len(lab.sync_key) == 32
    assert Lab().sync_key != lab.sync_key  # another cluster, another key
    # the readiness gate keepalived trusts: both nodes see their authenticated peer
    wait_until(lambda: all(d.cli("-s", "sync").returncode == 0 for d in ds), 15,
               "both nodes in sync")


def test_a_daemon_without_auth_says_so_in_its_config(lab: Lab, tmp_path: Path) -> None:
    topo = cluster_topology(lab, n_fw=2)
    d = DaemonProc(topo.fws[0], str(tmp_path / "d"), 1, topo.sync_ip(1), auth=False)
    assert d.key_file is None
    assert not (tmp_path / "d" / "sync.key").exists()
    assert "auth: {required: false}" in Path(d.conf).read_text()
    assert d.alive()  # the config helper accepts it: the daemon runs without a key
    with pytest.raises(ValueError, match="auth=False"):
        DaemonProc(topo.fws[1], str(tmp_path / "e"), 2, topo.sync_ip(2), key=b"k" * 32,
                   auth=False)


def test_the_notify_script_is_one_file_shipped_as_package_data() -> None:
    """The demo runs the notify script operators install: package data of conntrackd_py, and
    config/keepalived/notify.sh of the checkout is a link to that same file (no copy)."""
    repo = Path(__file__).resolve().parents[2]
    shipped = repo / "conntrackd_py" / "keepalived" / "notify.sh"
    operators = repo / "config" / "keepalived" / "notify.sh"
    assert notify_script() == shipped.read_bytes()
    assert notify_script().startswith(b"#!/bin/sh\n")
    assert operators.is_symlink()
    assert operators.resolve() == shipped.resolve()
    assert os.access(shipped, os.X_OK)


def test_lab_programs_refuse_a_bad_command_line() -> None:
    p = subprocess.run([sys.executable, "-m", "lab.programs", "nosuch"], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2
    assert "usage: python -m lab.programs" in p.stderr


@pytest.mark.parametrize("kind", [OURS, REF])
def test_both_sync_daemons_answer_the_one_interface(lab: Lab, tmp_path: Path, kind: str) -> None:
    """conntrackd-py and conntrackd behind SyncDaemon (what the benchmarks drive): flows made
    through fw1 show up in fw2's external count, A's internal count and bytes sent grow, and
    kill() leaves no process."""
    topo = cluster_topology(lab, n_fw=2)
    a, b = start_pair(kind, topo, str(tmp_path))
    wait_ready(a, b)
    sent0 = a.bytes_sent()
    udp_flows(topo.client, topo.server_ip, 300, dport=6000)
    wait_until(lambda: b.external_count() >= 300, 15, f"{kind}: 300 flows in B")
    assert a.internal_count() >= 300
    assert a.bytes_sent() > sent0
    for d in (a, b):
        d.kill()
        assert not d.alive()


def test_a_daemons_address_filter_is_a_parameter(lab: Lab, tmp_path: Path) -> None:
    """`ignore_addresses` becomes filters.addresses.ignore: flows from the ignored client
    address (IPv6 here) never enter the internal cache, the client's IPv4 flows do."""
    topo = cluster_topology(lab, n_fw=2)
    d = DaemonProc(topo.fws[0], str(tmp_path / "d"), 1, topo.sync_ip(1),
                   ignore_addresses=["127.0.0.0/8", "::1", topo.client_ip6])
    assert f'ignore: ["127.0.0.0/8", "::1", "{topo.client_ip6}"]' in Path(d.conf).read_text()
    udp_flows(topo.client, topo.server_ip6, 20, dport=6100)
    udp_flows(topo.client, topo.server_ip, 20, dport=6200)
    wait_until(lambda: d.internal_count() >= 20, 10, "the IPv4 flows in the internal cache")
    dump = d.call("dump", cache="internal")
    assert sum(f"src={topo.client_ip} " in line and "dport=6200" in line for line in dump) == 20
    assert not [line for line in dump if topo.client_ip6 in line]


def test_keepalived_writes_its_state_to_the_notify_fifo(lab: Lab, tmp_path: Path) -> None:
    """Keepalived(notify_fifo=...) gets `vrrp_notify_fifo`: keepalived writes its transitions
    there (`INSTANCE "FW" MASTER 150`), while the notify script still logs start/done."""
    topo = cluster_topology(lab, n_fw=2, vip_on=None)
    fifo = str(tmp_path / "vrrp.fifo")
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader first: writes never block
    try:
        k = Keepalived(topo.fws[0], str(tmp_path / "k"), topo, 150, None, notify_fifo=fifo)
        assert f"vrrp_notify_fifo {fifo}" in Path(k.conf).read_text()
        wait_until(k.is_master, 15, "fw1 to become master")
        got = b""

        def master_line() -> bool:
            nonlocal got
            with contextlib.suppress(BlockingIOError):
                got += os.read(fd, 4096)
            return b'INSTANCE "FW" MASTER 150' in got

        wait_until(master_line, 5, "the MASTER line in the FIFO")
        k.kill()
    finally:
        os.close(fd)
