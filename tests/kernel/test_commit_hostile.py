"""A peer's bad flows against the real kernel in a namespace: one entry never stops a commit, on
the forked commit's path (cache entries), the direct writer's (Flows) and the EEXIST branch;
and the blocking commit works when the netlink socket's descriptor is above 1023."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from conntrackd_py.cache import ExternalCache
from conntrackd_py.flow import (
    K_ZONE,
    V_REPLY,
    V_TCP_FLAGS_ORIG,
    Flow,
    Status,
    Tuple,
    filter_untrusted,
    pack_flow,
)
from conntrackd_py.kernel.table import Table
from lab import FirewallTopology

pytestmark = pytest.mark.kernel

PEER = 2
_ASSURED = int(Status.SEEN_REPLY | Status.ASSURED)


def _good(n: int) -> list[Flow]:
    """n UDP and TCP flows between made-up addresses (the kernel takes any tuple)."""
    out = []
    for i in range(n):
        proto = 6 if i % 2 else 17
        o = Tuple(bytes([10, 7, i // 250, i % 250 + 1]), bytes([10, 8, 0, 1]), proto,
                  20000 + i, 443 if proto == 6 else 53)
        out.append(Flow(o, o.invert(), status=_ASSURED, timeout=300,
                        state=3 if proto == 6 else None))
    return out


def _bad_pairs() -> list[tuple[bytes, bytes]]:
    """The issue's zone of 70000 and a TCP flag byte beyond 255, as a peer would send them."""
    tcp, udp = _good(203)[201:]  # tuples of their own
    out = []
    for f, where, i, x in ((udp, "key", K_ZONE, 70000), (tcp, "value", V_TCP_FLAGS_ORIG, 300)):
        k, v = (msgpack.unpackb(b) for b in pack_flow(f))
        (k if where == "key" else v)[i] = x
        out.append((msgpack.packb(k), msgpack.packb(v)))
    return out


def _cache(flows: list[Flow], extra: list[tuple[bytes, bytes]]) -> ExternalCache:
    c = ExternalCache(epoch=0.0)
    c.apply(PEER, [*(pack_flow(f) for f in flows), *extra], now=1.0)
    return c


def test_the_edge_refuses_what_the_commit_could_not_carry() -> None:
    good = [pack_flow(f) for f in _good(200)]
    ok, refused = filter_untrusted([*good[:100], *_bad_pairs(), *good[100:]])
    assert ok == good
    assert refused == {"zone": 1, "tcp_flags": 1}


async def test_a_commit_of_cache_entries_creates_every_good_flow_around_bad_ones(
        fw_topo: FirewallTopology) -> None:
    """The issue's failover: 200 good flows and 2 bad ones in the external cache committed
    0 of 202; now the 200 are created and the 2 counted."""
    fw = fw_topo.fw
    fw.conntrack_flush()
    cache = _cache(_good(200), _bad_pairs())
    table = Table(fw.name, batch=16)
    try:
        res, bad = table.commit_entries_blocking(cache.commit_entries(now=2.0))
    finally:
        table.close()
    assert (res.created, res.failed, bad) == (200, 0, 2), res.summary()
    assert fw.conntrack_count() == 200


async def test_the_direct_writers_commit_of_flows_skips_one_that_does_not_encode(
        fw_topo: FirewallTopology) -> None:
    fw = fw_topo.fw
    fw.conntrack_flush()
    flows = _good(200)
    flows.insert(50, _good(201)[200]._replace(zone=70000))
    table = Table(fw.name, batch=16)
    try:
        res = await table.commit(flows)
    finally:
        table.close()
    assert (res.created, res.failed, dict(res.errors)) == (200, 1, {"unencodable": 1})
    assert fw.conntrack_count() == 200


async def test_an_existing_entry_whose_update_cannot_be_built_does_not_stop_the_commit(
        fw_topo: FirewallTopology) -> None:
    """EEXIST -> update: a value the create encodes (a reply list of the right length with a
    bad address, no NAT bit to use it) but that is no Flow stopped the commit after its first
    batch. Now that one entry fails and every other is updated."""
    fw = fw_topo.fw
    fw.conntrack_flush()
    flows = _good(200)
    odd_k, odd_v = (msgpack.unpackb(b) for b in pack_flow(flows[3]))
    odd_v[V_REPLY] = [b"\1\2\3", 5]
    cache = ExternalCache(epoch=0.0)
    cache.apply(PEER, [pack_flow(f) for i, f in enumerate(flows) if i != 3], now=1.0)
    cache.apply(PEER, [(msgpack.packb(odd_k), msgpack.packb(odd_v))], now=1.0)
    table = Table(fw.name, batch=16)
    try:
        first, bad = table.commit_entries_blocking(cache.commit_entries(now=2.0))
        assert (first.created, first.failed, bad) == (200, 0, 0), first.summary()
        again, bad = table.commit_entries_blocking(cache.commit_entries(now=2.0))
    finally:
        table.close()
    assert (again.created, again.updated, again.failed) == (0, 199, 1), again.summary()
    assert dict(again.errors) == {"unencodable": 1}


@pytest.fixture
def high_fds() -> Iterator[None]:
    """Descriptors 0..1100 taken, so the next socket's number is above 1023 (select's limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2048 if hard == resource.RLIM_INFINITY else min(hard, 2048)
    if want < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low to test descriptors > 1023")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    fds: list[int] = []
    try:
        while not fds or fds[-1] < 1100:
            fds.append(os.open("/dev/null", os.O_RDONLY))
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_blocking_commit_and_a_dump_work_with_a_descriptor_above_1023(
        fw_topo: FirewallTopology, high_fds: None) -> None:
    fw = fw_topo.fw
    fw.conntrack_flush()
    table = Table(fw.name, batch=16)
    try:
        assert table._req.sock.fileno() > 1023
        entries: list[tuple[list[Any], list[Any]]] = [
            (msgpack.unpackb(k), msgpack.unpackb(v)) for k, v in map(pack_flow, _good(100))]
        res, bad = table.commit_entries_blocking(entries)
        assert (res.created, res.failed, bad) == (100, 0, 0), res.summary()
        assert len(await table.dump()) == 100
    finally:
        table.close()
