"""Suite `accounting`: what flow accounting costs the event path.

Same lab and generator as the kernel suite (client -> fw -> server, one UDP packet per flow from
a child process). Each measurement creates N flows with the tracker running, then destroys them
all with `conntrack -F`, which makes the kernel emit N DESTROY events as fast as it can: the
events that carry the counters and produce the accounting records.

  without  the daemon's defaults: nf_conntrack_acct and nf_conntrack_timestamp off, no
           accounting (the DESTROY events carry no counters)
  kernel   both sysctls on, accounting off: what the kernel's counters and timestamps cost any
           listener (bigger events to build, copy and decode), before our accounting runs
  with     accounting on as the daemon turns it on (both sysctls set before the flows exist,
           so every flow has counters), default settings (JSON lines, buffer 50000) writing to
           a file on this machine's disk, by the writer process

Ingest rate = DESTROY events received / the time from the first to the last DESTROY batch.
`cost_fraction` is 1 - with/without; `cost_fraction_ours` is 1 - with/kernel, the share of our
accounting code (totals, top talkers, the hand-over to the writer process). The modes
alternate, `--repeat` times each; figures are medians (with min and max). Records
lost = flows destroyed minus records written, once the writer has drained (it includes the
records dropped because the buffer was full).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import trio

from conntrackd_py.accounting import Accounting, enable_kernel_accounting
from conntrackd_py.config import Accounting as AccountingConfig
from conntrackd_py.kernel.codec import EventType
from conntrackd_py.tracker import Tracker
from lab import Lab, firewall_topology
from lab.bench import create_flows, flush_flows, time_events

MODES = ("without", "kernel", "with")


async def _once(n: int, mode: str, workdir: str) -> dict[str, float]:
    with Lab("ctacct") as lab:
        topo = firewall_topology(lab)
        fw = topo.fw
        fw.sysctl("net.netfilter.nf_conntrack_udp_timeout", 600)
        acc: Accounting | None = None
        if mode != "without":
            enable_kernel_accounting(fw.name)
        if mode == "with":
            path = os.path.join(workdir, f"acct-{time.monotonic_ns()}.jsonl")
            acc = Accounting(AccountingConfig(enabled=True, file=path))
        tracker = Tracker(netns_name=fw.name, rcvbuf=64 << 20,
                          on_flow_event=acc.on_flow_event if acc else None)
        first, last = time_events(tracker)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(tracker.run)
                if acc is not None:
                    await nursery.start(acc.writer)
                st = tracker.events.stats
                kernel_n = await create_flows(topo, tracker, n, settle=0.3)
                got = await flush_flows(fw, tracker, kernel_n)
                window = last[EventType.DESTROY] - first[EventType.DESTROY]
                figs = {"flows": float(kernel_n), "destroy_events": float(got),
                        "events_per_s": got / window if window else 0.0,
                        "overruns": float(st.overruns)}
                if acc is not None:
                    with trio.move_on_after(30):
                        await acc.settled()
                    figs["records_written"] = float(acc.records_written)
                    figs["records_dropped"] = float(acc.records_dropped)
                    figs["records_lost"] = float(kernel_n - acc.records_written)
                nursery.cancel_scope.cancel()
        finally:
            tracker.close()
    return figs


def _median_range(name: str, values: list[float], figs: dict[str, float]) -> None:
    figs[name] = statistics.median(values)
    figs[f"{name}_min"] = min(values)
    figs[f"{name}_max"] = max(values)


async def _accounting(n: int, repeat: int) -> dict[str, float]:
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="ctpy-acct-") as workdir:
        for i in range(repeat):
            for mode in MODES:
                r = await _once(n, mode, workdir)
                runs[mode].append(r)
                print(f"  run {i + 1}/{repeat} {mode:<8}: {r['events_per_s']:,.0f} DESTROY "
                      f"events/s, {r['destroy_events']:,.0f}/{r['flows']:,.0f} events"
                      + (f", {r['records_lost']:,.0f} records lost" if mode == "with" else ""),
                      flush=True)
    figs: dict[str, float] = {}
    for mode in MODES:
        _median_range(f"events_per_s_{mode}", [r["events_per_s"] for r in runs[mode]], figs)
    figs["cost_fraction"] = 1 - figs["events_per_s_with"] / figs["events_per_s_without"]
    figs["cost_fraction_ours"] = 1 - figs["events_per_s_with"] / figs["events_per_s_kernel"]
    figs["records_lost"] = max(r["records_lost"] for r in runs["with"])
    figs["records_dropped"] = max(r["records_dropped"] for r in runs["with"])
    figs["events_lost"] = max(r["flows"] - r["destroy_events"]
                              for rs in runs.values() for r in rs)
    figs["flows"] = min(r["flows"] for rs in runs.values() for r in rs)
    return figs


def run(args: argparse.Namespace) -> dict[str, float]:
    if os.geteuid() != 0:
        raise SystemExit("the accounting suite needs root (network namespaces)")
    return trio.run(_accounting, args.n, max(args.repeat, 3) if args.repeat == 1 else args.repeat)
