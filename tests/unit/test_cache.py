"""InternalCache / ExternalCache: pure, with explicit `now`."""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrackd_py.cache import (
    STALE_COMMIT_TIMEOUT,
    ExternalCache,
    InternalCache,
    ReconcileResult,
    same_but_timeout,
)
from conntrackd_py.flow import Flow, Status, Tuple, masters_first, pack_flow, pack_key, pack_value

CLIENT = bytes([10, 0, 0, 2])
SERVER = bytes([192, 0, 2, 10])
PUBLIC = bytes([203, 0, 113, 1])


def udp(sport: int, *, timeout: int = 30, mark: int = 0, nat_port: int | None = None,
        master: Tuple | None = None, dport: int = 53) -> Flow:
    orig = Tuple(CLIENT, SERVER, 17, sport, dport)
    reply = orig.invert()
    status = int(Status.CONFIRMED | Status.SEEN_REPLY)
    if nat_port is not None:
        reply = Tuple(SERVER, PUBLIC, 17, dport, nat_port)
        status |= Status.SRC_NAT
    return Flow(orig=orig, reply=reply, status=status, timeout=timeout, mark=mark, master=master)


def tcp(sport: int, dport: int, *, timeout: int = 300, master: Tuple | None = None) -> Flow:
    orig = Tuple(CLIENT, SERVER, 6, sport, dport)
    return Flow(orig=orig, reply=orig.invert(), status=int(Status.CONFIRMED), timeout=timeout,
                state=3, master=master)


# --- InternalCache -------------------------------------------------------------------------

def test_upsert_reports_new_and_changed_values_only() -> None:
    c = InternalCache()
    k, v = pack_flow(udp(1000))
    assert c.upsert(k, v)
    assert not c.upsert(k, v)
    assert not c.upsert(k, bytes(v))  # equal bytes, another object
    v2 = pack_value(udp(1000, mark=7))
    assert c.upsert(k, v2)
    assert c.get(k) == v2
    assert k in c
    assert len(c) == 1


def test_remove_get_clear_and_items() -> None:
    c = InternalCache()
    pairs = [pack_flow(udp(p)) for p in range(1000, 1005)]
    for k, v in pairs:
        c.upsert(k, v)
    assert list(c.items()) == pairs
    assert c.remove(pairs[0][0])
    assert not c.remove(pairs[0][0])
    assert c.get(pairs[0][0]) is None
    assert pairs[0][0] not in c
    assert len(c) == 4
    c.clear()
    assert len(c) == 0
    assert list(c.items()) == []


def test_flows_unpack_what_was_packed() -> None:
    c = InternalCache()
    flows = [udp(2000), udp(2001, nat_port=61000), tcp(3000, 21)]
    for f in flows:
        c.upsert(*pack_flow(f))
    assert list(c.flows()) == flows


def test_load_adds_entries_and_freezes_the_gc() -> None:
    c = InternalCache()
    c.upsert(*pack_flow(udp(1)))
    pairs = [pack_flow(udp(p)) for p in range(2, 50)]
    try:
        c.load(pairs)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert len(c) == 49
    assert dict(c.items()) == dict([pack_flow(udp(1)), *pairs])


def test_a_cache_of_bytes_is_invisible_to_the_gc() -> None:
    c = InternalCache()
    c.upsert(*pack_flow(udp(1)))
    assert not gc.is_tracked(c._d)


def test_reconcile_returns_exact_differences() -> None:
    c = InternalCache()
    a, b, d = pack_flow(udp(1)), pack_flow(udp(2)), pack_flow(udp(4))
    for k, v in (a, b, d):
        c.upsert(k, v)
    b2 = (b[0], pack_value(udp(2, mark=9)))
    e = pack_flow(udp(5))
    res = c.reconcile([a, b2, e])
    assert res == ReconcileResult(added=[e], updated=[b2], removed=[d[0]])
    assert dict(c.items()) == dict([a, b2, e])


