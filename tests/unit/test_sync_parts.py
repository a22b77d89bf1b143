"""The engine's parts on their own: serial arithmetic and wrap-around, the coalescing outbox,
the resend queue, the in-order streams, the ALARM pacer and expiry, epochs."""

from __future__ import annotations

import random

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sync_sim import Cluster, Faults, Workload

from conntrackd_py.sync import SyncConfig, new_epoch, seqnum, wire
from conntrackd_py.sync.alarm import ExpiryTracker, RefreshPacer
from conntrackd_py.sync.ftfw import ReliableStream, ResendQueue
from conntrackd_py.sync.notrack import BestEffortStream
from conntrackd_py.sync.outbox import Outbox, Snapshot

CFG = SyncConfig(node_id=1, reorder_max=64, ack_every=4)
_u32 = st.integers(0, seqnum.MASK)

# --- serial arithmetic -------------------------------------------------------------------------


@given(_u32, st.integers(-(2**31) + 1, 2**31 - 1))
def test_serial_distance_survives_wrap(a: int, n: int) -> None:
    b = seqnum.add(a, n)
    assert seqnum.diff(b, a) == n
    assert seqnum.after(b, a) == (n > 0)
    assert seqnum.after(a, b) == (n < 0)


@given(_u32)
def test_half_way_is_before_in_both_directions(a: int) -> None:
    b = seqnum.add(a, 2**31)
    assert not seqnum.after(a, b)
    assert not seqnum.after(b, a)


@given(_u32, st.integers(0, 300), st.sets(st.integers(0, 300)), st.integers(1, 10))
def test_missing_ranges_are_exactly_the_absent_numbers(first: int, width: int,
                                                       present_off: set[int],
                                                       limit: int) -> None:
    last = seqnum.add(first, width)
    present = {seqnum.add(first, o) for o in present_off}
    ranges = seqnum.missing_ranges(first, last, present, limit)
    got = [seqnum.add(a, i) for a, b in ranges for i in range(seqnum.diff(b, a) + 1)]
    want = [seqnum.add(first, o) for o in range(width + 1) if o not in present_off]
    assert len(ranges) <= limit
    assert got == want[: len(got)]
    if len(ranges) < limit:
        assert got == want


# --- the outbox --------------------------------------------------------------------------------


def test_outbox_keeps_latest_state_per_key_in_first_entry_order() -> None:
    box = Outbox()
    box.put(b"a", b"1")
    box.put(b"b", b"1")
    box.put(b"a", b"2")
    box.put(b"c", b"1")
    box.put(b"b", None)
    assert box.pop() == (b"a", b"2")
    box.put(b"a", b"3")  # after it left: queued again, behind the others
    assert [box.pop(), box.pop(), box.pop(), box.pop()] == [
        (b"b", None), (b"c", b"1"), (b"a", b"3"), None]


def test_outbox_unpop_and_discard() -> None:
    box = Outbox([(b"a", b"1"), (b"b", b"2")])
    item = box.pop()
    assert item == (b"a", b"1")
    box.unpop(*item)
    box.discard(b"b")
    assert [box.pop(), box.pop()] == [(b"a", b"1"), None]
    assert not box


@given(st.lists(st.tuples(st.sampled_from([b"a", b"bb", b"ccc", b"dddd"]),
                          st.sampled_from([None, b"1", b"22", b"333"]), st.booleans()),
                max_size=30),
       st.integers(4, 20), st.integers(-1, 4))
