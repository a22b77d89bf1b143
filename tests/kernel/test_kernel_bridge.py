"""The kernel bridge against the real kernel in lab namespaces: events, dumps, overruns, commit."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import pytest
import trio
from tcpconn import TcpConn

from conntrackd_py.flow import Flow, Status, TcpState, pack_key
from conntrackd_py.kernel.table import Table
from conntrackd_py.tracker import Tracker
from lab import FirewallTopology, Lab, cluster_topology, udp_flows

pytestmark = pytest.mark.kernel


async def wait_for(pred: Callable[[], bool], limit: float = 10.0,
                   what: str = "condition") -> None:
    with trio.move_on_after(limit):
        while not pred():  # noqa: ASYNC110 - polling the kernel's side, not a trio event
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


def _conntrack_entries(lines: list[str]) -> dict[tuple[str, ...], dict[str, str]]:
    """Index `conntrack -L -o extended` lines by their original tuple."""
    out = {}
    for line in lines:
        f = line.split()
        if len(f) < 6 or f[0] not in ("ipv4", "ipv6"):
            continue
        kv = re.findall(r"(\w+)=(\S+)", line)
        orig = tuple(v for k, v in kv[:4])
        reply = tuple(v for k, v in kv[4:8])
        state = f[5] if f[5].isupper() else ""
        mark = dict(kv).get("mark", "0")
        out[(f[2], *orig)] = {"reply": " ".join(reply), "state": state, "mark": mark}
    return out


def _flow_key(f: Flow) -> tuple[str, ...]:
    o = f.orig
    name = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(o.proto, str(o.proto))
    return (name, str(ipaddress.ip_address(o.src)), str(ipaddress.ip_address(o.dst)),
            str(o.sport), str(o.dport))


async def test_real_flows_appear_with_the_tuples_nat_state_and_mark_conntrack_shows(
        lab: Lab, fw_topo: FirewallTopology) -> None:
    t = fw_topo
    tracker = Tracker(netns_name=t.fw.name, rcvbuf=8 << 20)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)
            conn = TcpConn(t.client, t.server, t.server_ip, 8080)
            assert conn.exchange().startswith("ok")
            udp_flows(t.client, t.server_ip, 20, dport=5001)  # marked by the ruleset
            udp_flows(t.client, t.server_ip6, 5, dport=5002)

            def have_all() -> bool:
                flows = list(tracker.cache.flows())
                return (sum(f.orig.dport == 5001 for f in flows) == 20
                        and sum(f.orig.dport == 5002 for f in flows) == 5
                        and any(f.orig.sport == conn.sport and f.state == TcpState.ESTABLISHED
                                for f in flows))

            await wait_for(have_all, what="tcp and udp flows in the internal cache")
            kernel = _conntrack_entries(t.fw.conntrack_list())
            flows = list(tracker.cache.flows())
            assert len(flows) == len(kernel)
            for f in flows:
                k = kernel[_flow_key(f)]
                rep = f.reply
                assert k["reply"] == " ".join((str(ipaddress.ip_address(rep.src)),
                                               str(ipaddress.ip_address(rep.dst)),
                                               str(rep.sport), str(rep.dport)))
                assert int(k["mark"]) == f.mark
                if f.orig.proto == 6:
                    assert f.state is not None
                    assert k["state"] == TcpState(f.state).name
            tcp = next(f for f in flows if f.orig.sport == conn.sport)
            assert tcp.is_snat
            assert tcp.snat_to is not None
            assert tcp.snat_to[0] == ipaddress.ip_address(t.fw_wan_ip).packed  # masquerade
            assert all(f.mark == 0x2A for f in flows if f.orig.dport == 5001)

            # UPDATE: the connection closes; DESTROY: conntrack -D removes the UDP flows
            conn.client.stdin.close()  # type: ignore[union-attr]
            conn.client.wait(5)
            await wait_for(lambda: any(f.orig.sport == conn.sport
                                       and f.state != TcpState.ESTABLISHED
                                       for f in tracker.cache.flows()), what="tcp state update")
            t.fw.run("conntrack", "-D", "-p", "udp", "--dport", "5001")
            await wait_for(lambda: not any(f.orig.dport == 5001 for f in tracker.cache.flows()),
                           what="destroys")
            assert tracker.events.stats.destroy >= 20
            assert tracker.events.stats.update >= 1

            # conntrack -F empties the cache
            t.fw.conntrack_flush()
            await wait_for(lambda: len(tracker.cache) == 0, what="flush to empty the cache")
            nursery.cancel_scope.cancel()
    finally:
        tracker.close()


async def test_flows_created_before_the_start_are_found_by_the_startup_dump(
        lab: Lab, fw_topo: FirewallTopology) -> None:
    t = fw_topo
    udp_flows(t.client, t.server_ip, 300)
    tracker = Tracker(netns_name=t.fw.name)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)
            assert len(tracker.cache) == t.fw.conntrack_count() == 300
            nursery.cancel_scope.cancel()
    finally:
        tracker.close()


async def test_overrun_is_detected_and_the_reconcile_dump_makes_the_cache_equal_the_kernel(
        lab: Lab, fw_topo: FirewallTopology) -> None:
    t = fw_topo
    tracker = Tracker(netns_name=t.fw.name, rcvbuf=4096)
    table = Table(t.fw.name)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)
            # a burst from another thread while the event reader runs: the tiny buffer overflows
            await trio.to_thread.run_sync(udp_flows, t.client, t.server_ip, 20000)
            await wait_for(lambda: tracker.events.stats.overruns > 0, what="an overrun")
            await wait_for(lambda: len(tracker.cache) == 20000, limit=20,
                           what="reconcile to reach the kernel's 20000 entries")
            t.fw.run("conntrack", "-D", "-p", "udp", "--sport", "1024")
            await trio.sleep(0.5)
            kernel = {pack_key(f.zone, f.orig) for f in await table.dump()}
            assert set(k for k, _ in tracker.cache.items()) == kernel
            assert len(kernel) == t.fw.conntrack_count()
            assert tracker.stats.reconciles >= 2  # start-up dump + at least one after overrun
            nursery.cancel_scope.cancel()
    finally:
        tracker.close()
        table.close()


async def test_committed_flows_match_and_carry_a_natted_tcp_stream_through_a_strict_firewall(
        lab: Lab) -> None:
    topo = cluster_topology(lab, n_fw=2, nat=True, vip_on=1)
    fw1, fw2 = topo.fws
    for fw in (fw1, fw2):
        fw.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
        fw.sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 0)
    # fw2 forwards only what its conntrack table already knows
    fw2.nft("flush chain inet ctpy forward\n"
            "add rule inet ctpy forward ct state established,related accept\n")
    kept = TcpConn(topo.client, topo.server, topo.server_ip, 8080)
    dropped = TcpConn(topo.client, topo.server, topo.server_ip, 8081)
    assert kept.exchange().startswith("ok")
    assert dropped.exchange().startswith("ok")
    udp_flows(topo.client, topo.server_ip, 100, dport=5001)
    udp_flows(topo.client, topo.server_ip6, 10, dport=5003)

    src, dst = Table(fw1.name), Table(fw2.name, batch=16)
    try:
        flows = [f for f in await src.dump() if f.orig.sport != dropped.sport]
        # every third flow first: the full commit then meets existing entries spread through
        # its batches (the kernel answers only failures and each batch's last request)
        some = flows[::3]
        first = await dst.commit(some)
        assert (first.created, first.failed) == (len(some), 0), first.summary()
        res = await dst.commit(flows)
        assert (res.created, res.updated, res.failed) == (
            len(flows) - len(some), len(some), 0), res.summary()
        again = await dst.commit(flows)  # EEXIST is answered by an update
        assert (again.created, again.updated, again.failed) == (0, len(flows), 0)

        want = _conntrack_entries(fw1.conntrack_list())
        got = _conntrack_entries(fw2.conntrack_list())
        del want[("tcp", topo.client_ip, topo.server_ip, str(dropped.sport), "8081")]
        assert set(got) == set(want)
        for key, entry in want.items():
            assert got[key]["reply"] == entry["reply"], key  # NAT applied as on fw1
            assert got[key]["mark"] == entry["mark"], key
            assert got[key]["state"] == entry["state"], key
        committed = {pack_key(f.zone, f.orig): f for f in await dst.dump()}
        for f in flows:
            g = committed[pack_key(f.zone, f.orig)]
            assert g.status & Status.CONFIRMED
            assert g.status & Status.SRC_NAT
            assert g.zone == f.zone
            assert g.mark == f.mark

        topo.move_vip(fw2)
        assert kept.exchange(timeout=5).startswith("ok"), "the committed stream continues"
        assert not dropped.exchange(timeout=2).startswith("ok"), "an uncommitted one cannot"
    finally:
        src.close()
        dst.close()


async def test_get_delete_and_filtered_flush(lab: Lab, fw_topo: FirewallTopology) -> None:
    t = fw_topo
    udp_flows(t.client, t.server_ip, 50, dport=5001)
    udp_flows(t.client, t.server_ip, 50, dport=5002)
    table = Table(t.fw.name)
    try:
        flows = await table.dump()
        one = flows[0]
        got = await table.get(one.zone, one.orig)
        assert got is not None
        assert got.orig == one.orig
        assert await table.delete(one.zone, one.orig)
        assert await table.get(one.zone, one.orig) is None
        assert not await table.delete(one.zone, one.orig)
        n = await table.flush(lambda f: f.mark == 0x2A)
        assert n == sum(1 for f in flows if f.mark == 0x2A) - (one.mark == 0x2A)
        assert t.fw.conntrack_count() == 50 - (one.mark != 0x2A)
        await table.flush()
        assert t.fw.conntrack_count() == 0
    finally:
        table.close()