def test_reconcile_of_identical_dump_changes_nothing() -> None:
    c = InternalCache()
    pairs = [pack_flow(udp(p)) for p in range(10)]
    c.load(pairs)
    gc.unfreeze()
    assert c.reconcile(list(pairs)) == ReconcileResult()


def test_reconcile_keeps_the_last_value_of_a_repeated_key() -> None:
    c = InternalCache()
    k, v1 = pack_flow(udp(1))
    v2 = pack_value(udp(1, mark=3))
    res = c.reconcile([(k, v1), (k, v2)])
    assert res.added == [(k, v2)]
    assert c.get(k) == v2


def test_reconcile_can_ignore_timeout_only_changes_but_stores_them() -> None:
    c = InternalCache()
    k, v = pack_flow(udp(1, timeout=30))
    k2, w = pack_flow(udp(2, timeout=30))
    c.upsert(k, v)
    c.upsert(k2, w)
    v_older = pack_value(udp(1, timeout=29))
    w_marked = pack_value(udp(2, timeout=29, mark=1))
    res = c.reconcile([(k, v_older), (k2, w_marked)], ignore_timeout=True)
    assert res.updated == [(k2, w_marked)]
    assert res.refreshed == 1
    assert c.get(k) == v_older
    # by default a timeout change is a change
    res = c.reconcile([(k, v), (k2, w_marked)])
    assert res.updated == [(k, v)]


def test_same_but_timeout() -> None:
    assert same_but_timeout(pack_value(udp(1, timeout=30)), pack_value(udp(1, timeout=2)))
    assert not same_but_timeout(pack_value(udp(1)), pack_value(udp(1, mark=1)))
    assert not same_but_timeout(b"\xc1", pack_value(udp(1)))
    assert not same_but_timeout(b"\x01", b"\x01")


_small = st.binary(min_size=0, max_size=2)


@given(st.dictionaries(_small, _small), st.lists(st.tuples(_small, _small)))
def test_reconcile_makes_the_cache_equal_to_the_dump(
    before: dict[bytes, bytes], dump: list[tuple[bytes, bytes]]
) -> None:
    c = InternalCache()
    for k, v in before.items():
        c.upsert(k, v)
    res = c.reconcile(dump)
    want = dict(dump)
    assert dict(c.items()) == want
    assert len(c) == len(want)
    assert dict(res.added) == {k: v for k, v in want.items() if k not in before}
    assert dict(res.updated) == {k: v for k, v in want.items() if k in before and before[k] != v}
    assert set(res.removed) == before.keys() - want.keys()
    assert len(res.added) + len(res.updated) == len(dict(res.added + res.updated))
    assert len(res.removed) == len(set(res.removed))
    # replaying the deltas on the old state (what a peer does) converges on the dump
    replica = dict(before)
    replica.update(res.added)
    replica.update(res.updated)
    for k in res.removed:
        del replica[k]
    assert replica == want


# --- ExternalCache -------------------------------------------------------------------------

A, B = 1, 2


def test_external_upsert_get_and_refresh() -> None:
    c = ExternalCache()
    k, v = pack_flow(udp(1))
    assert c.upsert(A, k, v, now=100.0)
    assert c.get(A, k) == (v, 100.0)
    assert not c.upsert(A, k, v, now=105.3)  # a refresh is not a change
    got = c.get(A, k)
    assert got is not None
    assert got[0] == v
    assert got[1] == pytest.approx(105.3)
    v2 = pack_value(udp(1, mark=1))
    assert c.upsert(A, k, v2, now=106.0)
    assert c.get(A, k) == (v2, 106.0)
    assert c.get(B, k) is None
    assert c.get(A, b"nope") is None


def test_external_value_prefix_is_a_change() -> None:
    c = ExternalCache()
    assert c.upsert(A, b"k", b"abc", 0.0)
    assert c.upsert(A, b"k", b"ab", 0.0)
    assert c.upsert(A, b"k", b"abcdefg", 0.0)
    assert c.get(A, b"k") == (b"abcdefg", 0.0)