def test_outbox_fill_takes_what_pop_would_in_the_same_order(
        ops: list[tuple[bytes, bytes | None, bool]], limit: int, allowance: int) -> None:
    """fill (pop/unpop inlined) against a reference built from pop and unpop: puts and drains
    interleaved, with limits that stop it mid-box."""
    fast, ref = Outbox(), Outbox()
    for key, value, drain in ops:
        for box in (fast, ref):
            box.put(key, value)
        if not drain:
            continue
        parts: list[bytes] = []
        got = fast.fill(parts, 0, limit, allowance, b"U", b"D")
        want: list[bytes] = []
        size = n = 0
        full = False
        while n != allowance:
            item = ref.pop()
            if item is None:
                break
            k, v = item
            need = len(k) + 1 + (0 if v is None else len(v))
            if size + need > limit:
                ref.unpop(k, v)
                full = True
                break
            want += [b"D", k] if v is None else [b"U", k, v]
            size += need
            n += 1
        assert got == (size, n, full)
        assert parts == want
    assert list(fast.items()) == list(ref.items())


# --- the full resync's snapshot --------------------------------------------------------------

# packed-array-like keys and values of varied sizes, some over 255 bytes (bin16 headers)
_packed = st.builds(lambda n, big: b"\x95" + bytes(n + (250 if big else 0)),
                    st.integers(0, 60), st.booleans())


@settings(max_examples=300)
@given(st.dictionaries(_packed, _packed, max_size=60), st.integers(0, 700),
       st.sampled_from([-1, 1, 2, 3, 7, 8, 30]), st.sets(st.integers(0, 59)))
def test_snapshot_fill_drains_every_flow_in_order_in_batches_that_fit(
        flows: dict[bytes, bytes], room: int, allowance: int, gone_at: set[int]) -> None:
    """Batches decode to the snapshot's flows in order, discarded ones left out; each is at
    most `room` bytes, and when `fill` says full, the next flow would not have fitted."""
    box = Snapshot(flows if room % 2 else list(flows.items()))  # a mapping or pairs
    keys = list(flows)
    gone = {keys[i] for i in gone_at if i < len(keys)}
    for k in gone:
        box.discard(k)
    want = [(k, v) for k, v in flows.items() if k not in gone]
    got: list[tuple[bytes, bytes]] = []
    for _ in range(len(flows) + 2):
        if not box:
            break
        msg, n, full = box.fill(room, allowance)
        assert allowance < 0 or n <= allowance
        if msg is None:
            assert n == 0
            if full:  # not even one fits this room: the caller sends it another way
                kv = box.take_one()
                assert kv is not None
                got.append(kv)
            continue
        assert len(msg) <= room
        items = msgpack.unpackb(msg)
        assert items[0] == wire.Kind.FLOW_BATCH
        assert len(items[1]) == 2 * n
        batch = list(zip(items[1][0::2], items[1][1::2], strict=True))
        assert wire.batch_size(items[1]) == len(msg)
        got += batch
        rest = [kv for kv in want[len(got):]]
        if full:
            assert rest, "full with nothing left"
            assert wire.batch_size([*items[1], *rest[0]]) > room
        elif rest and n != allowance:
            raise AssertionError("stopped with room and flows left")
    assert not box
    assert got == want


def test_snapshot_discard_after_drained_keeps_nothing() -> None:
    box = Snapshot({b"\x91\x01": b"\x91\x02"})
    msg, n, full = box.fill(1000, -1)
    assert (n, full) == (1, False)
    assert msg is not None
    assert not box
    box.discard(b"\x91\x01")  # a live change after the snapshot was sent: nothing to skip
    assert box._gone == set()
    assert len(box) == 0


# --- the resend queue --------------------------------------------------------------------------


