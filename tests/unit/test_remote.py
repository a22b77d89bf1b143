"""remote.py: engine events applied to the external cache or the direct queue (pure)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgpack
import pytest

from conntrackd_py import sync as sync_engine
from conntrackd_py.cache import ExternalCache
from conntrackd_py.flow import Flow, Tuple, pack_flow, unpack_key
from conntrackd_py.remote import (
    LogLimiter,
    Pair,
    Remote,
    dump_entries,
    dump_lines,
    plan_direct,
    watch_item,
    watch_line,
)


def kv(i: int) -> tuple[bytes, bytes]:
    t = Tuple(b"\x0a\x00\x00\x01", bytes([10, 0, 1, i]), 6, 1000 + i, 80)
    return pack_flow(Flow(t, t.invert(), timeout=300))


def bad_zone(i: int) -> tuple[bytes, bytes]:
    k, v = kv(i)
    return msgpack.packb([70000, *msgpack.unpackb(k)[1:]]), v


def test_every_remote_flow_is_validated_before_the_cache_sees_it() -> None:
    ext = ExternalCache()
    r = Remote(ext)
    r.apply(sync_engine.RemoteFlows(2, [kv(1), bad_zone(2), kv(3), (b"\xc1", None)]), 10.0)
    assert ext.count(2) == 2
    assert r.invalid["zone"] == 1
    assert sum(r.invalid.values()) == 2  # and the undecodable key


def test_direct_mode_queues_validated_flows_and_says_so() -> None:
    r = Remote(ExternalCache(), direct=True)
    assert r.apply(sync_engine.RemoteFlows(2, [kv(1), bad_zone(2)]), 1.0) is True
    assert r.apply(sync_engine.RemoteFlows(2, [bad_zone(3)]), 1.0) is False
    assert r.take() == [kv(1)]
    assert r.take() == []
    assert len(r.external) == 0


def test_direct_queue_is_bounded_refusals_counted_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    # with the external cache off nothing else caps what peers make this node hold while the
    # writer waits for the kernel
    r = Remote(ExternalCache(), direct=True, max_pending=3)
    caplog.set_level(logging.ERROR, logger="conntrackd_py.remote")
    r.apply(sync_engine.RemoteFlows(2, [kv(1), kv(2)]), 1.0)
    r.apply(sync_engine.RemoteFlows(2, [kv(3), kv(4), kv(5)]), 1.0)
    r.apply(sync_engine.RemoteFlows(3, [kv(6)]), 2.0)
    assert r.take() == [kv(1), kv(2), kv(3)]
    assert r.direct_counts.refused == 3
    assert len([rec for rec in caplog.records if "queue full" in rec.getMessage()]) == 1
    r.apply(sync_engine.RemoteFlows(2, [kv(7)]), 3.0)  # room again once the writer took them
    assert r.take() == [kv(7)]


def test_validation_is_the_injected_function() -> None:
    seen: list[Sequence[Pair]] = []

    def validate(flows: Sequence[Pair]) -> tuple[list[Pair], dict[str, int]]:
        seen.append(flows)
        return [], {"shape": len(flows)}

    r = Remote(ExternalCache(), validate=validate)
    r.apply(sync_engine.RemoteFlows(2, [kv(1)]), 1.0)
    assert len(seen) == 1
    assert r.invalid == {"shape": 1}


def test_watch_sees_only_the_flows_kept_new_then_update() -> None:
    seen: list[tuple[str, int | None, bytes]] = []
    r = Remote(ExternalCache())
    for _ in range(2):
        r.apply(sync_engine.RemoteFlows(4, [kv(1), bad_zone(2)]), 1.0,
                lambda event, origin, k, v: seen.append((event, origin, k)))
    r.apply(sync_engine.RemoteFlows(4, [(kv(1)[0], None)]), 1.0,
            lambda event, origin, k, v: seen.append((event, origin, k)))
    assert seen == [("new", 4, kv(1)[0]), ("update", 4, kv(1)[0]), ("destroy", 4, kv(1)[0])]


def test_watch_items_carry_the_caches_bytes() -> None:
    k, v = kv(1)
    assert watch_item("new", None, k, v) == ["new", "internal", None, k.hex(), v.hex()]
    assert watch_item("destroy", 3, k, None) == ["destroy", "external", 3, k.hex(), None]


def test_resync_bracket_sweeps_stale_entries() -> None:
    ext = ExternalCache()
    r = Remote(ext)
    r.apply(sync_engine.RemoteFlows(2, [kv(1), kv(2)]), 1.0)
    r.apply(sync_engine.ResyncStarted(2), 2.0)
    r.apply(sync_engine.RemoteFlows(2, [kv(2)]), 2.0)
    r.apply(sync_engine.ResyncDone(2), 2.0)
    assert [k for _, k, _, _ in ext.items(2)] == [kv(2)[0]]


def test_repeating_events_are_counted_and_logged_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    r = Remote(ExternalCache())
    with caplog.at_level(logging.INFO, logger="conntrackd_py.remote"):
        for t in range(100):
            r.apply(sync_engine.DuplicateNode(1, 5, "192.0.2.9"), float(t) / 10)
        r.apply(sync_engine.PeerForgotten(3), 0.0)
    assert r.duplicate_node == 100
    assert r.peers_forgotten == 1
    dup = [m for m in caplog.messages if "node id" in m]
    assert len(dup) == 1
    assert "192.0.2.9" in dup[0]


def test_a_duplicate_id_derived_from_a_conntrackd_conf_says_how_to_avoid_it(
        caplog: pytest.LogCaptureFixture) -> None:
    for derived in (False, True):
        caplog.clear()
        r = Remote(ExternalCache(), derived_node_id=derived)
        with caplog.at_level(logging.INFO, logger="conntrackd_py.remote"):
            r.apply(sync_engine.DuplicateNode(1, 5, "192.0.2.9"), 0.0)
        (line,) = [m for m in caplog.messages if "node id" in m]
        assert ("differ in their last byte" in line) is derived
        assert ("import-conf" in line) is derived


def test_log_limiter_names_what_it_held_back() -> None:
    lim = LogLimiter(interval=60.0)
    assert lim.allow("x", 0.0) == 0
    assert lim.allow("x", 1.0) is None
    assert lim.allow("y", 1.0) == 0
    assert lim.allow("x", 59.0) is None
    assert lim.allow("x", 60.0) == 2


def test_plan_direct_keeps_the_latest_state_per_flow() -> None:
    k1, v1 = kv(1)
    k2, v2 = kv(2)
    plan = plan_direct([(k1, v1), (k2, v2), (k1, None), (b"\xc1", None), (k2, v2)])
    assert [f.orig.dport for f in plan.updates] == [80]
    assert plan.deletes == [unpack_key(k1)]
    assert plan.undecodable == 1


def test_dump_lines_filter_and_count_what_does_not_unpack() -> None:
    k1, v1 = kv(1)
    t = Tuple(b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 17, 53, 53)
    k2, v2 = pack_flow(Flow(t, t.invert(), timeout=30))
    pairs = [(None, k1, v1), (2, k2, v2), (2, b"\xc1", b"\xc1")]
    lines, bad = dump_lines(pairs, None, None)
    assert bad == 1
    assert len(lines) == 2
    assert lines[1].endswith("[node=2]")
    assert dump_lines(pairs, 17, None)[0] == [lines[1]]
    assert dump_lines(pairs, None, "src")[0] == []  # neither is NATed


def test_dump_entries_of_either_cache_raw_or_as_lines(caplog: pytest.LogCaptureFixture) -> None:
    k1, v1 = kv(1)
    k2, v2 = kv(2)
    ext = ExternalCache()
    ext.upsert(2, k1, v1, 0.0)
    ext.upsert(3, k2, v2, 0.0)
    ext.upsert(3, b"\xc1", b"\xc1", 0.0)
    assert dump_entries("internal", None, ext, None, None, None, False) == []  # mode stats
    internal = dump_entries("internal", [(k1, v1)], ext, None, None, None, False)
    assert internal == dump_lines([(None, k1, v1)], None, None)[0]
    assert dump_entries("internal", [(k1, v1)], ext, None, None, None, True) == [
        [None, k1.hex(), v1.hex()]]
    assert dump_entries("external", None, ext, None, None, 2, True) == [[2, k1.hex(), v1.hex()]]
    caplog.set_level(logging.WARNING)
    lines = dump_entries("external", None, ext, None, None, 3, False)
    assert lines == dump_lines([(3, k2, v2)], None, None)[0]
    assert "dump of the external cache: 1 entries do not describe a flow" in caplog.text


def test_watch_line_shows_undecodable_bytes_as_such() -> None:
    k, v = kv(1)
    assert watch_line("internal", k, v).startswith("[UPDATE] internal: ")
    assert watch_line("internal", k, None).startswith("[DESTROY] internal: zone=0 ")
    assert watch_line("external node 2", b"\xc1", None) == (
        "[DESTROY] external node 2: undecodable, key c1")
