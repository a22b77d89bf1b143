"""What the benchmark suites share: a pair of sync daemons (ours or the reference) behind one
interface, CPU pinning, CPU/RSS probes, and the kernel suites' flow load with event timing.

This module owns only measurement plumbing around the lab: it starts daemons through
`lab.daemons` and flows through `lab.traffic`, in namespaces a `Lab` made. It must not print
figures of its own (the suites do) nor touch anything outside those namespaces.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import time
from collections.abc import Callable, Sequence

import trio

from conntrackd_py.kernel.codec import EventType
from conntrackd_py.kernel.events import EventBatch
from conntrackd_py.tracker import Tracker

from .daemons import Conntrackd, DaemonProc, SyncDaemon
from .netns import Netns
from .topology import ClusterTopology, FirewallTopology
from .traffic import udp_flows_popen

OURS, REF = DaemonProc.kind, Conntrackd.kind
#: the key conntrackd-py runs with in the benchmarks (authenticated, as production requires);
#: fixed so a tap on the sync link can decode what it captures
KEY = bytes(range(32))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(suite: str, msg: str) -> None:
    print(f"[{suite} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- processes and CPUs ------------------------------------------------------------------------

def pin(pid: int, cpu: int) -> None:
    """Pin every thread of `pid` to `cpu`."""
    subprocess.run(["taskset", "-a", "-pc", str(cpu), str(pid)], check=True,
                   capture_output=True, timeout=10)


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy() -> dict[int, tuple[int, int]]:
    """Per CPU (busy, total) jiffies from /proc/stat (busy: all but idle and iowait)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                out[int(name[3:])] = (sum(v) - v[3] - v[4], sum(v))
    return out


def busy_share(before: dict[int, tuple[int, int]], cpu: int) -> float:
    """The share of time `cpu` was busy since the `cpu_busy()` snapshot `before`."""
    after = cpu_busy()
    (b0, t0), (b1, t1) = before[cpu], after[cpu]
    return (b1 - b0) / (t1 - t0) if t1 > t0 else math.nan


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# --- a pair of sync daemons --------------------------------------------------------------------

def start_node(kind: str, ns: Netns, workdir: str, node: int, sync_ip: str) -> SyncDaemon:
    """conntrackd-py (with KEY) or conntrackd as node `node` in `ns`."""
    if kind == OURS:
        return DaemonProc(ns, workdir, node, sync_ip, key=KEY)
    if kind == REF:
        return Conntrackd(ns, workdir, sync_ip)
    raise ValueError(f"unknown daemon kind {kind!r}")


def start_pair(kind: str, topo: ClusterTopology, workdir: str) -> tuple[SyncDaemon, SyncDaemon]:
    """Node A on fw1 pinned to CPU 0 and node B on fw2 pinned to CPU 1."""
    a = start_node(kind, topo.fws[0], os.path.join(workdir, "a"), 1, topo.sync_ip(1))
    b = start_node(kind, topo.fws[1], os.path.join(workdir, "b"), 2, topo.sync_ip(2))
    pin(a.pid, 0)
    pin(b.pid, 1)
    return a, b


def wait_ready(a: SyncDaemon, b: SyncDaemon, limit: float = 15.0) -> None:
    """Until both nodes see each other; conntrackd cannot say, so past its 1 s alive interval."""
    if a.kind == REF:
        time.sleep(1.5)
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if a.ready() and b.ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{a.kind}: the two nodes did not see each other in {limit} s")


# --- kernel load for the tracker suites --------------------------------------------------------

def time_events(tracker: Tracker) -> tuple[dict[EventType, float], dict[EventType, float]]:
    """Wrap `tracker.apply` to note when the first and the last batch of each event type
    arrived (perf_counter): the ingest window."""
    first: dict[EventType, float] = {}
    last: dict[EventType, float] = {}
    apply: Callable[[EventBatch], None] = tracker.apply

    def timed(batch: EventBatch) -> None:
        now = time.perf_counter()
        for kind in {k for k, _ in batch}:
            first.setdefault(kind, now)
            last[kind] = now
        apply(batch)

    tracker.apply = timed  # type: ignore[method-assign]
    return first, last


async def create_flows(topo: FirewallTopology, tracker: Tracker, n: int,
                       settle: float = 0.5) -> int:
    """N UDP flows through the firewall (generator in a child process); waits until the
    tracker saw their NEW events (or an overrun), then `settle`. Returns the flows the kernel
    holds."""
    st = tracker.events.stats
    gen = udp_flows_popen(topo.client, topo.server_ip, n, max_seconds=120)
    await trio.to_thread.run_sync(gen.wait)
    with trio.move_on_after(30):
        while st.new < n and st.overruns == 0:  # noqa: ASYNC110
            await trio.sleep(0.05)
    await trio.sleep(settle)
    return topo.fw.conntrack_count()


async def flush_flows(fw: Netns, tracker: Tracker, expected: int) -> int:
    """`conntrack -F`: the kernel emits a DESTROY per flow as fast as it can. Waits until the
    tracker saw `expected` of them (or an overrun); returns how many it saw."""
    st = tracker.events.stats
    before = st.destroy
    await trio.to_thread.run_sync(lambda: fw.run("conntrack", "-F"))
    with trio.move_on_after(30):
        while st.destroy - before < expected and st.overruns == 0:  # noqa: ASYNC110
            await trio.sleep(0.05)
    return st.destroy - before