def test_resend_queue_bound_evicts_oldest_and_resends_within_the_budget() -> None:
    q = ResendQueue(max_count=4, max_bytes=10_000)
    for s in range(1, 11):
        q.add(s, bytes([s]) * 100, 0.0)
    assert (len(q), q.lowest, q.evicted) == (4, 7, 6)
    assert not q.contains(6)  # 5-6 are gone: the sender resyncs instead
    assert q.contains(7)
    assert q.nack(7, 2, 1.0, 0.0, budget=1000) == (200, False)
    assert q.take(10, 1.0) == [bytes([7]) * 100, bytes([8]) * 100]
    # just resent: the holdoff skips it, for a sixteenth of its cost
    assert q.nack(7, 1, 1.01, 0.02, budget=1000) == (100 // 16 + 1, False)
    assert q.take(10, 1.01) == []
    assert q.nack(9, 2, 1.01, 0.02, budget=150) == (100, True)  # the budget ran out: only 9
    assert q.take(10, 1.01) == [bytes([9]) * 100]
    q.release_upto(8)
    assert (len(q), q.lowest) == (2, 9)


def test_resend_queue_byte_bound() -> None:
    q = ResendQueue(max_count=100, max_bytes=3000)
    for s in range(10):
        q.add(s, bytes(1000), 0.0)
    assert len(q) == 3
    assert q.nbytes == 3000


@given(st.integers(seqnum.MASK - 20, seqnum.MASK))
def test_resend_queue_across_wrap(start: int) -> None:
    q = ResendQueue(max_count=16, max_bytes=1 << 20)
    seqs = [seqnum.add(start, i) for i in range(40)]
    for s in seqs:
        q.add(s, s.to_bytes(4, "big"), 0.0)
    assert q.lowest == seqs[-16]
    assert q.nack(seqs[-16], 3, 1.0, 0.0, budget=1e9) == (12, False)
    assert q.take(99, 1.0) == [s.to_bytes(4, "big") for s in seqs[-16:-13]]


# --- receiver streams ---------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.integers(seqnum.MASK - 30, seqnum.MASK).map(lambda s: seqnum.add(s, 0)),
       st.randoms(use_true_random=False), st.integers(1, 60))
def test_reliable_stream_delivers_in_order_across_wrap(start: int, rnd: random.Random,
                                                       n: int) -> None:
    stream: ReliableStream[int] = ReliableStream(CFG, start)
    seqs = [seqnum.add(start, i) for i in range(n)]
    arrivals = seqs + rnd.sample(seqs, k=min(5, n))  # with duplicates
    rnd.shuffle(arrivals)
    out: list[int] = []
    dups = 0
    for s in arrivals:
        ready, skipped = stream.receive(s, s, False, 0.0)
        assert skipped == 0
        if ready is None:
            dups += 1
        else:
            out += ready
    assert out == seqs
    assert dups == len(arrivals) - n
    assert stream.complete
    assert stream.expected == seqnum.add(start, n)


def test_reliable_stream_nacks_gaps_after_reorder_delay_and_retries() -> None:
    cfg = SyncConfig(node_id=1, reorder_delay=0.002, nack_interval=0.1)
    s: ReliableStream[str] = ReliableStream(cfg, 1)
    s.receive(1, "a", False, 0.0)
    s.receive(4, "d", False, 0.0)
    assert s.control(0.001, 64)[1] == []  # may still be reordering
    assert s.control(0.002, 64)[1] == [(2, 3)]
    s.receive(3, "c", False, 0.01)
    assert s.control(0.05, 64)[1] == []
    assert s.control(0.11, 64)[1] == [(2, 2)]  # retried, only what is still missing
    ready, _ = s.receive(2, "b", False, 0.12)
    assert ready == ["b", "c", "d"]
    assert s.complete
    assert s.nack_due is None


def test_reliable_stream_learns_lost_tail_from_a_header() -> None:
    s: ReliableStream[str] = ReliableStream(CFG, 1)
    s.receive(1, "a", False, 0.0)
    s.note_latest(3, 0.0)  # an ALIVE or control header says 3 exist
    assert not s.complete
    assert s.control(1.0, 64)[1] == [(2, 3)]


def test_reliable_stream_jumps_to_a_resync_begin_over_a_gap() -> None:
    s: ReliableStream[str] = ReliableStream(CFG, 1)
    s.receive(5, "e", False, 0.0)
    ready, skipped = s.receive(7, "BEGIN", True, 0.0)
    assert ready == ["BEGIN"]
    assert skipped == 5  # 1-4 and 6 never arrived; 5 arrived but is superseded too
    assert s.expected == 8


