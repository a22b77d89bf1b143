"""Protocol behaviours of the replication engine, one at a time, with a hand-driven clock.

Most tests wire two engines directly (`Pair`) so each datagram's fate is chosen by the test;
the lossy-bus harness from test_sync_sim is used where time and many datagrams matter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sync_sim import Cluster, Faults, Node, Workload, udp_flow

from conntrackd_py.flow import pack_flow, pack_value
from conntrackd_py.sync import (
    Engine,
    PeerDown,
    PeerRestarted,
    PeerUp,
    RemoteFlows,
    ResyncDone,
    ResyncStarted,
    SyncConfig,
    config_from,
    decode_untrusted,
    wire,
)
from conntrackd_py.sync.wire import Kind

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
K3 = b"\x55" * 32


class Pair:
    """Two engines, A (node 1) and B (node 2), and the internal dicts they replicate."""

    def __init__(self, **cfg: object) -> None:
        self.now = 0.0
        self.a_int: dict[bytes, bytes] = {}
        self.b_int: dict[bytes, bytes] = {}
        self.a = Engine(SyncConfig(node_id=1, **cfg), 101, lambda: self.a_int.items(), 0.0)  # type: ignore[arg-type]
        self.b = Engine(SyncConfig(node_id=2, **cfg), 202, lambda: self.b_int.items(), 0.0)  # type: ignore[arg-type]
        self.b_view: dict[bytes, bytes] = {}
        self.b_events: list[object] = []

    def a_sends(self) -> list[bytes]:
        return self.a.datagrams_to_send(self.now)

    def to_b(self, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.b.receive_datagram(d, self.now)
        for ev in self.b.events():
            self.b_events.append(ev)
            if isinstance(ev, RemoteFlows):
                for k, v in ev.flows:
                    if v is None:
                        self.b_view.pop(k, None)
                    else:
                        self.b_view[k] = v

    def exchange(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            da, db = self.a_sends(), self.b.datagrams_to_send(self.now)
            self.to_b(da)
            for d in db:
                self.a.receive_datagram(d, self.now)
            self.a.events()


def _flow(i: int) -> tuple[bytes, bytes]:
    return pack_flow(udp_flow(1, i))


# --- ordering: a destroy is never undone by a late copy ------------------------------------------


def test_destroy_not_resurrected_by_late_retransmission() -> None:
    p = Pair()
    p.exchange()
    k, v = _flow(1)
    p.a_int[k] = v
    p.a.local_update(k, v, p.now)
    d_update = p.a_sends()
    del p.a_int[k]
    p.a.local_destroy(k, p.now)
    d_destroy = p.a_sends()
    assert len(d_update) == len(d_destroy) == 1
    p.to_b(d_destroy)  # overtakes the update: held back, nothing applied
    assert k not in p.b_view
    assert not p.b.in_sync()
    p.to_b(d_update)  # now both apply, in order
    assert k not in p.b_view
    p.to_b(d_update)  # a retransmitted copy arriving late changes nothing
    assert k not in p.b_view
    assert p.b.counters.replayed == 1
    assert p.b.in_sync()


def test_updates_to_one_flow_waiting_to_be_sent_coalesce() -> None:
    p = Pair()
    p.exchange()
    k, v = _flow(1)
    for t in (10, 20, 30):
        p.a.local_update(k, pack_value(udp_flow(1, 1, timeout=t)), p.now)
    p.a.local_destroy(k, p.now)
    (d,) = p.a_sends()
    msgs = decode_untrusted(d).messages
    assert msgs == [(k, None)]  # a destroy after updates replaces them
    p.a.local_destroy(k, p.now)
    p.a.local_update(k, v, p.now)
    (d,) = p.a_sends()
    assert decode_untrusted(d).messages == [(k, v)]  # and the reverse


def test_datagrams_are_filled_up_to_the_mtu() -> None:
    p = Pair(mtu=1400)
    p.exchange()
    for i in range(1000):
        k, v = _flow(i)
        p.a.local_update(k, v, p.now)
    out = p.a_sends()
    assert all(len(d) <= 1400 for d in out)
    assert all(len(d) > 1400 - 45 for d in out[:-1])  # no room left for one more flow
    assert sum(len(decode_untrusted(d).messages) for d in out) == 1000


def test_full_resync_is_emitted_lazily_in_bounded_bursts() -> None:
    p = Pair(burst=16)  # not the production 64: 5000 flows then take many calls to send
    p.exchange()
    for i in range(5000):
        k, v = _flow(i)
        p.a_int[k] = v
    p.a.bulk_send(p.now)
    calls = total = 0
    while out := p.a_sends():
        assert len(out) <= 16
        calls += 1
        total += len(out)
        p.to_b(out)
        if len(p.b_view) < 5000:
            assert p.a.get_timer() == p.now  # more to send: the shell calls again
    assert total > 150
    assert calls == -(-total // 16)
    assert p.b_view == p.a_int
    assert isinstance(p.b_events[-1], ResyncDone)


def test_full_resync_pauses_while_a_live_peer_lags_by_the_window() -> None:
    # a window of 8 datagrams (production: 1024) so a small table fills it
    p = Pair(resync_window=8, ack_every=4)
    p.exchange()
    p.now += 0.1
    p.exchange()  # B has acked A's stream so far
    for i in range(3000):
        k, v = _flow(i)
        p.a_int[k] = v
    p.a.bulk_send(p.now)
    out = p.a_sends()
    assert len(out) == 8
    assert p.a.get_timer() != p.now  # nothing more until B acks
    assert p.a_sends() == []
    p.to_b(out)
    for d in p.b.datagrams_to_send(p.now):  # B acks after every 4 datagrams
        p.a.receive_datagram(d, p.now)
    assert p.a.get_timer() == p.now
    assert len(p.a_sends()) == 8


def test_local_update_rejects_bytes_that_are_not_packed_flows() -> None:
    p = Pair()
    with pytest.raises(ValueError, match="packed"):
        p.a.local_update(b"not msgpack", b"\x90", 0.0)
    with pytest.raises(ValueError, match="MTU"):
        p.a.local_update(b"\x91" + b"\xc4\xff" + bytes(255), b"\x91" + b"\xc5\x05\x00"
                         + bytes(1280), 0.0)


# --- authentication and replay -----------------------------------------------------------------


def test_forged_datagram_changes_nothing_and_is_counted() -> None:
    p = Pair(keys=(K1,))
    p.exchange()
    before = (dict(p.b_view), p.b.in_sync(), p.b.stats().peers)
    k, v = _flow(7)
    wrong_key = wire.encode_datagram(1, 101, 50, [(k, v)], sequenced=True, first_lap=True,
                                     keys=[K3])
    untagged = wire.encode_datagram(1, 101, 50, [(k, v)], sequenced=True, first_lap=True)
    good = wire.encode_datagram(1, 101, 50, [(k, v)], sequenced=True, first_lap=True,
                                keys=[K1])
    tampered = bytearray(good)
    tampered[-20] ^= 1
    p.to_b([wrong_key, untagged, bytes(tampered)])
    assert p.b.counters.bad_mac == 3
    assert p.b.rejected == {"unknown_key": 1, "untagged": 1, "bad_tag": 1}
    assert not [e for e in p.b_events[-3:] if isinstance(e, RemoteFlows)]
    assert (p.b_view, p.b.in_sync(), p.b.stats().peers) == before


def test_key_rotation_two_keys_accepted_primary_signs() -> None:
    c = Cluster(0)
    c.add(1, 11, keys=(K1, K2))  # rotated: signs with K1, accepts K2
    c.add(2, 12, keys=(K2, K1))  # not yet: signs with K2, accepts K1
    c.add(3, 13, keys=(K2,))  # K1 already retired here: drops node 1's datagrams
    c.pump_all()
    Workload(c, creates=200).run([c[1], c[2]])
    c.run(3.0)
    assert c[1].views[2] == c[2].internal
    assert c[2].views[1] == c[1].internal
    assert c[3].views[2] == c[2].internal
    assert 1 not in c[3].views
    assert c[3].engine.counters.bad_mac > 0
    assert c[3].engine.rejected.keys() == {"unknown_key"}
    assert c[1].engine.counters.bad_mac == c[2].engine.counters.bad_mac == 0
    ids = {decode_untrusted(d, [K1, K2]).key_id for d in c[1].engine.datagrams_to_send(c.now)
           + c[1].engine.datagrams_to_send(c.now + 5)}
    assert ids == {wire.key_id(K1)}


def test_receiver_without_keys_rejects_tagged_and_keyed_rejects_untagged() -> None:
    tagged = wire.encode_datagram(1, 5, 1, [Kind.ALIVE], sequenced=True, first_lap=True,
                                  keys=[K1])
    plain = wire.encode_datagram(1, 5, 1, [Kind.ALIVE], sequenced=True, first_lap=True)
    open_b = Engine(SyncConfig(node_id=2), 7, dict().items, 0.0)
    keyed_b = Engine(SyncConfig(node_id=2, keys=(K1,)), 7, dict().items, 0.0)
    open_b.receive_datagram(tagged, 0.0)
    keyed_b.receive_datagram(plain, 0.0)
    assert open_b.rejected == {"unexpected_tag": 1}
    assert keyed_b.rejected == {"untagged": 1}
    assert not open_b.events()
    assert not keyed_b.events()


def test_replayed_datagrams_are_dropped_and_counted() -> None:
    p = Pair(keys=(K1,))
    first = p.a_sends()
    p.to_b(first)
    p.exchange()
    for i in range(3):
        k, v = _flow(i)
        p.a_int[k] = v
        p.a.local_update(k, v, p.now)
    data = p.a_sends()
    p.to_b(data)
    view = dict(p.b_view)
    p.to_b(data + first)  # same epoch, seqs already delivered
    assert p.b.counters.replayed == len(data) + 1
    # node 1 restarts with a newer epoch; the old epoch's datagrams are now stale
    p.a = Engine(SyncConfig(node_id=1, keys=(K1,)), 102, lambda: p.a_int.items(), p.now)
    p.to_b(p.a_sends())
    assert any(isinstance(e, PeerRestarted) and e.epoch == 102 for e in p.b_events)
    p.to_b(data)
    assert p.b.counters.stale_epoch == len(data)
    assert p.b_view == view


def test_old_control_datagram_far_behind_the_stream_is_a_replay() -> None:
    p = Pair()
    p.exchange()
    p.b.request_resync(1, p.now)
    (req,) = p.b.datagrams_to_send(p.now)  # captured, not delivered
    assert not decode_untrusted(req).sequenced
    for i in range(100):  # B's stream moves 100 datagrams ahead
        k, v = _flow(i)
        p.b.local_update(k, v, p.now)
        for d in p.b.datagrams_to_send(p.now):
            p.a.receive_datagram(d, p.now)
    before = p.a.counters.resync_requests_received
    replayed = p.a.counters.replayed
    p.a.receive_datagram(req, p.now)
    assert p.a.counters.resync_requests_received == before
    assert p.a.counters.replayed == replayed + 1


def test_unknown_node_is_dropped_when_a_peer_list_is_configured() -> None:
    b = Engine(SyncConfig(node_id=2, allowed_peers=frozenset({1})), 7, dict().items, 0.0)
    b.receive_datagram(wire.encode_datagram(9, 5, 1, [Kind.ALIVE], sequenced=True,
                                            first_lap=True), 0.0)
    b.receive_datagram(wire.encode_datagram(2, 7, 0, [wire.Ack(1, 5, 0)], sequenced=False,
                                            first_lap=True), 0.0)  # our own, looped back
    assert b.counters.unknown_node == 1
    assert b.counters.own == 1
    assert b.events() == []


def test_unknown_kinds_and_fields_from_a_newer_version_are_skipped_and_counted() -> None:
    k, v = _flow(1)
    body = (b"\x93\x00" + k + v  # a known flow update
            + b"\x93\x07\x01\x02"  # kind 7: unknown stream message with two fields
            + b"\x94\x00" + k + v + b"\xa3new"  # FLOW_UPDATE with one extra field
            + b"\x91\x04")  # ALIVE
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.Flag.SEQUENCED | wire.Flag.FIRST_LAP,
                            0, 1, 5, 1, 4)
    b = Engine(SyncConfig(node_id=2), 7, dict().items, 0.0)
    b.receive_datagram(head + body, 0.0)
    flows = [e for e in b.events() if isinstance(e, RemoteFlows)]
    assert [f for e in flows for f in e.flows] == [(k, v), (k, v)]
    assert b.counters.unknown_kind == 2
    assert b.counters.malformed == 0


# --- peers, epochs, liveness --------------------------------------------------------------------


def test_peer_down_reported_exactly_peer_timeout_after_last_datagram() -> None:
    c = Cluster(2, peer_timeout=3.0, alive_interval=1.0)  # the times asserted below
    c.pump_all()
    c.run(2.5)
    c[2].attached = False
    c.run(5.0)
    downs = c[1].events_of(PeerDown)
    last_seen = next(p for p in c[1].engine.stats().peers if p.node == 2).last_seen
    assert [e.node for _, e in downs] == [2]
    assert downs[0][0] == last_seen + 3.0
    assert c[1].views.get(2) == c[2].internal  # entries kept


def test_peer_up_and_restart_events() -> None:
    p = Pair()
    p.exchange()
    assert [e for e in p.b_events if isinstance(e, PeerUp)] == [PeerUp(1, 101)]
    p.a = Engine(SyncConfig(node_id=1), 150, lambda: p.a_int.items(), p.now)
    p.to_b(p.a_sends())
    assert [e for e in p.b_events if isinstance(e, PeerRestarted)] == [PeerRestarted(1, 150)]


def test_restarted_peer_stale_flows_are_swept_by_its_initial_resync() -> None:
    p = Pair()
    for i in range(50):
        k, v = _flow(i)
        p.a_int[k] = v
    p.a = Engine(SyncConfig(node_id=1), 101, lambda: p.a_int.items(), 0.0)
    p.exchange()
    assert p.b_view == p.a_int
    gone = list(p.a_int)[:20]
    for k in gone:  # ended while node 1 was down
        del p.a_int[k]
    p.a = Engine(SyncConfig(node_id=1), 102, lambda: p.a_int.items(), p.now)
    marks: set[bytes] | None = None
    for d in p.a_sends():
        p.b.receive_datagram(d, p.now)
    for ev in p.b.events():
        if isinstance(ev, ResyncStarted):
            marks = set(p.b_view)
        elif isinstance(ev, RemoteFlows):
            for k, val in ev.flows:
                assert val is not None
                p.b_view[k] = val
                if marks is not None:
                    marks.discard(k)
        elif isinstance(ev, ResyncDone):
            assert marks is not None
            for k in marks:
                del p.b_view[k]
    assert p.b_view == p.a_int


def test_late_joiner_of_a_wrapped_stream_requests_a_full_resync() -> None:
    c = Cluster(1)
    one = c[1]
    one.engine._tx.seq = 2**32 - 10  # running for ages: its stream has wrapped
    one.engine._tx.first_lap = False
    c.pump_all()
    w = Workload(c, creates=600)
    w.run()
    c.run(2.0)
    two = c.add(2, epoch=2002, startup_resync=False)  # it will not ask on its own
    two.pump()
    w.run()
    c.run(3.0)
    c.assert_converged()
    assert two.engine.counters.resync_requests_sent >= 1
    assert one.engine.counters.resyncs_sent == 2


def test_older_epoch_accepted_as_a_restart_only_once_the_peer_is_down() -> None:
    c = Cluster(2, peer_timeout=3.0)  # the times below are written for it
    c.pump_all()
    Workload(c, creates=100).run()
    c.run(1.0)
    c[2].restart(epoch=5)  # a clock step back: the new epoch is older than 1002
    c.run(2.0)
    assert c[1].engine.counters.stale_epoch > 0  # looks like a replay while 1002 is alive
    assert not c[1].events_of(PeerRestarted)
    c.run(3.0)  # 1002 is declared down, then epoch 5 is taken as a restart
    assert [e.epoch for _, e in c[1].events_of(PeerRestarted)] == [5]
    c.run(3.0)
    c.assert_converged()


# --- in_sync() -------------------------------------------------------------------------------


def test_in_sync_alone_only_after_startup_wait() -> None:
    e = Engine(SyncConfig(node_id=1, startup_wait=2.0), 1, dict().items, 10.0)
    assert not e.in_sync()
    e.handle_timer(11.9)
    assert not e.in_sync()
    e.handle_timer(12.0)
    assert e.in_sync()


def test_in_sync_false_until_peer_resync_done_false_on_gap_and_on_request() -> None:
    p = Pair(startup_wait=0.0)
    assert p.b.in_sync()  # alone, nothing to wait for
    da = p.a_sends()
    p.to_b(da[:1])  # the control datagram only: A is known, its stream not yet received
    assert not p.b.in_sync()
    p.to_b(da[1:])
    assert p.b.in_sync()
    k, v = _flow(1)
    p.a.local_update(k, v, p.now)
    first = p.a_sends()
    p.a.local_update(k, pack_value(udp_flow(1, 1, timeout=99)), p.now)
    second = p.a_sends()
    p.to_b(second)
    assert not p.b.in_sync()  # a gap
    p.to_b(first)
    assert p.b.in_sync()
    p.b.request_resync(1, p.now)
    assert not p.b.in_sync()
    for d in p.b.datagrams_to_send(p.now):
        p.a.receive_datagram(d, p.now)
    p.to_b(p.a_sends())
    assert p.b.in_sync()


def test_nack_for_evicted_datagrams_triggers_a_full_resync_not_silent_loss() -> None:
    p = Pair(resend_queue_max=4, resync_window=2)  # 40 datagrams overflow a 4-entry queue
    p.exchange()
    sent = []
    for i in range(40):
        k, v = _flow(i)
        p.a_int[k] = v
        p.a.local_update(k, v, p.now)
        sent += p.a_sends()
    p.to_b(sent[-1:])  # B saw only the newest: everything before is missing
    p.now += 0.01
    for d in p.b.datagrams_to_send(p.now):  # NACK
        p.a.receive_datagram(d, p.now)
    assert p.a.counters.nacks_received == 1
    resync = p.a_sends()
    starts = [d for d in resync if decode_untrusted(d).markers & (1 << Kind.RESYNC_BEGIN)]
    assert starts
    assert p.a.counters.resyncs_sent == 2
    p.to_b(resync)
    p.exchange()
    assert p.b_view == p.a_int
    assert p.b.counters.lost > 0
    assert p.b.in_sync()


def test_one_way_link_failure_does_not_stall_full_resyncs_for_others() -> None:
    # a small window (so the lagging peer would stall it) and a short timeout (to run fast)
    c = Cluster(3, seed=6, resync_window=16, peer_timeout=2.0)
    c.pump_all()
    Workload(c, creates=300).run()
    c.run(2.0)
    c.bus.tap = lambda src, dst, data: not (src == 1 and dst == 2)  # 2 no longer hears 1
    for i in range(3000):
        k, v = pack_flow(udp_flow(1, 10_000 + i))
        c[1].internal[k] = v
    c[1].engine.bulk_send(c.now)  # ~100 datagrams, far more than the window
    c[1].pump()
    c.run(6.0)
    assert c[3].views[1] == c[1].internal  # node 2's stale ACK did not hold it back
    assert c[1].engine.stats().as_dict()["resync"] == {"pending": False, "active": False,
                                                          "remaining": 0}


def test_multicast_acks_and_nacks_are_addressed() -> None:
    c = Cluster(3, seed=4, faults=Faults(loss=0.1))
    c.pump_all()
    Workload(c, creates=300).run()
    c.run(5.0)
    c.assert_converged()
    for n in c.nodes.values():
        # every node hears the others' ACK/NACKs but acts only on those addressed to it
        assert n.engine.counters.acks_received < sum(
            m.engine.counters.acks_sent for m in c.nodes.values() if m is not n)


# --- NOTRACK and ALARM --------------------------------------------------------------------------


def test_notrack_sends_no_acks_and_converges_without_loss() -> None:
    c = Cluster(2, mode="notrack")
    c.pump_all()
    Workload(c, creates=500).run()
    c.run(2.0)
    c.assert_converged()
    for n in c.nodes.values():
        assert n.engine.counters.acks_sent == n.engine.counters.nacks_sent == 0


def test_notrack_periodic_resync_heals_losses() -> None:
    c = Cluster(2, seed=3, mode="notrack", periodic_resync=5.0,
                faults=Faults(loss=0.2))
    c.pump_all()
    Workload(c, creates=500).run()
    c.bus.faults = Faults()
    assert c.mismatches()  # 20% loss, no retransmission
    c.run(6.0)
    c.assert_converged()


def test_alarm_refresh_is_spread_over_the_period() -> None:
    c = Cluster(2, mode="alarm", alarm_refresh=10.0, cache_timeout=30.0)
    for i in range(3200):
        k, v = _flow(i)
        c[1].internal[k] = v
    c[1].restart(epoch=2001)
    c.pump_all()
    c.run(9.9)  # initial full resync done; the first refresh period starts at 10 s
    base = c[1].engine.counters.flows_sent
    c.run_until(15.0)
    half = c[1].engine.counters.flows_sent - base
    c.run_until(19.9)
    full = c[1].engine.counters.flows_sent - base
    assert full == 3200
    assert 1300 < half < 1900  # about half of them in the first half of the period


def test_alarm_receiver_expires_flows_not_refreshed() -> None:
    c = Cluster(2, mode="alarm", alarm_refresh=2.0, cache_timeout=6.0)
    c.pump_all()
    Workload(c, creates=200).run()
    c.run(3.0)
    c.assert_converged()
    c[1].attached = False  # its refreshes stop reaching node 2
    c.run(5.0)
    assert len(c[2].views[1]) > 0
    c.run(2.0)
    assert c[2].views[1] == {}
    assert c[2].engine.counters.expired == len(c[1].internal)


def test_alarm_lost_destroy_is_healed_by_expiry() -> None:
    c = Cluster(2, mode="alarm", alarm_refresh=1.0, cache_timeout=3.0)
    c.pump_all()
    Workload(c, creates=100).run()
    c.run(2.0)
    k = next(iter(c[1].internal))
    c.bus.faults = Faults(loss=1.0)
    c[1].destroy(k)
    c[1].pump()
    c.run(0.1)
    c.bus.faults = Faults()
    assert k in c[2].views[1]
    c.run(4.0)
    assert k not in c[2].views[1]
    c.assert_converged()


# --- the sans-I/O rule ---------------------------------------------------------------------------


def test_sync_package_imports_no_trio_socket_or_time() -> None:
    pkg = Path(__file__).parents[2] / "conntrackd_py" / "sync"
    banned = {"trio", "socket", "time", "asyncio", "select", "selectors", "threading"}
    for path in sorted(pkg.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in banned, f"{path.name} imports {n}"


def test_node_helper_matches_the_documented_event_contract() -> None:
    # the harness's mark-and-sweep must drop exactly what a resync did not refresh
    c = Cluster(0)
    n = Node(c, 5, 1)
    n.apply(RemoteFlows(9, [(b"\x91\x01", b"\x91\x01"), (b"\x91\x02", b"\x91\x02")]))
    n.apply(ResyncStarted(9))
    n.apply(RemoteFlows(9, [(b"\x91\x01", b"\x91\x03")]))
    n.apply(ResyncDone(9))
    assert n.views[9] == {b"\x91\x01": b"\x91\x03"}


# --- any input: no crash, no busy loop ------------------------------------------------------------

_u32 = st.integers(0, 2**32 - 1)
_small = st.integers(0, 40)
_flows = st.integers(0, 50).map(_flow)
_stream = st.one_of(_flows, _flows.map(lambda kv: (kv[0], None)),
                    st.sampled_from([Kind.RESYNC_BEGIN, Kind.RESYNC_END, Kind.ALIVE]))
_ctrl = st.one_of(
    st.builds(wire.Ack, st.sampled_from([0, 1, 2, 3]), st.sampled_from([101, 7]), _small),
    st.builds(wire.Nack, st.sampled_from([1, 2]), st.sampled_from([101, 7]),
              st.lists(st.tuples(_small, _small), max_size=3).map(tuple)),
    st.builds(wire.ResyncRequest, st.sampled_from([0, 1, 2]), st.sampled_from([0, 101, 7]),
              _small))
_datagram = st.one_of(
    st.builds(lambda n, e, s, m, f: wire.encode_datagram(n, e, s, m, sequenced=True,
                                                         first_lap=f),
              st.sampled_from([2, 3]), st.sampled_from([5, 6, 2**32 - 1]), _small,
              st.lists(_stream, max_size=4), st.booleans()),
    st.builds(lambda n, e, s, m, f: wire.encode_datagram(n, e, s, m, sequenced=False,
                                                         first_lap=f),
              st.sampled_from([2, 3]), st.sampled_from([5, 6, 2**32 - 1]), _small,
              st.lists(_ctrl, max_size=3), st.booleans()))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["ftfw", "notrack", "alarm"]),
       st.lists(st.tuples(_datagram, st.floats(0, 2.0)), max_size=30))
def test_engine_survives_any_sequence_of_datagrams_without_busy_looping(
        mode: str, script: list[tuple[bytes, float]]) -> None:
    internal = dict(_flow(i) for i in range(40))
    e = Engine(SyncConfig(node_id=1, mode=mode, alarm_refresh=1.0, cache_timeout=3.0,  # type: ignore[arg-type]
                          resend_queue_max=8, resync_window=4, burst=8), 101,
               internal.items, 0.0)
    now = 0.0
    for data, dt in script:
        now += dt
        e.receive_datagram(data, now)
        e.handle_timer(now)
        for _ in range(1000):
            e.datagrams_to_send(now)
            e.events()
            t = e.get_timer()
            if t is None or t > now:
                break
            e.handle_timer(now)
        else:
            raise AssertionError(f"busy loop at {now}: {e.stats()}")


def test_config_from_the_daemon_config() -> None:
    from conntrackd_py import config

    cfg = config.loads("node: {id: 3}\nsync:\n  mode: notrack\n  notrack: {resync_interval: 30}"
                       "\n  auth: {required: false}"
                       "\n  peers: [1, 2]\n  channels:\n    - multicast: {group: 225.0.0.50, "
                       "interface: eth0}\n")
    sc = config_from(cfg, (K1,))
    assert (sc.node_id, sc.mode, sc.keys, sc.periodic_resync) == (3, "notrack", (K1,), 30.0)
    assert sc.allowed_peers == frozenset({1, 2})
    Engine(sc, 1, dict().items, 0.0)  # valid as a whole


def test_config_from_passes_the_limits_on() -> None:
    from conntrackd_py import config

    cfg = config.loads("node: {id: 3}\nsync:\n  auth: {required: false}\n  limits: {max_peers: 8,"
                       " peer_expire: 600, resync_min_interval: 2, resend_ratio: 3}\n"
                       "  channels:\n    - multicast: {group: 225.0.0.50, interface: eth0}\n")
    sc = config_from(cfg, ())
    assert (sc.max_peers, sc.peer_expire, sc.resync_min_interval, sc.resend_ratio) == (
        8, 600.0, 2.0, 3.0)
    default = config_from(config.loads("node: {id: 3}\nsync:\n  auth: {required: false}\n"
                                       "  channels:\n    - multicast: {group: 225.0.0.50, "
                                       "interface: eth0}\n"), ())
    assert default == SyncConfig(node_id=3, resync_window=1024)  # the production values


# --- full resync datagrams: one FLOW_BATCH each, padded to one length -----------------------------


def test_full_resync_goes_in_batches_padded_to_the_mtu_and_arrives_whole() -> None:
    p = Pair(mtu=600, keys=(K1,))
    p.a_int.update(_flow(i) for i in range(300))
    p.exchange()
    p.a.bulk_send(p.now)
    sent = p.a_sends()
    dgs = [decode_untrusted(d, (K1,)) for d in sent]
    # every datagram but the last is full, so it is padded to exactly the MTU (UDP GSO runs)
    assert [len(d) for d in sent[:-1]] == [600] * (len(sent) - 1)
    assert len(sent[-1]) <= 600
    assert dgs[0].messages[0] is Kind.RESYNC_BEGIN
    assert dgs[-1].messages[-1] is Kind.RESYNC_END
    # one message for the flows of a datagram: the batch, not one FLOW_UPDATE each
    assert all(wire.Kind.FLOW_BATCH.to_bytes(1, "big") in d for d in sent)
    assert sum(dg.n_flows for dg in dgs) == 300
    assert max(int.from_bytes(d[17:19], "big") for d in sent) <= 3  # BEGIN, batch, END
    p.to_b(sent)
    assert p.b_view == p.a_int


def test_a_snapshot_flow_too_big_for_a_batch_goes_as_a_flow_update() -> None:
    """`put` admits flows up to the MTU with FLOW_UPDATE's 2 bytes of framing; one that a
    batch's framing no longer fits still goes, alone; one that fits nothing is counted."""
    p = Pair(mtu=512)
    body = 512 - wire.HEADER_SIZE
    k = b"\x91" + b"\x00"
    big = b"\x91\xc5" + (body - 2 - len(k) - 4).to_bytes(2, "big") + bytes(body - 2 - len(k) - 4)
    assert len(k) + len(big) + wire.FLOW_OVERHEAD == body  # fits a datagram exactly
    p.a_int[k] = big
    p.a_int.update(_flow(i) for i in range(5))
    p.exchange()
    assert p.b_view == p.a_int
    p.a_int[b"\x91\x01"] = big + bytes(10)  # bigger than any datagram (never `put`)
    p.b_view.clear()
    p.a.bulk_send(p.now)
    p.exchange()
    assert p.a.counters.oversize == 1
    assert p.b_view == {kk: v for kk, v in p.a_int.items() if kk != b"\x91\x01"}