def test_seen_is_kept_to_a_tenth_of_a_second_and_never_before_the_epoch() -> None:
    c = ExternalCache(epoch=50.0)
    c.upsert(A, b"k", b"v", 1234.56)
    got = c.get(A, b"k")
    assert got is not None
    assert got[1] == pytest.approx(1234.6)
    c.upsert(A, b"old", b"v", 10.0)
    assert c.get(A, b"old") == (b"v", 50.0)


def test_counts_origins_items_remove() -> None:
    c = ExternalCache()
    for p in range(3):
        c.upsert(B, *pack_flow(udp(p)), now=1.0)
    c.upsert(A, *pack_flow(udp(9)), now=2.0)
    assert len(c) == 4
    assert c.count(A) == 1
    assert c.count(B) == 3
    assert c.count(7) == 0
    assert c.origins() == [A, B]
    rows = list(c.items())
    assert [(o, s) for o, _, _, s in rows] == [(A, 2.0), (B, 1.0), (B, 1.0), (B, 1.0)]
    assert rows[0][1:3] == pack_flow(udp(9))
    assert [r[1] for r in c.items(B)] == [pack_key(0, udp(p).orig) for p in range(3)]
    assert list(c.items(7)) == []
    k = pack_key(0, udp(9).orig)
    assert c.remove(A, k)
    assert not c.remove(A, k)
    assert not c.remove(7, k)
    assert c.origins() == [B]


def test_purge_one_origin_or_all() -> None:
    c = ExternalCache()
    for p in range(3):
        c.upsert(A, *pack_flow(udp(p)), now=1.0)
        c.upsert(B, *pack_flow(udp(p)), now=1.0)
    assert c.purge(A) == 3
    assert c.purge(A) == 0
    assert c.origins() == [B]
    c.upsert(A, *pack_flow(udp(1)), now=1.0)
    assert c.purge() == 4
    assert len(c) == 0
    assert c.origins() == []


def _keys(c: ExternalCache, origin: int) -> set[bytes]:
    return {k for _, k, _, _ in c.items(origin)}


def test_sweep_drops_exactly_the_entries_not_refreshed_during_the_resync() -> None:
    c = ExternalCache()
    ka, va = pack_flow(udp(1))
    kb, vb = pack_flow(udp(2))
    kc, vc = pack_flow(udp(3))
    kd, vd = pack_flow(udp(4))
    for k, v in ((ka, va), (kb, vb), (kc, vc)):
        c.upsert(A, k, v, now=10.0)
    c.upsert(B, kc, vc, now=10.0)
    # same `now` as the upserts before it: the sweep must not depend on the clock moving
    c.begin_sweep(A, now=10.0)
    assert c.sweeping(A) == 10.0
    assert c.sweeping(B) is None
    c.upsert(A, ka, va, now=10.0)  # refreshed, unchanged
    c.upsert(A, kd, vd, now=10.0)  # new during the resync
    assert c.end_sweep(A) == 2
    assert _keys(c, A) == {ka, kd}
    assert _keys(c, B) == {kc}  # other origins are untouched
    assert c.sweeping(A) is None
    assert c.end_sweep(A) == 0  # no sweep running


def test_sweep_survives_removes_purges_and_restarts() -> None:
    c = ExternalCache()
    keys = [pack_flow(udp(p)) for p in range(4)]
    for k, v in keys:
        c.upsert(A, k, v, now=1.0)
    c.begin_sweep(A, now=2.0)
    assert c.remove(A, keys[0][0])
    assert c.end_sweep(A) == 3
    assert c.count(A) == 0
    assert c.origins() == []

    for k, v in keys:
        c.upsert(A, k, v, now=3.0)
    c.begin_sweep(A, now=4.0)
    assert c.purge(A) == 4
    c.upsert(A, *keys[1], now=5.0)
    assert c.end_sweep(A) == 0
    assert c.count(A) == 1

    c.begin_sweep(A, now=6.0)
    c.upsert(A, *keys[2], now=6.5)
    c.begin_sweep(A, now=7.0)  # restart: the earlier refresh does not count any more
    c.upsert(A, *keys[1], now=7.5)
    assert c.end_sweep(A) == 1
    assert _keys(c, A) == {keys[1][0]}