def test_reliable_stream_acks_every_n_or_after_interval() -> None:
    cfg = SyncConfig(node_id=1, ack_every=3, ack_interval=0.05)
    s: ReliableStream[str] = ReliableStream(cfg, 1)
    s.receive(1, "a", False, 0.0)
    assert s.control(0.01, 64)[0] is None
    assert s.control(0.05, 64)[0] == 1
    for i in (2, 3, 4):
        s.receive(i, "x", False, 0.06)
    assert s.control(0.06, 64)[0] == 4


def test_reorder_buffer_is_bounded() -> None:
    cfg = SyncConfig(node_id=1, reorder_max=2)
    s: ReliableStream[str] = ReliableStream(cfg, 1)
    for i in (3, 4, 5):
        s.receive(i, "x", False, 0.0)
    assert s.reorder_dropped == 1
    assert s.control(1.0, 64)[1] == [(1, 2), (5, 5)]


def test_best_effort_stream_waits_briefly_then_gives_up_gaps() -> None:
    cfg = SyncConfig(node_id=1, reorder_delay=0.002)
    s: BestEffortStream[str] = BestEffortStream(cfg, 1)
    assert s.receive(1, "a", False, 0.0) == (["a"], 0)
    assert s.receive(3, "c", False, 0.0) == ([], 0)
    assert s.receive(2, "b", False, 0.001) == (["b", "c"], 0)  # reordered, not lost
    assert s.receive(5, "e", False, 0.01) == ([], 0)
    assert s.deadline() == 0.012
    assert s.expire(0.012) == (["e"], 1)
    assert s.receive(4, "d", False, 0.02) == (None, 0)  # too late: never applied


# --- ALARM parts ----------------------------------------------------------------------------


def test_refresh_pacer_spreads_the_snapshot_over_the_period() -> None:
    p = RefreshPacer(period=32.0, now=0.0)
    p.begin(((bytes([i]), b"\x90") for i in range(64)), now=0.0)
    assert p.allowance(0.0) == 2
    p.emitted = 2
    assert p.allowance(0.5) == 0
    assert p.deadline(0.5) == 1.0
    assert p.allowance(15.9) == 30
    assert p.allowance(40.0) == 62
    assert p.next_period == 32.0


def test_expiry_tracker_oldest_first_and_destroy_forgets() -> None:
    t = ExpiryTracker(timeout=10.0)
    t.refresh(1, [(b"a", b"1"), (b"b", b"1")], 0.0)
    t.refresh(1, [(b"a", b"2")], 5.0)
    t.refresh(2, [(b"c", b"1"), (b"c", None)], 1.0)
    assert t.deadline() == 10.0
    assert t.expire(9.9) == []
    assert t.expire(10.0) == [(1, [b"b"])]
    assert t.deadline() == 15.0


# --- epochs and the sequence wrap end to end -----------------------------------------------------


def test_new_epoch_increases_even_if_the_clock_does_not() -> None:
    assert new_epoch(1_700_000_000.7) == 1_700_000_000
    assert new_epoch(1_700_000_000.7, previous=1_700_000_005) == 1_700_000_006
    assert new_epoch(float(seqnum.MASK - 10), previous=seqnum.MASK) == 1  # 0 is reserved
    assert new_epoch(5.0, previous=seqnum.MASK) == 5  # serially after: fine


def test_streams_converge_across_the_sequence_wrap_with_loss() -> None:
    c = Cluster(2, seed=21, faults=Faults(loss=0.1, delay=(0.0001, 0.002)))
    for n in c.nodes.values():  # long-running senders, 30 datagrams before the wrap
        n.engine._tx.seq = seqnum.MASK - 30
        n.engine._tx.first_lap = False
    c.pump_all()
    Workload(c, creates=1500).run()
    c.bus.faults = Faults()
    c.run(5.0)
    c.assert_converged()
    for n in c.nodes.values():
        assert n.engine._tx.seq < 1000  # wrapped
