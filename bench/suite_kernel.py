"""Suite `kernel`: event ingest, dump, commit and cache memory, against the real kernel.

client -> fw -> server namespaces; a child process sends one UDP packet per flow (the fastest
realistic generator here) while the tracker runs in this process, as the daemon would.
  ingest (NEW)      time from the first to the last NEW event while N flows are created
  ingest (DESTROY)  `conntrack -F` of N flows: the kernel emits the DESTROYs as fast as it can
  lost events       N minus the events received (the overrun counter says why)
  dump              Table.dump of N entries into Flows
  commit            N dumped flows into a fresh namespace's table (batched creates)
"""

from __future__ import annotations

import argparse
import os
import time

import trio

from conntrackd_py.kernel.codec import EventType
from conntrackd_py.kernel.table import Table
from conntrackd_py.tracker import Tracker
from lab import Lab, firewall_topology
from lab.bench import create_flows, flush_flows, time_events


async def _kernel(n: int) -> dict[str, float]:
    figs: dict[str, float] = {}
    with Lab("ctbench") as lab:
        topo = firewall_topology(lab)
        fresh = lab.netns("fresh")
        fresh.nft("table inet t {\n chain f { type filter hook forward priority 0; "
                  "ct state established accept; }\n}\n")
        fw = topo.fw
        fw.sysctl("net.netfilter.nf_conntrack_udp_timeout", 600)
        tracker = Tracker(netns_name=fw.name)
        first, last = time_events(tracker)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(tracker.run)
                st = tracker.events.stats
                kernel_n = await create_flows(topo, tracker, n)
                new_s = last[EventType.NEW] - first[EventType.NEW]
                figs["flows_created"] = float(kernel_n)
                figs["ingest_new_events_per_s"] = st.new / new_s if new_s else 0.0
                figs["ingest_new_lost_events"] = float(kernel_n - st.new)

                table = Table(fw.name)
                t0 = time.perf_counter()
                flows = await table.dump()
                dump_s = time.perf_counter() - t0
                figs["dump_entries_per_s"] = len(flows) / dump_s
                table.close()

                fresh_table = Table(fresh.name)
                res = await fresh_table.commit(flows)
                figs["commit_flows_per_s"] = res.created / res.seconds
                figs["commit_failed"] = float(res.failed)
                fresh_table.close()

                got = await flush_flows(fw, tracker, kernel_n)
                d_s = last[EventType.DESTROY] - first[EventType.DESTROY]
                figs["ingest_destroy_events_per_s"] = got / d_s if d_s else 0.0
                figs["ingest_lost_events"] = float(kernel_n - got) + figs["ingest_new_lost_events"]
                figs["ingest_events_per_s"] = min(figs["ingest_destroy_events_per_s"],
                                                  figs["ingest_new_events_per_s"])
                figs["overruns"] = float(st.overruns)
                figs["cache_after_flush"] = float(len(tracker.cache))
                nursery.cancel_scope.cancel()
        finally:
            tracker.close()
    return figs


def run(args: argparse.Namespace) -> dict[str, float]:
    if os.geteuid() != 0:
        raise SystemExit("the kernel suite needs root (network namespaces)")
    figs = trio.run(_kernel, args.n)
    import cache_mem
    mem = cache_mem.measure(args.cache_n)
    figs["cache_bytes_per_flow"] = float(mem["internal_bytes_per_flow"])
    figs.update({f"cache_{k}": float(v) for k, v in mem.items()
                 if isinstance(v, (int, float)) and k != "internal_bytes_per_flow"})
    return figs
