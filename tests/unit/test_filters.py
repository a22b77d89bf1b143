"""The tracking filter: protocols, CIDRs, TCP states and the sync link's own traffic."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from conntrackd_py.config import loads
from conntrackd_py.filters import Net, build, build_filter
from conntrackd_py.flow import Flow, Tuple


def flow(src: str, dst: str, proto: int = 17, sport: int = 1000, dport: int = 53,
         state: int | None = None) -> Flow:
    t = Tuple(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, proto,
              sport, dport)
    return Flow(t, t.invert(), state=state)


def test_address_filters_match_cidrs_of_both_families_on_either_end() -> None:
    # (plain flows: the reply source is the original destination)
    nets = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fd00:1::/64"))
    keep = build(addresses=("ignore", nets))
    assert not keep(flow("127.0.0.1", "10.0.0.1"))
    assert not keep(flow("10.0.0.1", "127.9.9.9"))
    assert not keep(flow("fd00:1::5", "fd00:2::1"))
    assert keep(flow("10.0.0.1", "10.0.0.2"))
    assert keep(flow("fd00:2::5", "fd00:2::1"))
    only = build(addresses=("accept", nets))
    assert only(flow("127.0.0.1", "10.0.0.1"))
    assert not only(flow("10.0.0.1", "10.0.0.2"))


# --- which tuple an address filter checks: conntrackd's rule (src/filter.c, ct_filter_check):
# the original source and the reply source, the flow's real endpoints. A firewall pair as in
# conntrackd's example configs: outside 10.0.1.0/24 (own 10.0.1.1, VIP 10.0.1.100), inside
# 10.0.2.0/24 (own 10.0.2.1, server 10.0.2.2), sync link 10.0.3.0/24, a client 198.51.100.7.

OWN = ("127.0.0.1", "10.0.1.100", "10.0.1.1", "10.0.2.1", "10.0.3.1")  # as the examples list
IGNORE_OWN = build(addresses=("ignore", tuple(ipaddress.ip_network(a) for a in OWN)))


def nat(orig: tuple[str, int, str, int], reply: tuple[str, int, str, int],
        proto: int = 6) -> Flow:
    """A flow whose reply tuple is given in full, as the kernel reports a NAT'd one."""
    def tup(src: str, sport: int, dst: str, dport: int) -> Tuple:
        return Tuple(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, proto,
                     sport, dport)
    return Flow(tup(*orig), tup(*reply), state=3)


def test_plain_forwarded_flow_is_replicated() -> None:
    assert IGNORE_OWN(nat(("198.51.100.7", 50000, "10.0.2.2", 22),
                          ("10.0.2.2", 22, "198.51.100.7", 50000)))


def test_snat_flow_from_inside_is_replicated() -> None:
    # 10.0.2.2 -> 203.0.113.9:443, masqueraded to the VIP: the reply goes to the VIP, but the
    # real endpoints are 10.0.2.2 and 203.0.113.9
    assert IGNORE_OWN(nat(("10.0.2.2", 40000, "203.0.113.9", 443),
                          ("203.0.113.9", 443, "10.0.1.100", 40000)))


def test_dnat_port_forward_to_an_ignored_vip_is_replicated() -> None:
    # client -> VIP:8080, DNAT'd to 10.0.2.2:80: the VIP is only the original destination;
    # the reply comes from the server. (Matching the original destination, as this module did
    # before, dropped every port forward to a VIP listed as ignored.)
    fwd = nat(("198.51.100.7", 50000, "10.0.1.100", 8080), ("10.0.2.2", 80, "198.51.100.7",
                                                            50000))
    assert IGNORE_OWN(fwd)
    v6 = build(addresses=("ignore", (ipaddress.ip_network("fd00:1::100"),)))
    assert v6(nat(("2001:db8::7", 50000, "fd00:1::100", 8080), ("fd00:2::2", 80,
                                                                "2001:db8::7", 50000)))
    assert not v6(nat(("2001:db8::7", 50000, "fd00:1::100", 22), ("fd00:1::100", 22,
                                                                  "2001:db8::7", 50000)))


def test_flows_of_the_firewalls_own_ignored_addresses_are_not_replicated() -> None:
    # from the firewall (a DNS query from its outside address)
    assert not IGNORE_OWN(nat(("10.0.1.1", 33000, "9.9.9.9", 53), ("9.9.9.9", 53, "10.0.1.1",
                                                                   33000), proto=17))
    # to the firewall: ssh to its inside address, and to the VIP itself (not forwarded)
    assert not IGNORE_OWN(nat(("10.0.2.2", 41000, "10.0.2.1", 22), ("10.0.2.1", 22,
                                                                    "10.0.2.2", 41000)))
    assert not IGNORE_OWN(nat(("198.51.100.7", 50001, "10.0.1.100", 22), ("10.0.1.100", 22,
                                                                         "198.51.100.7",
                                                                         50001)))
    assert not IGNORE_OWN(flow("127.0.0.1", "127.0.0.1"))


def test_the_sync_links_own_traffic_is_always_ignored() -> None:
    sync = flow("10.0.3.1", "225.0.0.50", sport=3780, dport=3780)
    assert not build(sync_ports=(3780,), sync_addrs=("10.0.3.1", "225.0.0.50"))(sync)
    # with an address filter that does not list the link, and with one that accepts it
    for addresses in (("ignore", (ipaddress.ip_network("10.0.1.1"),)),
                      ("accept", (ipaddress.ip_network("10.0.3.0/24"),))):
        assert not build(addresses=addresses, sync_ports=(3780,),
                         sync_addrs=("10.0.3.1", "225.0.0.50"))(sync)