def test_sweep_of_an_unknown_origin_keeps_what_arrives() -> None:
    c = ExternalCache()
    c.begin_sweep(A, now=0.0)
    c.upsert(A, b"k", b"v", now=1.0)
    assert c.end_sweep(A) == 0
    assert c.count(A) == 1


def test_expire_drops_entries_not_refreshed_within_the_timeout() -> None:
    c = ExternalCache()
    assert c.expire(now=1000.0, timeout=1.0) == 0  # empty, no epoch yet
    c.upsert(A, b"old", b"v", now=100.0)
    c.upsert(A, b"new", b"v", now=120.0)
    c.upsert(B, b"old", b"v", now=100.0)
    assert c.expire(now=130.0, timeout=30.0) == 0  # seen exactly `timeout` ago: kept
    assert c.expire(now=130.1, timeout=30.0) == 2
    assert _keys(c, A) == {b"new"}
    assert c.origins() == [A]
    assert c.expire(now=200.0, timeout=30.0) == 1
    assert len(c) == 0


def test_expire_during_a_sweep_keeps_the_sweep_consistent() -> None:
    c = ExternalCache()
    c.upsert(A, b"x", b"v", now=0.0)
    c.upsert(A, b"y", b"v", now=50.0)
    c.begin_sweep(A, now=60.0)
    assert c.expire(now=60.0, timeout=30.0) == 1
    assert c.end_sweep(A) == 1
    assert len(c) == 0


# --- commit plan ---------------------------------------------------------------------------

def test_commit_plan_reduces_timeouts_by_the_time_since_last_seen() -> None:
    c = ExternalCache()
    c.upsert(A, *pack_flow(udp(1, timeout=30)), now=100.0)
    c.upsert(A, *pack_flow(tcp(2, 80, timeout=432000)), now=100.0)
    c.upsert(A, *pack_flow(udp(3, timeout=30)), now=110.0)
    plan = c.commit_plan(now=112.5)
    by_port = {f.orig.sport: f for f in plan}
    assert by_port[1].timeout == 18  # 30 - 12.5, rounded up
    assert by_port[2].timeout == 432000 - 12
    assert by_port[3].timeout == 28
    # everything else is as received
    assert by_port[1].with_(timeout=30) == udp(1, timeout=30)


def test_commit_plan_gives_flows_whose_estimate_ran_out_the_stale_timeout() -> None:
    c = ExternalCache()
    c.upsert(A, *pack_flow(udp(1, timeout=30)), now=0.0)
    c.upsert(A, *pack_flow(udp(2, timeout=30)), now=29.5)
    plan = c.commit_plan(now=30.0)
    # the most recently refreshed flow comes first
    assert [(f.orig.sport, f.timeout) for f in plan] == [(2, 30), (1, STALE_COMMIT_TIMEOUT)]
    plan = c.commit_plan(now=30.0, stale_timeout=None)
    assert [(f.orig.sport, f.timeout) for f in plan] == [(2, 30)]
    assert [f.timeout for f in c.commit_plan(now=30.0, stale_timeout=5)] == [30, 5]


def test_commit_plan_puts_the_most_recently_refreshed_flows_first() -> None:
    c = ExternalCache()
    for port, seen in ((1, 5.0), (2, 9.0), (3, 1.0), (4, 7.0)):
        c.upsert(A, *pack_flow(udp(port, timeout=300)), now=seen)
    assert [f.orig.sport for f in c.commit_plan(now=10.0)] == [2, 4, 1, 3]


