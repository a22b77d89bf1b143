"""Cache memory and speed at scale: bytes per flow and upserts per second.

Builds `n` realistic IPv4 UDP flows (distinct client addresses and source ports, a pool of
servers on common UDP ports, every other flow masqueraded behind a public address) packed the
way the tracker packs them (`flow.pack_flow`), into an InternalCache and an ExternalCache.

The flows are made and packed first; each cache is then filled with fresh copies of those
bytes, so the measured window allocates exactly what the cache holds. Bytes per flow are
measured two ways:
- tracemalloc (the headline, `cache_bytes_per_flow`): Python allocations alive after the fill
  (key and value objects, dict tables), divided by n. Exact and independent of what the
  process did before; it counts requested sizes, not allocator rounding.
- RSS: growth of the resident set during the fill (both caches kept alive, so the second cannot
  reuse memory the first gave back). Includes allocator rounding and overhead, but reads low
  if the process already had free heap from earlier work.
Rates: upserts/s of already packed pairs (the cache alone), reconcile of an identical dump,
`commit_plan` over 100k peer flows (the failover path), a peer's flows through
`flow.filter_untrusted` in datagrams of 30 (the receive path's check of every field), and
`commit_plan` of a 32k-flow RELATED chain (each flow the master of the next; linear now).

Run: `python bench/cache_mem.py 1000000`
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from functools import partial

from conntrackd_py.cache import ExternalCache, InternalCache
from conntrackd_py.flow import Flow, Status, Tuple, filter_untrusted, pack_flow

SERVERS = [bytes([192, 0, 2, i]) for i in range(1, 255)] + [
    bytes([198, 51, 100, i]) for i in range(1, 255)
]
PUBLIC = [bytes([203, 0, 113, i]) for i in range(1, 9)]
UDP_PORTS = (53, 123, 443, 500, 4500, 1194, 3478, 51820)
STATUS = int(Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED)
SNAT_STATUS = STATUS | int(Status.SRC_NAT | Status.SRC_NAT_DONE)


def flows(n: int, seed: int = 1) -> Iterator[Flow]:
    """n distinct UDP flows; odd ones masqueraded (reply tuple to a public address/port)."""
    rnd = random.Random(seed)
    for i in range(n):
        host = 0x0A000000 + (i // 4) % (1 << 20) + 2  # 10.0.0.2.. four flows per client
        src = host.to_bytes(4, "big")
        sport = 32768 + (i * 7919) % 28232  # ephemeral range, spread
        sport ^= (i >> 20) & 0x7  # wraps beyond ~4M stay distinct enough
        dst = SERVERS[rnd.randrange(len(SERVERS))]
        dport = UDP_PORTS[rnd.randrange(len(UDP_PORTS))]
        orig = Tuple(src, dst, 17, sport, dport)
        if i & 1:
            pub = PUBLIC[(i >> 1) % len(PUBLIC)]
            nat_port = 1024 + ((i >> 4) % 64511)
            reply = Tuple(dst, pub, 17, dport, nat_port)
            yield Flow(orig=orig, reply=reply, status=SNAT_STATUS, timeout=120)
        else:
            yield Flow(orig=orig, reply=orig.invert(), status=STATUS,
                       timeout=30 if dport == 53 else 120)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _copy(b: bytes) -> bytes:
    return bytes(memoryview(b))  # a new object, so the measured window allocates it


def _fill_internal(pairs: list[tuple[bytes, bytes]], copy: bool) -> InternalCache:
    c = InternalCache()
    up = c.upsert
    if copy:
        for k, v in pairs:
            up(_copy(k), _copy(v))
    else:
        for k, v in pairs:
            up(k, v)
    return c


def _fill_external(pairs: list[tuple[bytes, bytes]], copy: bool) -> ExternalCache:
    c = ExternalCache(epoch=0.0)
    up = c.upsert
    now = 1000.0
    for i, (k, v) in enumerate(pairs):
        # peer datagrams arrive in batches sharing one `now`; stamps spread over n/100k s
        up(1, _copy(k) if copy else k, v, now + (i >> 10) / 100)
    return c


def _traced(fill: Callable[[list[tuple[bytes, bytes]], bool], object],
            pairs: list[tuple[bytes, bytes]]) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = fill(pairs, True)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del cache
    return (after - before) / len(pairs)


def _rate(n: int, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def measure(n: int) -> dict[str, float]:
    """Build n flows into each cache; return bytes/flow and rates (see the module docstring).

    `cache_bytes_per_flow` (the headline) is the tracemalloc figure of the InternalCache.
    """
    out: dict[str, float] = {"flows": n}
    t0 = time.perf_counter()
    pairs = [pack_flow(f) for f in flows(n)]
    out["make_and_pack_per_s"] = n / (time.perf_counter() - t0)
    assert len(dict(pairs)) == n, "flows are not distinct"
    # a million tracked tuples would make every full collection walk them, which the daemon
    # never does (its caches are untracked); freeze them as InternalCache.load does. Frozen
    # objects are still freed by reference counting, so nothing needs unfreezing.
    gc.freeze()
    return _measure(pairs, out)


def _measure(pairs: list[tuple[bytes, bytes]], out: dict[str, float]) -> dict[str, float]:
    n = len(pairs)

    # both kept alive, so the second cannot reuse memory the first gave back
    gc.collect()
    r0 = _rss()
    internal = _fill_internal(pairs, True)
    r1 = _rss()
    external = _fill_external(pairs, True)
    r2 = _rss()
    out["internal_bytes_per_flow_rss"] = (r1 - r0) / n
    out["external_bytes_per_flow_rss"] = (r2 - r1) / n
    del internal, external

    out["internal_bytes_per_flow"] = _traced(_fill_internal, pairs)
    out["external_bytes_per_flow"] = _traced(_fill_external, pairs)
    out["cache_bytes_per_flow"] = out["internal_bytes_per_flow"]

    out["internal_upserts_per_s"] = _rate(n, lambda: _fill_internal(pairs, False))
    out["external_upserts_per_s"] = _rate(n, lambda: _fill_external(pairs, False))
    cache = _fill_internal(pairs, False)
    out["reconcile_per_s"] = _rate(n, partial(cache.reconcile, pairs))
    del cache

    # the failover path: plan a commit of up to 100k peer flows
    sub = pairs[:100_000]
    ext = _fill_external(sub, False)
    out["commit_plan_per_s"] = _rate(len(sub), partial(ext.commit_plan, now=1005.0))

    # the receive path: every field of a peer's flows checked, one FLOW_BATCH (30) at a time
    batches = [sub[i:i + 30] for i in range(0, len(sub), 30)]
    out["filter_untrusted_per_s"] = _rate(
        len(sub), lambda: [filter_untrusted(b) for b in batches])

    # a RELATED chain, leaves first (the worst order for walking up to the masters)
    chain = _related_chain(32768)
    ext = ExternalCache(epoch=0.0)
    ext.apply(1, [pack_flow(f) for f in chain], now=1.0)
    out["commit_plan_chain_per_s"] = _rate(len(chain), partial(ext.commit_plan, now=2.0))
    return out


def _related_chain(n: int) -> list[Flow]:
    def orig(i: int) -> Tuple:
        return Tuple(bytes([10, 0, 0, 2]), SERVERS[0], 6, 1024 + i % 60000, 21 + i // 60000)
    return [Flow(orig(i), orig(i).invert(), status=STATUS, timeout=300, state=3,
                 master=None if i == 0 else orig(i - 1)) for i in reversed(range(n))]


def main(argv: list[str]) -> None:
    n = int(argv[1]) if len(argv) > 1 else 1_000_000
    res = measure(n)
    print(f"{'figure':<32}{'value':>14}")
    for k, v in res.items():
        print(f"{k:<32}{v:>14,.1f}")
    if len(argv) > 2:
        with open(argv[2], "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main(sys.argv)
