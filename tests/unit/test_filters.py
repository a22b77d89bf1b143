"""The tracking filter: protocols, CIDRs, TCP states and the sync link's own traffic."""

from __future__ import annotations

import ipaddress

from conntrackd_py.filters import build
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