def test_commit_plan_never_commits_a_longer_timeout_than_received() -> None:
    c = ExternalCache()
    c.upsert(A, *pack_flow(udp(1, timeout=30)), now=100.0)
    assert c.commit_plan(now=99.0)[0].timeout == 30  # `now` before `seen`: no elapsed time


def test_commit_plan_with_a_fixed_commit_timeout() -> None:
    c = ExternalCache()
    c.upsert(A, *pack_flow(udp(1, timeout=30)), now=0.0)
    c.upsert(A, *pack_flow(tcp(2, 80, timeout=432000)), now=0.0)
    assert [f.timeout for f in c.commit_plan(now=1000.0, commit_timeout=180)] == [180, 180]


def test_commit_plan_puts_masters_before_related_flows() -> None:
    ctrl = tcp(40000, 21)
    data = tcp(40001, 20, master=ctrl.orig)
    data2 = tcp(40002, 20, master=data.orig)  # a chain: ctrl -> data -> data2
    orphan = tcp(40003, 20, master=tcp(1, 21).orig)  # its master is not in the cache
    c = ExternalCache()
    for f in (data2, data, orphan, ctrl):
        c.upsert(A, *pack_flow(f), now=0.0)
    plan = [f.orig.sport for f in c.commit_plan(now=0.0)]
    assert plan.index(40000) < plan.index(40001) < plan.index(40002)
    assert set(plan) == {40000, 40001, 40002, 40003}


def test_commit_plan_resolves_a_key_held_by_two_origins_by_latest_seen() -> None:
    c = ExternalCache()
    k, v_a = pack_flow(udp(1, mark=1))
    v_b = pack_value(udp(1, mark=2))
    c.upsert(B, k, v_b, now=5.0)
    c.upsert(B, *pack_flow(udp(2)), now=5.0)
    c.upsert(A, k, v_a, now=10.0)
    plan = c.commit_plan(now=10.0)
    assert [(f.orig.sport, f.mark) for f in plan] == [(1, 1), (2, 0)]
    c.upsert(B, k, v_b, now=20.0)
    assert {f.orig.sport: f.mark for f in c.commit_plan(now=20.0)}[1] == 2
    # a tie goes to the higher origin id, whatever the arrival order
    c.upsert(B, k, v_b, now=30.0)
    c.upsert(A, k, v_a, now=30.0)
    assert {f.orig.sport: f.mark for f in c.commit_plan(now=30.0)}[1] == 2


def test_commit_plan_skips_and_counts_undecodable_entries() -> None:
    c = ExternalCache()
    c.upsert(A, *pack_flow(udp(1)), now=0.0)
    c.upsert(A, b"\xc1", pack_value(udp(2)), now=0.0)
    c.upsert(A, pack_key(0, udp(3).orig), b"\x93\x01\x02\x03", now=0.0)
    c.upsert(A, pack_key(0, udp(4).orig), b"\xc1", now=0.0)
    bad_status = pack_value(udp(5)).replace(b"\xc0\x0a", b"\xc0\xff", 1)  # status -1
    c.upsert(A, pack_key(0, udp(5).orig), bad_status, now=0.0)
    plan = c.commit_plan(now=0.0)
    assert [f.orig.sport for f in plan] == [1]
    assert c.undecodable == 4


def test_commit_plan_of_an_empty_cache() -> None:
    assert ExternalCache().commit_plan(now=5.0) == []


# --- masters_first -------------------------------------------------------------------------

def _forest(parents: list[int | None]) -> Iterator[Flow]:
    """Flow i has master flow parents[i] (only earlier indexes, so no cycles)."""
    origs = [Tuple(CLIENT, SERVER, 6, 1000 + i, 21) for i in range(len(parents))]
    for i, p in enumerate(parents):
        yield Flow(orig=origs[i], reply=origs[i].invert(),
                   master=None if p is None else origs[p])


@given(st.lists(st.integers(0, 30), max_size=30).flatmap(
    lambda xs: st.tuples(st.just([None if i == 0 or x % 3 == 0 else x % i
                                  for i, x in enumerate(xs)]), st.randoms())))
