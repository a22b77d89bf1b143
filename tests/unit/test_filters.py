"""The tracking filter: protocols, CIDRs, TCP states and the sync link's own traffic."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from conntrackd_py.filters import Net, build
from conntrackd_py.flow import Flow, Tuple


def flow(src: str, dst: str, proto: int = 17, sport: int = 1000, dport: int = 53,
         state: int | None = None) -> Flow:
    t = Tuple(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, proto,
              sport, dport)
    return Flow(t, t.invert(), state=state)


def test_address_filters_match_cidrs_of_both_families_on_either_end() -> None:
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


def test_twenty_thousand_networks_match_by_prefix_not_by_scan() -> None:
    nets = tuple(ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24") for i in range(20000))
    nets += (ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("172.16.5.9"))
    keep = build(addresses=("ignore", nets))
    assert not keep(flow("10.78.31.200", "8.8.8.8"))  # 10.78.31.0/24 is entry 19999
    assert not keep(flow("8.8.8.8", "192.168.77.1"))
    assert not keep(flow("172.16.5.9", "8.8.8.8"))
    assert keep(flow("10.79.0.1", "8.8.8.8"))  # just past the last /24
    assert keep(flow("172.16.5.8", "8.8.8.8"))
