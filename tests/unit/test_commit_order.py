"""The commit's plan and steps without a kernel: masters before RELATED flows for long chains
and cycles (linear), and one entry never stopping the commit (the EEXIST branch included)."""

from __future__ import annotations

import errno
import random
import sys
from typing import Any

import msgpack

from conntrackd_py.cache import ExternalCache
from conntrackd_py.flow import (
    K_TUPLE,
    V_MASTER,
    V_REPLY,
    Flow,
    Status,
    Tuple,
    depth_order,
    masters_first,
    masters_first_entries,
    pack_flow,
)
from conntrackd_py.kernel import codec
from conntrackd_py.kernel.table import CommitResult, Table

CLIENT = bytes([10, 0, 0, 2])
SERVER = bytes([192, 0, 2, 10])


def _orig(i: int) -> Tuple:
    return Tuple(CLIENT, SERVER, 6, 1024 + i % 60000, 21 + i // 60000)


def _chain(n: int) -> list[Flow]:
    """n TCP flows, each the master of the next (a RELATED chain n long)."""
    return [Flow(_orig(i), _orig(i).invert(), status=int(Status.SEEN_REPLY), timeout=100,
                 state=3, master=None if i == 0 else _orig(i - 1)) for i in range(n)]


def _lists(f: Flow) -> tuple[list[Any], list[Any]]:
    k, v = pack_flow(f)
    return msgpack.unpackb(k), msgpack.unpackb(v)


def _assert_masters_first(origs: list[Any], masters: list[Any]) -> None:
    pos = {o: i for i, o in enumerate(origs)}
    for i, m in enumerate(masters):
        if m is not None and m in pos:
            assert pos[m] < i


def test_a_32k_chain_is_planned_masters_first() -> None:
    """The issue's case: a 32k chain took 10.7 s before the first create (quadratic)."""
    flows = _chain(32768)
    random.Random(7).shuffle(flows)
    c = ExternalCache(epoch=0.0)
    c.apply(1, [pack_flow(f) for f in flows], now=1.0)
    plan = c.commit_plan(now=2.0)
    assert len(plan) == 32768
    _assert_masters_first([f.orig for f in plan], [f.master for f in plan])
    assert [f.orig for f in plan] == [_orig(i) for i in range(32768)]  # one per depth

    entries = c.commit_entries(now=2.0)
    prepared, bad = Table._prepare_entries(entries, True)
    assert bad == 0
    origs = [it.orig if isinstance(it, Flow) else Tuple(*it[0][K_TUPLE:]) for _, _, it in prepared]
    assert origs == [_orig(i) for i in range(32768)]


def test_masters_first_entries_orders_lists_as_masters_first_orders_flows() -> None:
    flows = _chain(50) + [Flow(_orig(100 + i), _orig(100 + i).invert()) for i in range(5)]
    random.Random(3).shuffle(flows)
    entries = [_lists(f) for f in flows]
    by_lists = masters_first_entries(entries)
    by_flows = masters_first(flows)
    assert [Tuple(*k[K_TUPLE:]) for k, _ in by_lists] == [f.orig for f in by_flows]


def test_cycles_in_a_peers_data_terminate_and_keep_every_entry() -> None:
    """A cycle cannot be honoured; the ordering cuts it and keeps going (every entry once)."""
    n = 20000
    cyc = [Flow(_orig(i), _orig(i).invert(), master=_orig((i + 1) % n)) for i in range(n)]
    selfish = Flow(_orig(n), _orig(n).invert(), master=_orig(n))
    tail = Flow(_orig(n + 1), _orig(n + 1).invert(), master=_orig(5))  # hangs off the cycle
    flows = [tail, *cyc, selfish]
    out = masters_first(flows)
    assert sorted(f.orig for f in out) == sorted(f.orig for f in flows)
    pos = {f.orig: i for i, f in enumerate(out)}
    assert pos[tail.orig] > pos[_orig(5)]
    # all but one edge of the cycle is honoured
    broken = [f for f in cyc if f.master is not None and pos[f.master] > pos[f.orig]]
    assert len(broken) == 1


def test_depth_order_is_stable_within_a_depth_and_ignores_unknown_masters() -> None:
    origs = ["a", "b", "c", "d", None]
    masters = ["x", "c", None, "b", "a"]
    assert depth_order(origs, masters) == [0, 2, 1, 4, 3]


# --- one bad entry never stops a commit ------------------------------------------------------

class _FakeReq:
    def __init__(self) -> None:
        self.seq = 1

    def next_seq(self, n: int = 1) -> int:
        s = self.seq
        self.seq += n
        return s


def _drive(table: Table, prepared: Any, answer: Any) -> tuple[CommitResult, list[list[bytes]]]:
    """Run the commit's steps, answering each batch with `answer(messages)`."""
    res = CommitResult()
    sent: list[list[bytes]] = []
    steps = table._commit_steps(prepared, res, True)
    try:
        msgs, _seq = next(steps)
        while True:
            sent.append(msgs)
            msgs, _seq = steps.send(answer(msgs))
    except StopIteration:
        pass
    return res, sent


def _exists(msgs: list[bytes]) -> list[int]:
    """The kernel's answers when every entry exists: EEXIST to a create, 0 to an update."""
    return [errno.EEXIST if int.from_bytes(m[6:8], sys.byteorder) & codec.NLM_F_CREATE else 0
            for m in msgs]


def _table(batch: int) -> Table:
    t = Table.__new__(Table)
    t.batch = batch
    t._req = _FakeReq()  # type: ignore[assignment]
    return t


def _entries(n: int) -> list[tuple[list[Any], list[Any]]]:
    out = []
    for i in range(n):
        f = Flow(_orig(i), _orig(i).invert(), status=int(Status.SEEN_REPLY), timeout=60,
                 state=3)
        out.append(_lists(f))
    return out


def test_an_existing_entry_whose_value_is_no_flow_is_skipped_not_the_commit() -> None:
    """The issue's EEXIST case: a value the create's fast path encodes (a reply list of the
    right length but a bad address, no NAT bit to use it) but that is no Flow: its update
    cannot be built. It is counted; the other entries' updates and later batches go on."""
    entries = _entries(6)
    entries[1][1][V_REPLY] = [b"\1\2\3", 5]
    table = _table(batch=4)
    prepared, bad = table._prepare_entries(entries, True)
    assert (len(prepared), bad) == (6, 0)  # the create itself encodes
    res, sent = _drive(table, prepared, _exists)
    assert (res.created, res.updated, res.failed) == (0, 5, 1)
    assert res.errors == {"unencodable": 1}
    assert [len(b) for b in sent] == [4, 3, 2, 2]  # creates, updates, creates, updates


def test_a_commit_from_flows_skips_values_that_do_not_encode() -> None:
    flows = [Flow(_orig(i), _orig(i).invert(), timeout=60) for i in range(4)]
    flows[2] = flows[2]._replace(zone=70000)
    flows[3] = flows[3]._replace(master=_orig(0)._replace(src=bytes(16)))
    table = _table(batch=256)
    prepared, bad = table._prepare_flows(flows, True)
    assert (len(prepared), bad) == (2, 2)
    res, _ = _drive(table, prepared, lambda msgs: [0] * len(msgs))
    assert res.created == 2


def test_entries_that_are_not_even_lists_are_skipped_and_counted() -> None:
    good = _entries(2)
    junk: list[Any] = [([1, 2], [3]), (good[0][0], [None] * 13), (good[1][0], "x")]
    prepared, bad = Table._prepare_entries([*good, *junk], True)
    assert (len(prepared), bad) == (2, 3)


def test_a_master_in_unhashable_garbage_is_no_master() -> None:
    entries = _entries(3)
    entries[2][1][V_MASTER] = [[1], {}, 3]
    assert len(masters_first_entries(entries)) == 3


def test_create_bodies_of_the_chain_are_the_flows_own() -> None:
    """Entries with masters go through Flows (master tuples are not the packed fast path);
    their bodies are codec.create_body's."""
    flows = _chain(3)
    entries = [_lists(f) for f in flows]
    prepared, _ = Table._prepare_entries(entries, True)
    assert [p[1] for p in prepared] == [codec.create_body(f) for f in flows]