def test_masters_first_orders_every_flow_after_its_master(
    args: tuple[list[int | None], random.Random],
) -> None:
    parents, rnd = args
    flows = list(_forest(parents))
    rnd.shuffle(flows)
    out = masters_first(flows)
    assert sorted(f.orig.sport for f in out) == sorted(f.orig.sport for f in flows)
    pos = {f.orig: i for i, f in enumerate(out)}
    for f in out:
        if f.master is not None:
            assert pos[f.master] < pos[f.orig]


def test_masters_first_is_stable_and_survives_cycles() -> None:
    a = Tuple(CLIENT, SERVER, 6, 1, 21)
    b = Tuple(CLIENT, SERVER, 6, 2, 21)
    fa = Flow(orig=a, reply=a.invert(), master=b)
    fb = Flow(orig=b, reply=b.invert(), master=a)
    t3 = Tuple(CLIENT, SERVER, 6, 3, 21)
    self_master = Flow(orig=t3, reply=t3.invert(), master=t3)
    plain = [udp(p) for p in range(5)]
    assert masters_first(plain) == plain
    out = masters_first([fa, fb, self_master, *plain])
    assert len(out) == 8
    assert {f.orig for f in out} == {a, b, self_master.orig, *(f.orig for f in plain)}


# --- a model check of the external cache ---------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("upsert"), st.sampled_from([A, B]), st.sampled_from([b"a", b"b", b"c"]),
              st.sampled_from([b"1", b"2"])),
    st.tuples(st.just("remove"), st.sampled_from([A, B]), st.sampled_from([b"a", b"b", b"c"])),
    st.tuples(st.just("begin"), st.sampled_from([A, B])),
    st.tuples(st.just("end"), st.sampled_from([A, B])),
    st.tuples(st.just("purge"), st.sampled_from([A, B, None])),
    st.tuples(st.just("expire"), st.integers(0, 5)),
    st.tuples(st.just("tick")),
)


@given(st.lists(_op, max_size=40))
def test_external_cache_matches_a_simple_model(ops: list[tuple[Any, ...]]) -> None:
    c = ExternalCache(epoch=0.0)
    model: dict[tuple[int, bytes], tuple[bytes, float]] = {}
    marks: dict[int, set[bytes]] = {}
    now = 0.0
    for op in ops:
        name = op[0]
        if name == "upsert":
            _, o, k, v = op
            changed = (o, k) not in model or model[(o, k)][0] != v
            assert c.upsert(o, k, v, now) == changed
            model[(o, k)] = (v, now)
            marks.get(o, set()).discard(k)
        elif name == "remove":
            _, o, k = op
            assert c.remove(o, k) == ((o, k) in model)
            model.pop((o, k), None)
        elif name == "begin":
            marks[op[1]] = {k for (o, k) in model if o == op[1]}
            c.begin_sweep(op[1], now)
        elif name == "end":
            stale = marks.pop(op[1], set()) & {k for (o, k) in model if o == op[1]}
            assert c.end_sweep(op[1]) == len(stale)
            for k in stale:
                del model[(op[1], k)]
        elif name == "purge":
            gone = [ok for ok in model if op[1] is None or ok[0] == op[1]]
            assert c.purge(op[1]) == len(gone)
            for ok in gone:
                del model[ok]
        elif name == "expire":
            gone = [ok for ok, (_, seen) in model.items() if seen < now - op[1]]
            assert c.expire(now, op[1]) == len(gone)
            for ok in gone:
                del model[ok]
        else:
            now += 1.0
        assert {(o, k): (v, s) for o, k, v, s in c.items()} == model
        assert len(c) == len(model)
        assert c.origins() == sorted({o for o, _ in model})


