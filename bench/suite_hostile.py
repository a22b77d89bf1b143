"""Cost per hostile input on the sync link (issue #13), sans I/O: no namespace, no root.

What one attacker's datagram can make the replication engine spend, measured on the engine
itself with a hand-driven clock (the same engine the daemon runs; the shell adds only the
system calls):

- CPU per NACK byte: a sender holding `--n`/30 datagrams unacked (one per ~30 flows) receives
  one small NACK of the widest range (main before issue #13: one such 48-byte NACK made it
  resend 4.67 MB, a 65 KB NACK datagram cost 6.7 s of CPU), one MTU-sized NACK datagram of
  overlapping ranges, and one 65 KB datagram of them (dropped by length before decoding).
- bytes out per byte in: what a peer's NACKs (and everything else it sends) can make us
  retransmit within a window, at most `resend_ratio` (10).
- resyncs per replayed request: a captured (authenticated) RESYNC_REQUEST replayed once a
  second for 60 s; at most 60 / resync_min_interval + RESYNC_BURST (3).
- state per spoofed node id: peers tracked after 100k forged node ids (at most max_peers).

Prints a table and returns a flat dict of figures (bench/run.py's contract).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conntrackd_py.flow import Flow, Status, Tuple, pack_flow
from conntrackd_py.sync import Engine, SyncConfig, decode_untrusted, wire
from conntrackd_py.sync.sender import RESYNC_BURST
from conntrackd_py.sync.seqnum import add
from conntrackd_py.sync.wire import Kind, Nack, ResyncRequest

KEY = bytes(range(32))
A_EPOCH, B_EPOCH = 11, 22


def _flow(i: int) -> tuple[bytes, bytes]:
    src = bytes((10, 1, (i >> 8) & 0xFF, i & 0xFF))
    orig = Tuple(src, bytes((192, 168, 1, 2)), 17, 1024 + (i * 7919) % 60000, 53)
    f = Flow(orig=orig, reply=orig.invert(), timeout=30,
             status=int(Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED))
    return pack_flow(f)


def _sender(flows: int, **cfg: Any) -> tuple[Engine, int, dict[bytes, bytes]]:
    """Node 1 after sending `flows` flows (its initial full resync) that node 2, heard once,
    never acknowledged: everything is still in the resend queue."""
    store = dict(_flow(i) for i in range(flows))
    a = Engine(SyncConfig(node_id=1, **cfg), A_EPOCH, lambda: store, 0.0)
    a.receive_datagram(wire.encode_datagram(2, B_EPOCH, 1, [Kind.ALIVE], sequenced=True,
                                            first_lap=True, keys=cfg.get("keys", ())), 0.0)
    while a.datagrams_to_send(0.0):
        pass
    a.events()
    return a, a.stats().seq, store


def _drain(a: Engine, now: float) -> int:
    out = 0
    while batch := a.datagrams_to_send(now):
        out += sum(map(len, batch))
    return out


def _nack(seq: int, ranges: tuple[tuple[int, int], ...], n_msgs: int = 1,
          header_seq: int = 1) -> bytes:
    return wire.encode_datagram(2, B_EPOCH, header_seq, [Nack(1, A_EPOCH, ranges)] * n_msgs,
                                sequenced=False, first_lap=True)


def _cpu(fn: Any) -> float:
    gc.collect()  # (building the sender's table leaves garbage: not the input's cost)
    t = time.process_time()
    fn()
    return time.process_time() - t


def nack_costs(flows: int) -> dict[str, float]:
    a, seq, _ = _sender(flows)
    depth = a.stats().counters.resend_queue_depth
    widest = ((add(seq, -(2**30)), add(seq, 2**30 - 1)),)
    one = _nack(seq, widest)
    out: dict[str, float] = {"queue_datagrams": depth, "nack_small_bytes": len(one)}

    def small() -> None:
        a.receive_datagram(one, 1.0)
        out["nack_small_bytes_out"] = _drain(a, 1.0)

    out["nack_small_cpu_us"] = _cpu(small) * 1e6
    # an MTU-sized NACK datagram: as many 64-range NACKs of overlapping wide ranges as fit
    ranges = tuple((add(seq, -(2**30) + i), add(seq, 2**30 - 1 - i))
                   for i in range(wire.MAX_NACK_RANGES))
    msg = len(wire.encode_message(Nack(1, A_EPOCH, ranges)))
    k = max(1, (1400 - wire.HEADER_SIZE) // msg)
    mtu_nack = _nack(seq, ranges, k)
    a2, _, _ = _sender(flows)

    def mtu() -> None:
        a2.receive_datagram(mtu_nack, 1.0)
        out["nack_mtu_bytes_out"] = _drain(a2, 1.0)

    out["nack_mtu_bytes"] = len(mtu_nack)
    out["nack_mtu_ranges"] = k * wire.MAX_NACK_RANGES
    out["nack_mtu_cpu_us"] = _cpu(mtu) * 1e6
    out["cpu_ns_per_nack_byte"] = out["nack_mtu_cpu_us"] * 1e3 / len(mtu_nack)
    # the 65 KB NACK datagram: refused by its length before any parsing
    big = _nack(seq, ranges, (65000 - wire.HEADER_SIZE) // msg)
    a3, _, _ = _sender(min(flows, 3000))
    reps = 1000
    out["nack_65k_bytes"] = len(big)

    def refused() -> None:
        for _ in range(reps):
            a3.receive_datagram(big, 1.0)

    out["nack_65k_cpu_us"] = _cpu(refused) * 1e6 / reps
    out["nack_65k_refused"] = a3.counters.oversize_received
    return out


def amplification(flows: int, window: float = 10.0) -> dict[str, float]:
    """A peer NACKs everything, every 100 ms, for `window` seconds (each NACK padded to the
    MTU, as our own are: the most a NACK can buy); bytes we resend / bytes it sent us."""
    a, seq, _ = _sender(flows)
    received = a.counters.bytes_received  # its hello
    t = 1.0
    widest = ((add(seq, -(2**30)), add(seq, 2**30 - 1)),)
    n = 0
    while t < 1.0 + window:
        d = _nack(seq, widest)
        d = d + wire.PAD * (1400 - len(d))  # padding is allowed at a body's end
        a.receive_datagram(d, t)
        received += len(d)
        _drain(a, t)
        n += 1
        t += 0.1
    resent = a.counters.bytes_retransmitted
    return {"amp_nacks": n, "amp_bytes_in": received, "amp_bytes_out": resent,
            "amp_out_per_in": resent / received,
            "amp_resends_limited": a.counters.resends_limited}


def replayed_requests(flows: int, seconds: int = 60) -> dict[str, float]:
    store = dict(_flow(i) for i in range(flows))
    a = Engine(SyncConfig(node_id=1, keys=(KEY,)), A_EPOCH, lambda: store, 0.0)
    b = Engine(SyncConfig(node_id=2, keys=(KEY,)), B_EPOCH, dict().items, 0.0)
    for d in a.datagrams_to_send(0.0):
        b.receive_datagram(d, 0.0)
    b.events()
    b.request_resync(1, 0.5)
    captured = next(d for d in b.datagrams_to_send(0.5)
                    if any(isinstance(m, ResyncRequest)
                           for m in decode_untrusted(d, [KEY]).messages))
    _drain(a, 0.5)
    start = a.counters.resyncs_sent
    sent = 0
    for t in range(1, seconds + 1):
        a.receive_datagram(captured, float(t))
        a.handle_timer(float(t))
        sent += _drain(a, float(t))
    n = a.counters.resyncs_sent - start
    return {"replay_requests": seconds, "replay_request_bytes": len(captured),
            "replay_resyncs": n,
            "replay_resyncs_bound": seconds / a.config.resync_min_interval + RESYNC_BURST,
            "replay_bytes_out_per_request_byte": sent / (seconds * len(captured)),
            "replay_coalesced": a.counters.resync_requests_coalesced}


def spoofed_ids(n: int = 100_000) -> dict[str, float]:
    e = Engine(SyncConfig(node_id=1), 5, dict().items, 0.0)
    t0 = time.process_time()
    for node in range(100, 100 + n):
        e.receive_datagram(wire.encode_datagram(node, 7, 1, [Kind.ALIVE], sequenced=True,
                                                first_lap=True), 0.0)
    cpu = time.process_time() - t0
    return {"spoofed_ids": n, "spoofed_peers_kept": len(e.stats().peers),
            "spoofed_refused": e.counters.peers_refused,
            "spoofed_cpu_us_per_datagram": cpu * 1e6 / n}


def run(args: argparse.Namespace) -> dict[str, float]:
    flows = min(int(getattr(args, "n", 100_000)), 1_000_000)
    figures: dict[str, float] = {}
    for part in (nack_costs(flows), amplification(flows), replayed_requests(flows // 10),
                 spoofed_ids()):
        figures.update({k: round(v, 3) if isinstance(v, float) else v
                        for k, v in part.items()})
    print(f"hostile inputs, sans I/O, sender holding {figures['queue_datagrams']:,} datagrams "
          f"({flows:,} flows)")
    rows = [
        (f"one {figures['nack_small_bytes']}-byte NACK, widest range",
         f"{figures['nack_small_bytes']} B in",
         f"{figures['nack_small_bytes_out']:,} B out", f"{figures['nack_small_cpu_us']:,.0f} us"),
        (f"one MTU NACK, {figures['nack_mtu_ranges']} overlapping ranges",
         f"{figures['nack_mtu_bytes']} B in", f"{figures['nack_mtu_bytes_out']:,} B out",
         f"{figures['nack_mtu_cpu_us']:,.0f} us"),
        ("one 65 KB NACK datagram", f"{figures['nack_65k_bytes']:,} B in", "refused (length)",
         f"{figures['nack_65k_cpu_us']:,.2f} us"),
        (f"{figures['amp_nacks']} MTU NACKs in 10 s", f"{figures['amp_bytes_in']:,} B in",
         f"{figures['amp_bytes_out']:,} B out", f"x{figures['amp_out_per_in']:.2f}"),
        ("60 replayed RESYNC_REQUESTs in 60 s", f"{figures['replay_request_bytes']} B each",
         f"{figures['replay_resyncs']} resyncs", f"bound {figures['replay_resyncs_bound']:.0f}"),
        ("100k spoofed node ids", "", f"{figures['spoofed_peers_kept']} peers kept",
         f"{figures['spoofed_cpu_us_per_datagram']:.1f} us each"),
    ]
    print(f"{'input':<44} {'in':>14} {'effect':>20} {'cost':>12}")
    for r in rows:
        print(f"{r[0]:<44} {r[1]:>14} {r[2]:>20} {r[3]:>12}")
    return figures


if __name__ == "__main__":
    ns = argparse.Namespace(n=int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
    run(ns)
