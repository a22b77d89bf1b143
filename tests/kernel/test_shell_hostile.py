"""The shell under hostile local and network input: real daemons in lab namespaces.

Each test ends with: the daemon still runs, the input was counted, and replication (or the
commit a failover needs) still works. On main the first one killed the daemon.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from conntrackd_py.flow import Flow, Tuple, pack_flow
from conntrackd_py.netns import socket_in
from conntrackd_py.sync import wire
from conntrackd_py.sync.wire import Kind
from lab import SYNC_GROUP, DaemonProc, Lab, Netns, cluster_topology, udp_flows, wait_until

pytestmark = pytest.mark.kernel

METRICS_PORT = 9477
METRICS = f"metrics: {{listen: 127.0.0.1:{METRICS_PORT}}}\n"


def alive(d: DaemonProc) -> bool:
    return d.proc is not None and d.proc.poll() is None


def control(d: DaemonProc) -> dict[str, int]:
    return dict(d.stats("runtime")["control"])


def scrape(ns: Netns) -> bytes:
    with socket_in(ns.name, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", METRICS_PORT))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@contextlib.contextmanager
def descriptors(n: int) -> Iterator[None]:
    """This process may hold `n` more descriptors (the test opens many connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1024)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def start_pair(lab: Lab, tmp: str) -> tuple[object, DaemonProc, DaemonProc]:
    topo = cluster_topology(lab, n_fw=2)
    a = DaemonProc(topo.fws[0], os.path.join(tmp, "n1"), 1, topo.sync_ip(1))
    b = DaemonProc(topo.fws[1], os.path.join(tmp, "n2"), 2, topo.sync_ip(2), extra=METRICS)
    return topo, a, b


def test_metrics_resets_mid_request_leave_the_daemon_running_and_counting(
        lab: Lab, tmp_path: object) -> None:
    _topo, a, b = start_pair(lab, str(tmp_path))
    fw = b.ns
    for _ in range(5):
        s = socket_in(fw.name, socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", METRICS_PORT))
        s.sendall(b"GET /metr")
        time.sleep(0.05)  # the server is reading the rest of the request
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST
    wait_until(lambda: control(b)["metrics_client_errors"] >= 5, 10, "resets counted")
    assert alive(b)
    assert scrape(fw).startswith(b"HTTP/1.0 200 OK")
    assert b"conntrackd_py_metrics_client_errors_total 5.0" in scrape(fw)
    assert b"conntrackd_py_auth_enabled 1.0" in scrape(fw)
    assert alive(a)


def test_1100_idle_metrics_connections_do_not_stop_a_commit(lab: Lab, tmp_path: object) -> None:
    topo, _a, b = start_pair(lab, str(tmp_path))
    udp_flows(topo.client, topo.server_ip, 300)  # type: ignore[attr-defined]
    wait_until(lambda: b.stats("cache")["cache"]["external"] >= 300, 30, "replication")
    fw = b.ns
    idle: list[socket.socket] = []
    with descriptors(1200):
        try:
            for _ in range(1100):
                s = socket_in(fw.name, socket.AF_INET, socket.SOCK_STREAM)
                idle.append(s)
                s.connect(("127.0.0.1", METRICS_PORT))
            wait_until(lambda: control(b)["metrics_refused"] >= 1000, 20, "extra ones closed")
            assert control(b)["metrics_connections"] <= 64
            res = b.call("commit")
            assert res["created"] + res["updated"] >= 300
            assert alive(b)
        finally:
            for s in idle:
                s.close()
    rt = b.stats("runtime")["runtime"]
    assert rt["commits"] == 1
    assert rt["internal_errors"] == 0


def _forged_flow() -> tuple[bytes, bytes]:
    t = Tuple(b"\x0a\x00\x00\x63", b"\x0a\x00\x00\x64", 17, 1, 2)
    return pack_flow(Flow(t, t.invert(), timeout=300))


def test_spoofed_sync_datagrams_are_dropped_counted_and_sync_holds(
        lab: Lab, tmp_path: object) -> None:
    topo, a, b = start_pair(lab, str(tmp_path))
    udp_flows(topo.client, topo.server_ip, 100)  # type: ignore[attr-defined]
    wait_until(lambda: b.stats("cache")["cache"]["external"] >= 100, 30, "replication")
    wait_until(lambda: b.call("in_sync")["in_sync"], 30, "in sync")
    before = b.stats("sync")["sync"]
    rejected_before = sum(before["rejected"].values())
    st = a.stats("sync")["sync"]
    k, v = _forged_flow()
    forged = [
        # node 1's stream position, a jump of 2**30 with RESYNC_BEGIN, no tag at all
        wire.encode_datagram(1, st["epoch"], (st["seq"] + 2**30) & 0xFFFFFFFF,
                             [Kind.RESYNC_BEGIN, [(k, v)]], sequenced=True, first_lap=False),
        # and with a tag made with the wrong key
        wire.encode_datagram(1, st["epoch"], (st["seq"] + 1) & 0xFFFFFFFF, [[(k, v)]],
                             sequenced=True, first_lap=False, keys=[bytes(32)]),
        # a datagram far beyond the MTU (dropped by the transport before decoding)
        b"\0" * 4000,
    ]
    with socket_in(a.ns.name, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                     socket.inet_aton(topo.sync_ip(1)))  # type: ignore[attr-defined]
        for d in forged:
            s.sendto(d, (SYNC_GROUP, 3780))
    wait_until(lambda: sum(b.stats("sync")["sync"]["rejected"].values()) >= rejected_before + 2,
               10, "forgeries rejected")
    wait_until(lambda: b.stats("runtime")["runtime"]["oversize_datagrams"] >= 1, 10,
               "the oversize datagram counted")
    forged_key = k.hex()
    assert all(fk != forged_key for _o, fk, _v in b.call("dump", cache="external", raw=True))
    # replication goes on: new flows still arrive, and the gate stays true
    udp_flows(topo.client, topo.server_ip, 50, dport=7000)  # type: ignore[attr-defined]
    wait_until(lambda: b.stats("cache")["cache"]["external"] >= 150, 30, "replication after")
    wait_until(lambda: b.call("in_sync")["in_sync"], 30, "in sync after")
    assert alive(a)
    assert alive(b)
    assert b.stats("runtime")["runtime"]["internal_errors"] == 0


def test_the_link_watcher_sees_the_sync_interface_go_down_and_up(lab: Lab) -> None:
    """rtnetlink link events decoded in place (struct ifinfomsg), not through pyroute2, whose
    import alone delayed the start by 0.1-0.4 s."""
    import trio

    from conntrackd_py.transport import ChannelSpec, Transport

    topo = cluster_topology(lab, n_fw=2)
    fw = topo.fws[0]
    tp = Transport([ChannelSpec(port=3799, group=SYNC_GROUP, interface="sync0",
                                source=topo.sync_ip(1))],
                   netns_name=fw.name, silence_timeout=5.0, failback=True, max_datagram=1500)
    ch = tp.channels[0]
    seen: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tp.watch_links, trio.current_time)
            await trio.sleep(0.2)
            seen.append(ch.link_up)
            for state in ("down", "up"):
                await trio.to_thread.run_sync(fw.ip, "link", "set", "sync0", state)
                with trio.move_on_after(5):
                    while ch.link_up != (state == "up"):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                seen.append(ch.link_up)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        tp.close()
    assert seen == [True, False, True]