def test_commit_plan_puts_assured_tcp_connections_before_everything_else() -> None:
    from conntrackd_py.flow import Flow, Tuple
    c = ExternalCache()
    t = Tuple(b"\n\0\0\1", b"\n\0\0\2", 6, 4000, 443)
    c.upsert(A, *pack_flow(Flow(t, t.invert(), status=0xE, timeout=400000, state=3)), now=1.0)
    for port in range(1, 4):
        c.upsert(A, *pack_flow(udp(port, timeout=300)), now=5.0 + port)
    assert [f.orig.sport for f in c.commit_plan(now=10.0)] == [4000, 3, 2, 1]


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.booleans()), max_size=40),
       st.booleans())
def test_apply_leaves_the_last_state_of_each_flow_and_feeds_the_sweep(
        ops: list[tuple[int, int, bool]], sweeping: bool) -> None:
    """(port, version, remove) changes applied as one batch against a plain dict model: the
    last change of each key wins, a removal removes; a running sweep keeps exactly the keys
    the batch touched (the entry there before it is swept away)."""
    c = ExternalCache(epoch=0.0)
    k0, v0 = pack_flow(udp(99))
    c.upsert(A, k0, v0, now=1.0)
    if sweeping:
        c.begin_sweep(A, now=2.0)
    flows: list[tuple[bytes, bytes | None]] = []
    model = {k0: v0}
    for port, version, remove in ops:
        k, v = pack_flow(udp(port)._replace(mark=version))
        flows.append((k, None if remove else v))
        if remove:
            model.pop(k, None)
        else:
            model[k] = v
    c.apply(A, flows, now=3.0)
    assert {k: v for _o, k, v, _seen in c.items(A)} == model
    assert all(seen == 3.0 for _o, k, _v, seen in c.items(A) if k != k0)
    if sweeping:
        assert c.end_sweep(A) == 1
        del model[k0]
        assert {k: v for _o, k, v, _seen in c.items(A)} == model


_addrs = st.sampled_from([bytes([10, 0, 0, i]) for i in range(1, 4)])
_tuples = st.builds(Tuple, _addrs, _addrs, st.sampled_from([1, 6, 17, 47, 132]),
                    st.integers(0, 3), st.integers(0, 3), st.integers(0, 1),
                    st.sampled_from([0, 8]), st.integers(0, 1), st.sampled_from([b"", b"x"]))


@given(_tuples, _tuples, st.sampled_from(["none", "src", "dst", "both", "any"]))
def test_packed_reply_is_the_difference_from_the_inverse(orig: Tuple, other: Tuple,
                                                        nat: str) -> None:
    from conntrackd_py.flow import _pack_reply, _pack_reply_by_inverse, _unpack_reply
    # a reply that differs from the inverse where NAT would change it (source, destination,
    # both, neither) or anywhere
    inv = orig.invert()
    reply = {"none": inv, "src": inv._replace(src=other.src, sport=other.sport),
             "dst": inv._replace(dst=other.dst, dport=other.dport),
             "both": inv._replace(src=other.src, sport=other.sport, dst=other.dst,
                                  dport=other.dport), "any": other}[nat]
    packed = _pack_reply(orig, reply)
    assert packed == _pack_reply_by_inverse(orig, reply)
    if packed is None or len(packed) in (2, 4):
        assert _unpack_reply(orig, packed) == reply


# --- the per-origin cap --------------------------------------------------------------------

def test_new_keys_beyond_the_cap_are_refused_and_counted_per_origin() -> None:
    c = ExternalCache(max_per_origin=3, epoch=0.0)
    c.apply(A, [(bytes([i]), b"v") for i in range(5)], now=1.0)
    assert c.count(A) == 3
    assert c.refused == {A: 2}
    assert {k for _o, k, _v, _s in c.items(A)} == {b"\0", b"\1", b"\2"}
    # another origin has its own room
    c.apply(B, [(b"b", b"v")], now=1.0)
    assert (c.count(B), c.refused) == (1, {A: 2})
    # a change or refresh of a key held is never refused, even at the cap
    c.apply(A, [(b"\0", b"new"), (b"\1", b"v")], now=2.0)
    assert c.get(A, b"\0") == (b"new", 2.0)
    assert c.refused == {A: 2}
    assert not c.upsert(A, b"\3", b"v", now=2.0)  # refused: not stored, not a change
    assert c.get(A, b"\3") is None
    assert c.refused == {A: 3}


