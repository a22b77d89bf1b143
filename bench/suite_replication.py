"""Suite `replication`: two firewalls on a multicast sync link, conntrackd-py against the real
conntrackd 1.4.7 (FTFW), in the same run. See bench/README.md for the method in full.

Topology: `cluster_topology(n_fw=2)`; fw1 (node A) holds the VIPs, so the client's flows go
through it and A replicates them to fw2 (node B). Every measurement gets a fresh lab.

  throughput  N flows made by real packets (`udp_flows_popen`, one UDP datagram per flow from
              the client): the time from the generator's first packet until B's external
              cache holds all N (polled every 20 ms) -> flows/s, for N = 10k and args.n.
              Daemon A and the generator are pinned to CPU 0, daemon B to CPU 1.
  CPU         utime+stime of A and B (/proc/PID/stat) over that window, per flow.
  wire        UDP payload bytes A sent on the sync link in that window, per flow, counted by a
              listener socket in B's namespace (same group and port, SO_REUSEADDR: the kernel
              delivers it a copy of every datagram B's daemon gets). Cross-checked against each
              daemon's own "bytes sent" counter.
  latency     300 flows, one every 10 ms: the time from the client's sendto() of a flow's first
              packet to the kernel receive timestamp (SO_TIMESTAMPNS) of the first sync
              datagram carrying that flow in B's namespace. Identical for both daemons; it ends
              when the replica reaches B, before B's daemon has parsed it. For conntrackd-py
              the time until B's daemon has applied it to its external cache (its `watch`
              stream) is reported too (`latency_applied_*`).
  loss        5% random loss on the sync link (nftables, both firewalls) from before the
              daemons start; 10k flows within the daemons' first second; then wait (bounded)
              for B to settle. conntrackd-py: A's internal cache and B's external cache compared
              entry by entry (raw dumps); conntrackd: internal count on A minus external count
              on B (it has no raw dump that cheap).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from collections.abc import Callable

from lab.bench import OURS, REF
from lab.measure import SMALL_N, latency, loss, say, summarize_profile, throughput

# --- the suite --------------------------------------------------------------------------------

def _median_run(fn: Callable[[], dict[str, float]], repeat: int) -> dict[str, float]:
    runs = [fn() for _ in range(max(1, repeat))]
    if len(runs) == 1:
        return runs[0]
    runs.sort(key=lambda r: r["flows_per_s"])
    return runs[len(runs) // 2]


def run(args: argparse.Namespace) -> dict[str, float]:
    if os.geteuid() != 0:
        raise SystemExit("the replication suite needs root (network namespaces)")
    t_suite = time.monotonic()
    n = int(args.n)
    repeat = int(getattr(args, "repeat", 1) or 1)
    sizes = sorted({SMALL_N, n}) if n != SMALL_N else [SMALL_N]
    tp: dict[tuple[str, int], dict[str, float]] = {}
    for size in sizes:
        for kind in (OURS, REF):
            tp[kind, size] = _median_run(functools.partial(throughput, kind, size), repeat)
    lat = {kind: latency(kind) for kind in (OURS, REF)}
    los = {kind: loss(kind) for kind in (OURS, REF)}

    big = max(sizes)
    o, c = tp[OURS, big], tp[REF, big]
    o10, c10 = tp[OURS, SMALL_N], tp[REF, SMALL_N]
    f: dict[str, float] = {
        "throughput_ratio": o["flows_per_s"] / c["flows_per_s"] if c["flows_per_s"] else 0.0,
        "throughput_flows_per_s": o["flows_per_s"],
        "conntrackd_throughput_flows_per_s": c["flows_per_s"],
        "throughput_ratio_10k": o10["flows_per_s"] / c10["flows_per_s"]
        if c10["flows_per_s"] else 0.0,
        "throughput_10k_flows_per_s": o10["flows_per_s"],
        "conntrackd_throughput_10k_flows_per_s": c10["flows_per_s"],
        "seconds_to_replica": o["seconds"],
        "conntrackd_seconds_to_replica": c["seconds"],
        "tail_s": o["tail_s"],
        "conntrackd_tail_s": c["tail_s"],
        "generator_flows_per_s": o["generator_flows_per_s"],
        "conntrackd_generator_flows_per_s": c["generator_flows_per_s"],
        "cpu0_busy": o["cpu0_busy"],
        "cpu1_busy": o["cpu1_busy"],
        "replicated_complete": o["complete"],
        "conntrackd_replicated_complete": c["complete"],
        "latency_p50_ms": lat[OURS]["p50_ms"],
        "latency_p99_ms": lat[OURS]["p99_ms"],
        "conntrackd_latency_p50_ms": lat[REF]["p50_ms"],
        "conntrackd_latency_p99_ms": lat[REF]["p99_ms"],
        "latency_applied_p50_ms": lat[OURS].get("applied_p50_ms", math.nan),
        "latency_applied_p99_ms": lat[OURS].get("applied_p99_ms", math.nan),
        "latency_missing": lat[OURS]["missing"],
        "conntrackd_latency_missing": lat[REF]["missing"],
        "wire_bytes_per_flow": o["wire_bytes_per_flow"],
        "conntrackd_wire_bytes_per_flow": c["wire_bytes_per_flow"],
        "wire_bytes_per_flow_counter": o["counter_bytes_per_flow_a"],
        "conntrackd_wire_bytes_per_flow_counter": c["counter_bytes_per_flow_a"],
        "ack_bytes_per_flow": o["counter_bytes_per_flow_b"],
        "conntrackd_ack_bytes_per_flow": c["counter_bytes_per_flow_b"],
        "cpu_us_per_flow_a": o["cpu_us_per_flow_a"],
        "cpu_us_per_flow_b": o["cpu_us_per_flow_b"],
        "conntrackd_cpu_us_per_flow_a": c["cpu_us_per_flow_a"],
        "conntrackd_cpu_us_per_flow_b": c["cpu_us_per_flow_b"],
        "missing_at_5pct_loss": los[OURS]["missing"],
        "conntrackd_missing_at_5pct_loss": los[REF]["missing"],
        "extra_at_5pct_loss": los[OURS].get("extra", math.nan),
        "differing_at_5pct_loss": los[OURS].get("differing", math.nan),
        "settle_s_at_5pct_loss": los[OURS]["settle_s"],
        "dropped_at_5pct_loss": los[OURS]["dropped"],
        "conntrackd_dropped_at_5pct_loss": los[REF]["dropped"],
        "not_replicated_sync_port_flows": o["filtered_sync_port"],
        "n": float(big),
    }
    profile_dir = os.environ.get("BENCH_PROFILE")
    if profile_dir:  # after the figures, so the profiler never perturbs them
        os.makedirs(profile_dir, exist_ok=True)
        say(f"profiling conntrackd-py at N={big:,} with py-spy into {profile_dir}")
        throughput(OURS, big, profile_dir)
        for node in ("A", "B"):
            summarize_profile(os.path.join(profile_dir, f"{OURS}-{node}-{big}.txt"))
    say(f"suite done in {time.monotonic() - t_suite:.0f} s")
    return {k: float(v) for k, v in f.items()}