def test_accept_policy_keeps_flows_whose_real_endpoint_is_listed() -> None:
    inside = build(addresses=("accept", (ipaddress.ip_network("10.0.2.0/24"),)))
    assert inside(nat(("198.51.100.7", 50000, "10.0.1.100", 8080),
                      ("10.0.2.2", 80, "198.51.100.7", 50000)))  # port forward inward
    assert inside(nat(("10.0.2.2", 40000, "203.0.113.9", 443),
                      ("203.0.113.9", 443, "10.0.1.100", 40000)))  # masquerade outward
    assert not inside(nat(("198.51.100.7", 50001, "10.0.1.100", 22), ("10.0.1.100", 22,
                                                                      "198.51.100.7", 50001)))
    # no IPv6 network listed: an IPv6 flow matches nothing, so accept drops it (as conntrackd)
    assert not inside(flow("fd00:2::2", "fd00:2::3"))
    # ignore keeps a flow of a family it lists nothing for
    assert IGNORE_OWN(flow("fd00:2::2", "fd00:2::3"))


def test_protocol_and_tcp_state_filters() -> None:
    keep = build(protocols=("accept", (6,)), tcp_states=("accept", (3,)))
    assert keep(flow("10.0.0.1", "10.0.0.2", proto=6, state=3))
    assert not keep(flow("10.0.0.1", "10.0.0.2", proto=6, state=7))
    assert not keep(flow("10.0.0.1", "10.0.0.2", proto=17))


def test_sync_traffic_is_ignored_but_a_client_flow_on_the_same_port_is_not() -> None:
    keep = build(sync_ports=(3780,), sync_addrs=("10.0.3.1", "225.0.0.50"))
    assert not keep(flow("10.0.3.1", "225.0.0.50", sport=3780, dport=3780))
    assert keep(flow("10.0.1.2", "10.0.2.2", sport=40000, dport=3780))
    assert keep(flow("10.0.1.2", "10.0.2.2"))


# --- address matching: one set lookup per prefix length, proven against ipaddress -----------

NETS_V4 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                    st.integers(0, 2**32 - 1), st.integers(0, 32))
NETS_V6 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                    st.integers(0, 2**128 - 1), st.integers(0, 128))
ADDRS = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address) | st.integers(
    0, 2**128 - 1).map(ipaddress.IPv6Address)


def related(nets: list[Net], addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Net]:
    """Networks around `addr` too, so that hits are as likely as misses."""
    return nets + [ipaddress.ip_network((addr, p), strict=False)
                   for p in range(0, addr.max_prefixlen + 1, 7)][: len(nets) % 4]


@given(st.lists(NETS_V4 | NETS_V6, max_size=12), ADDRS, ADDRS, st.sampled_from(
    ["accept", "ignore"]))
def test_address_filter_matches_like_ipaddress_membership(
        nets: list[Net], src: ipaddress.IPv4Address | ipaddress.IPv6Address,
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: str) -> None:
    if src.version != dst.version:
        dst = src
    nets = related(nets, src)
    keep = build(addresses=(policy, tuple(nets)))
    hit = any(a in n for n in nets for a in (src, dst) if a.version == n.version)
    assert keep(flow(str(src), str(dst))) == (hit == (policy == "accept"))
    # a DNAT'd flow to `dst` answered by `src`'s neighbour: only orig src and reply src count
    via = type(src)(int(src) ^ 1)
    t = Tuple(src.packed, dst.packed, 6, 1000, 80)
    fwd = Flow(t, Tuple(via.packed, src.packed, 6, 80, 1000))
    hit = any(a in n for n in nets for a in (src, via) if a.version == n.version)
    assert keep(fwd) == (hit == (policy == "accept"))


def test_twenty_thousand_networks_match_by_prefix_not_by_scan() -> None:
    nets = tuple(ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24") for i in range(20000))
    nets += (ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("172.16.5.9"))
    keep = build(addresses=("ignore", nets))
    assert not keep(flow("10.78.31.200", "8.8.8.8"))  # 10.78.31.0/24 is entry 19999
    assert not keep(flow("8.8.8.8", "192.168.77.1"))
    assert not keep(flow("172.16.5.9", "8.8.8.8"))
    assert keep(flow("10.79.0.1", "8.8.8.8"))  # just past the last /24
    assert keep(flow("172.16.5.8", "8.8.8.8"))


BASE = ("node: {id: 1}\n"
        "sync:\n  auth: {required: false}\n"
        "  channels: [{udp: {bind: 10.9.0.1, peers: [10.9.0.2], port: 3780}}]\n")


def test_build_filter_takes_the_configured_lists_and_the_sync_links_own_traffic() -> None:
    keep = build_filter(loads(BASE + "filters:\n  protocols: {ignore: [icmp]}\n"))
    assert keep(flow("10.0.0.1", "10.0.0.2"))
    assert not keep(flow("10.0.0.1", "10.0.0.2", proto=1))
    # the sync protocol between the channel's addresses: never replicated
    assert not keep(flow("10.9.0.1", "10.9.0.2", sport=3780, dport=3780))
    assert not keep(flow("10.9.0.1", "10.9.0.2", proto=6, sport=22, dport=22))
    # the same port between other hosts is a client's flow
    assert keep(flow("10.0.0.1", "10.0.0.2", sport=3780, dport=3780))
    # ignore_sync_link off: the link's flows are the configured lists' only
    off = build_filter(loads(BASE + "filters: {ignore_sync_link: false}\n"))
    assert off(flow("10.9.0.1", "10.9.0.2", sport=3780, dport=3780))
    # general.mode stats: no channel is opened, so none is ignored
    stats = build_filter(loads("node: {id: 1}\ngeneral: {mode: stats}\n"))
    assert stats(flow("10.9.0.1", "10.9.0.2", sport=3780, dport=3780))