def test_removals_in_a_batch_make_room_for_later_entries_of_it() -> None:
    c = ExternalCache(max_per_origin=2, epoch=0.0)
    c.apply(A, [(b"a", b"1"), (b"b", b"1")], now=1.0)
    c.apply(A, [(b"c", b"1"), (b"a", None), (b"c", b"1"), (b"d", b"1")], now=2.0)
    assert {k for _o, k, _v, _s in c.items(A)} == {b"b", b"c"}
    assert c.refused == {A: 2}  # c before the removal, d after c took the room


def test_sweeps_purges_and_expiry_give_room_back() -> None:
    c = ExternalCache(max_per_origin=2, epoch=0.0)
    c.apply(A, [(b"a", b"1"), (b"b", b"1")], now=1.0)
    c.begin_sweep(A, now=2.0)
    c.apply(A, [(b"a", b"2")], now=2.0)
    assert c.end_sweep(A) == 1  # b was not refreshed
    assert c.upsert(A, b"c", b"1", now=3.0)
    assert c.count(A) == 2
    assert c.purge(A) == 2
    c.apply(A, [(b"x", b"1"), (b"y", b"1")], now=4.0)
    assert (c.count(A), c.refused) == (2, {})
    assert c.expire(now=100.0, timeout=10.0) == 2
    c.apply(A, [(b"p", b"1"), (b"q", b"1"), (b"r", b"1")], now=101.0)
    assert (c.count(A), c.refused) == (2, {A: 1})


_capped_op = st.one_of(
    st.tuples(st.just("apply"), st.sampled_from([A, B]),
              st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]),
                                 st.sampled_from([b"1", b"2", None])), max_size=6)),
    st.tuples(st.just("begin"), st.sampled_from([A, B])),
    st.tuples(st.just("end"), st.sampled_from([A, B])),
    st.tuples(st.just("purge"), st.sampled_from([A, B, None])),
    st.tuples(st.just("expire")),
)


@given(st.integers(0, 3), st.lists(_capped_op, max_size=30))
def test_the_capped_cache_matches_a_simple_model(cap: int, ops: list[tuple[Any, ...]]) -> None:
    c = ExternalCache(max_per_origin=cap, epoch=0.0)
    model: dict[int, dict[bytes, bytes]] = {A: {}, B: {}}
    marks: dict[int, set[bytes]] = {}
    refused = {A: 0, B: 0}
    now = 0.0
    for op in ops:
        now += 1.0
        if op[0] == "apply":
            _, o, flows = op
            for k, v in flows:
                if v is None:
                    model[o].pop(k, None)
                elif k in model[o] or len(model[o]) < cap:
                    model[o][k] = v
                else:
                    refused[o] += 1
                    continue
                marks.get(o, set()).discard(k)
            c.apply(o, flows, now)
        elif op[0] == "begin":
            marks[op[1]] = set(model[op[1]])
            c.begin_sweep(op[1], now)
        elif op[0] == "end":
            stale = marks.pop(op[1], set()) & set(model[op[1]])
            assert c.end_sweep(op[1]) == len(stale)
            for k in stale:
                del model[op[1]][k]
        elif op[0] == "purge":
            for o in ([A, B] if op[1] is None else [op[1]]):
                model[o].clear()
            c.purge(op[1])
        else:
            c.expire(now, 0.5)  # everything but what this tick stored
            for o in (A, B):
                model[o].clear()
        assert {o: {k: v for _o, k, v, _s in c.items(o)} for o in (A, B)} == model
        assert all(c.count(o) <= cap for o in (A, B))
        assert c.refused == {o: n for o, n in refused.items() if n}
