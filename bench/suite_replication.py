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

import abc
import argparse
import collections
import contextlib
import functools
import math
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conntrackd_py.netns import socket_in
from lab import (
    FIRST_SPORT,
    SYNC_GROUP,
    Conntrackd,
    DaemonProc,
    Lab,
    Netns,
    add_sync_loss,
    cluster_topology,
    udp_flows_popen,
)

PORT = 3780
KEY = bytes(range(32))  # conntrackd-py runs authenticated (its recommended setup)
SMALL_N = 10_000
LOSS_N = 10_000
LAT_FLOWS, LAT_RATE, LAT_SPORT, LAT_DPORT = 300, 100.0, 20_000, 5000
POLL = 0.02
SO_TIMESTAMPNS = 35  # asm-generic; the socket module lacks the name
CLK_TCK = os.sysconf("SC_CLK_TCK")
OURS, REF = "conntrackd-py", "conntrackd"


def say(msg: str) -> None:
    print(f"[replication {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
    after = cpu_busy()
    (b0, t0), (b1, t1) = before[cpu], after[cpu]
    return (b1 - b0) / (t1 - t0) if t1 > t0 else math.nan


def sync_port_flows(n: int) -> int:
    """How many of `udp_flows_popen`'s first n flows use the sync port as a port (flow i has
    source port FIRST_SPORT + i % 64512 and destination port 5000 + i // 64512)."""
    first = PORT - FIRST_SPORT
    return 0 if first < 0 or n <= first else 1 + (n - 1 - first) // (65536 - FIRST_SPORT)


def pin(pid: int, cpu: int) -> None:
    subprocess.run(["taskset", "-a", "-pc", str(cpu), str(pid)], check=True,
                   capture_output=True, timeout=10)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# --- the two daemons behind one interface ---------------------------------------------------

class Node(abc.ABC):
    kind: str
    pid: int

    @abc.abstractmethod
    def external(self) -> int: ...

    @abc.abstractmethod
    def internal(self) -> int: ...

    @abc.abstractmethod
    def bytes_sent(self) -> int: ...

    @abc.abstractmethod
    def ready(self) -> bool: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class OursNode(Node):
    kind = OURS

    def __init__(self, ns: Netns, workdir: str, node: int, sync_ip: str) -> None:
        self.d = DaemonProc(ns, workdir, node, sync_ip, key=KEY)
        assert self.d.proc is not None
        self.pid = self.d.proc.pid  # `ip netns exec` execs the daemon: same pid

    def external(self) -> int:
        return int(self.d.stats("cache")["cache"]["external"])

    def internal(self) -> int:
        return int(self.d.stats("cache")["cache"]["internal"])

    def bytes_sent(self) -> int:
        return int(self.d.stats("sync")["sync"]["counters"]["bytes_sent"])

    def ready(self) -> bool:
        peers = self.d.stats("sync")["sync"]["peers"]
        return bool(peers) and all(p["up"] for p in peers.values()) and bool(
            self.d.call("in_sync")["in_sync"])

    def sync_counters(self) -> dict[str, int]:
        return dict(self.d.stats("sync")["sync"]["counters"])

    def stop(self) -> None:
        self.d.stop()


class RefNode(Node):
    """The real conntrackd, asked through its UNIX socket directly (the request is one native
    int; spawning `conntrackd -s` per poll would cost ~10 ms of CPU each time)."""

    kind = REF
    STATS, STATS_CACHE = 21, 29  # conntrackd.h: "-s" and "-s cache"

    def __init__(self, ns: Netns, workdir: str, node: int, sync_ip: str) -> None:
        self.c = Conntrackd(ns, workdir, sync_ip)
        self.ctl = os.path.join(workdir, "conntrackd.ctl")
        self.pid = self.c.proc.pid

    def _ask(self, code: int) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.ctl)
            s.sendall(struct.pack("=i", code))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def _objects(self, which: str) -> int:
        m = re.search(rf"cache:{which}\s+active objects:\s+(\d+)", self._ask(self.STATS_CACHE))
        return int(m.group(1)) if m else 0

    def external(self) -> int:
        return self._objects("external")

    def internal(self) -> int:
        return self._objects("internal")

    def bytes_sent(self) -> int:
        m = re.search(r"(\d+) Bytes sent", self._ask(self.STATS))
        return int(m.group(1)) if m else 0

    def ready(self) -> bool:
        return True  # no peer state to ask for; callers wait past an alive interval

    def stop(self) -> None:
        self.c.stop()


def start_pair(kind: str, topo: Any, workdir: str) -> tuple[Node, Node]:
    cls = OursNode if kind == OURS else RefNode
    a = cls(topo.fws[0], os.path.join(workdir, "a"), 1, topo.sync_ip(1))
    b = cls(topo.fws[1], os.path.join(workdir, "b"), 2, topo.sync_ip(2))
    pin(a.pid, 0)
    pin(b.pid, 1)
    return a, b


def wait_ready(a: Node, b: Node, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    if a.kind == REF:
        time.sleep(1.5)  # past conntrackd's 1 s alive interval
        return
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if a.ready() and b.ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{a.kind}: the two nodes did not see each other in {limit} s")


# --- a listener on the sync link, in B's namespace ------------------------------------------

class SyncTap:
    """Receives a copy of every sync datagram arriving in `ns` (a socket bound to the same
    port with SO_REUSEADDR, joined to the group). Counts bytes per sender; with `keep` it keeps
    (kernel receive time in ns, payload) for the latency match."""

    def __init__(self, ns: Netns, local_ip: str, keep: bool = False) -> None:
        s = socket_in(ns.name, socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(PermissionError):
            s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        s.bind(("", PORT))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                     socket.inet_aton(SYNC_GROUP) + socket.inet_aton(local_ip))
        if keep:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.settimeout(0.2)
        self.sock, self.keep = s, keep
        self.lock = threading.Lock()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.datagrams: collections.Counter[str] = collections.Counter()
        self.kept: list[tuple[int, str, bytes]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        s = self.sock
        while not self._stop.is_set():
            try:
                if self.keep:
                    data, anc, _fl, addr = s.recvmsg(65535, 256)
                    ts = time.time_ns()
                    for _lvl, typ, cd in anc:
                        if typ == SO_TIMESTAMPNS and len(cd) >= 16:
                            sec, nsec = struct.unpack_from("qq", cd)
                            ts = sec * 1_000_000_000 + nsec
                    self.kept.append((ts, addr[0], data))
                else:
                    data, addr = s.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.bytes[addr[0]] += len(data)
                self.datagrams[addr[0]] += 1

    def snapshot(self, src: str) -> tuple[int, int]:
        with self.lock:
            return self.bytes[src], self.datagrams[src]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


# --- throughput, CPU and wire bytes --------------------------------------------------------

def _gen_reader(gen: subprocess.Popen[str], out: dict[str, float]) -> None:
    assert gen.stdout is not None
    line = gen.stdout.readline()
    out["t_line"] = time.monotonic()
    parts = line.split()
    if len(parts) == 2:
        out["sent"], out["seconds"] = float(parts[0]), float(parts[1])


class Profiler:
    """py-spy record on a pid, writing collapsed stacks (only with BENCH_PROFILE=DIR)."""

    def __init__(self, pid: int, out: str) -> None:
        spy = Path(sys.executable).with_name("py-spy")
        self.out = out
        self.proc = subprocess.Popen([str(spy), "record", "-p", str(pid), "-o", out, "-f",
                                      "raw", "-r", "200", "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


After = Callable[[Any, "Node", "Node", int], dict[str, float]]


def throughput(kind: str, n: int, profile_dir: str | None = None,
               after: After | None = None) -> dict[str, float]:
    """N flows replicated A -> B; `after(topo, a, b, flows_in_b)` then measures more in the same
    lab while B holds them (its figures are merged into the result)."""
    with Lab("ctrb") as lab, tempfile.TemporaryDirectory(prefix="ctrb") as tmp:
        topo = cluster_topology(lab, n_fw=2)
        for fw in topo.fws:  # nothing may expire during a run
            fw.sysctl("net.netfilter.nf_conntrack_udp_timeout", 600)
        a, b = start_pair(kind, topo, tmp)
        tap = SyncTap(topo.fws[1], topo.sync_ip(2))
        try:
            # resolve the client's and A's neighbours first: a burst into an unresolved
            # neighbour overflows its queue and some flows would never exist
            topo.client.ping(topo.server_ip)
            wait_ready(a, b)
            time.sleep(0.3)
            base = b.external()
            kernel0 = topo.fws[0].conntrack_count()
            # conntrackd-py ignores every UDP flow with the sync port as either port (its
            # sync-link filter matches the port alone), so those flows never reach B
            skipped = sync_port_flows(n) if kind == OURS else 0
            target = base + n - skipped
            a_ip = topo.sync_ip(1)
            bytes0, dgrams0 = tap.snapshot(a_ip)
            sent0_a, sent0_b = a.bytes_sent(), b.bytes_sent()
            cpu0_a, cpu0_b = cpu_seconds(a.pid), cpu_seconds(b.pid)
            rss0_a, rss0_b = rss_bytes(a.pid), rss_bytes(b.pid)
            machine0 = cpu_busy()
            profs = ([Profiler(a.pid, os.path.join(profile_dir, f"{kind}-A-{n}.txt")),
                      Profiler(b.pid, os.path.join(profile_dir, f"{kind}-B-{n}.txt"))]
                     if profile_dir else [])
            t_start = time.monotonic()
            gen = udp_flows_popen(topo.client, topo.server_ip, n, max_seconds=60)
            pin(gen.pid, 0)
            gout: dict[str, float] = {}
            reader = threading.Thread(target=_gen_reader, args=(gen, gout), daemon=True)
            reader.start()
            deadline = t_start + 30 + n / 2000  # 80 s at 100k: far past any sane rate
            got, t_done, counted = base, math.nan, False
            while time.monotonic() < deadline:
                if "t_line" in gout and not counted:
                    counted = True
                    # the flows A's kernel really holds (a datagram can still be dropped)
                    created = topo.fws[0].conntrack_count() - kernel0
                    target = base + min(n, created) - skipped
                got = b.external()
                if got >= target:
                    t_done = time.monotonic()
                    break
                time.sleep(POLL)
            wall = time.monotonic() - t_start
            cpu_a, cpu_b = cpu_seconds(a.pid) - cpu0_a, cpu_seconds(b.pid) - cpu0_b
            busy0, busy1 = busy_share(machine0, 0), busy_share(machine0, 1)
            bytes1, dgrams1 = tap.snapshot(a_ip)
            sent_a, sent_b = a.bytes_sent() - sent0_a, b.bytes_sent() - sent0_b
            for p in profs:
                p.stop()
            gen.wait(10)
            reader.join(5)
            a_internal = a.internal()
            created = topo.fws[0].conntrack_count() - kernel0
            rss_a, rss_b = rss_bytes(a.pid) - rss0_a, rss_bytes(b.pid) - rss0_b
            more = after(topo, a, b, got - base) if after is not None else {}
        finally:
            tap.close()
        # the generator's own clock says how long before its exit its first packet left
        t_first = gout["t_line"] - gout["seconds"] if "seconds" in gout else t_start
        t_gen_end = gout.get("t_line", t_start)
        done = not math.isnan(t_done)
        secs = (t_done if done else time.monotonic()) - t_first
        flows = target - base if done else got - base
        r = {
            "flows_per_s": flows / secs if secs > 0 else 0.0,
            "seconds": secs,
            "complete": 1.0 if done else 0.0,
            "tail_s": (t_done - t_gen_end) if done else math.nan,
            "replicated": float(got - base),
            "generator_flows_per_s": gout.get("sent", 0) / gout["seconds"]
            if gout.get("seconds") else 0.0,
            "a_internal": float(a_internal),
            "created": float(created),
            "filtered_sync_port": float(skipped),
            "cpu_us_per_flow_a": cpu_a / n * 1e6,
            "cpu_us_per_flow_b": cpu_b / n * 1e6,
            "cpu0_busy": busy0,
            "cpu1_busy": busy1,
            "wire_bytes_per_flow": (bytes1 - bytes0) / n,
            "wire_datagrams": float(dgrams1 - dgrams0),
            "counter_bytes_per_flow_a": sent_a / n,
            "counter_bytes_per_flow_b": sent_b / n,
            "rss_bytes_per_flow_a": rss_a / n,
            "rss_bytes_per_flow_b": rss_b / n,
            **more,
        }
        say(f"{kind:<13} N={n:>7,}: {created:,} flows made"
            + (f" ({skipped} on port {PORT}: not replicated)" if skipped else "")
            + f", {'all' if done else 'ONLY'} "
            f"{got - base:,} in B after "
            f"{secs:.3f} s ({r['tail_s']:.3f} s after the last packet) -> "
            f"{r['flows_per_s']:,.0f} flows/s (generator "
            f"{r['generator_flows_per_s']:,.0f}/s, poll wall {wall:.2f} s); CPU A "
            f"{r['cpu_us_per_flow_a']:.1f} B {r['cpu_us_per_flow_b']:.1f} us/flow (CPU0 "
            f"{100 * busy0:.0f}% CPU1 {100 * busy1:.0f}% busy); wire "
            f"{r['wire_bytes_per_flow']:.1f} B/flow in {dgrams1 - dgrams0:,} datagrams "
            f"(counters A {r['counter_bytes_per_flow_a']:.1f}, B->A "
            f"{r['counter_bytes_per_flow_b']:.1f})")
        return r


# --- latency --------------------------------------------------------------------------------

def _ours_sports(data: bytes) -> list[int]:
    from conntrackd_py.flow import unpack_key
    from conntrackd_py.sync import wire
    try:
        dg = wire.decode_untrusted(data, [KEY])
    except wire.BadDatagram:
        return []
    out = []
    for m in dg.messages:
        if isinstance(m, tuple) and m[1] is not None:
            with contextlib.suppress(Exception):
                _zone, orig = unpack_key(m[0])
                if orig.dport == LAT_DPORT:
                    out.append(orig.sport)
    return out


_NTA_PORT = re.compile(rb"\x00\x08\x00\x03(..)(..)", re.DOTALL)  # netattr len 8, NTA_PORT


def _ref_sports(data: bytes) -> list[int]:
    """conntrackd's messages carry the original ports as attribute NTA_PORT (len 8, type 3,
    sport and dport in network order)."""
    out = []
    for m in _NTA_PORT.finditer(data):
        if struct.unpack("!H", m.group(2))[0] == LAT_DPORT:
            out.append(struct.unpack("!H", m.group(1))[0])
    return out


class Watcher:
    """conntrackd-py's `watch` stream on B: when each external update was applied."""

    def __init__(self, d: DaemonProc) -> None:
        from conntrackd_py.ctlclient import ControlClient
        self.client = ControlClient(d.socket, timeout=None)
        self.seen: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(0.2)  # the server registers the watcher when it reads the request

    def _run(self) -> None:
        pat = re.compile(r"\[UPDATE\] external .*? sport=(\d+) dport=" + str(LAT_DPORT))
        with contextlib.suppress(Exception):
            for line in self.client.stream("watch"):
                now = time.time_ns()
                m = pat.search(str(line))
                if m:
                    self.seen.setdefault(int(m.group(1)), now)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.client.sock.shutdown(socket.SHUT_RDWR)
        self.client.close()
        self.thread.join(2)


def latency(kind: str) -> dict[str, float]:
    with Lab("ctrl") as lab, tempfile.TemporaryDirectory(prefix="ctrl") as tmp:
        topo = cluster_topology(lab, n_fw=2)
        a, b = start_pair(kind, topo, tmp)
        tap = SyncTap(topo.fws[1], topo.sync_ip(2), keep=True)
        watcher = Watcher(b.d) if isinstance(b, OursNode) else None
        socks = []
        try:
            wait_ready(a, b)
            for i in range(LAT_FLOWS + 3):
                s = socket_in(topo.client.name, socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("", LAT_SPORT - 3 + i))
                socks.append(s)
            dst = (topo.server_ip, LAT_DPORT)
            for s in socks[:3]:  # warm-up: ARP for the VIP and the server
                s.sendto(b"ctpy", dst)
            time.sleep(0.5)
            sent: dict[int, int] = {}
            t0 = time.monotonic()
            for i, s in enumerate(socks[3:]):
                delay = t0 + i / LAT_RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent[LAT_SPORT + i] = time.time_ns()
                s.sendto(b"ctpy", dst)
            time.sleep(1.0)
        finally:
            tap.close()
            if watcher is not None:
                watcher.close()
            for s in socks:
                s.close()
        a_ip = topo.sync_ip(1)
        sports = _ours_sports if kind == OURS else _ref_sports
        arrived: dict[int, int] = {}
        for ts, src, data in tap.kept:
            if src == a_ip:
                for sp in sports(data):
                    if sp in sent and sp not in arrived:
                        arrived[sp] = ts
        lat = [(arrived[sp] - t) / 1e6 for sp, t in sent.items() if sp in arrived]
        r = {"p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
             "max_ms": max(lat, default=math.nan),
             "mean_ms": statistics.fmean(lat) if lat else math.nan,
             "missing": float(len(sent) - len(lat))}
        msg = (f"{kind:<13} latency over {len(lat)}/{len(sent)} flows at {LAT_RATE:.0f}/s: "
               f"p50 {r['p50_ms']:.3f} p90 {r['p90_ms']:.3f} p99 {r['p99_ms']:.3f} "
               f"max {r['max_ms']:.3f} ms "
               "(client sendto -> datagram in B's namespace)")
        if watcher is not None:
            app = [(watcher.seen[sp] - t) / 1e6 for sp, t in sent.items() if sp in watcher.seen]
            r["applied_p50_ms"], r["applied_p99_ms"] = pct(app, 50), pct(app, 99)
            msg += (f"; applied in B's cache: p50 {r['applied_p50_ms']:.3f} p99 "
                    f"{r['applied_p99_ms']:.3f} ms over {len(app)} flows")
        say(msg)
        return r


# --- loss -------------------------------------------------------------------------------------

def _raw(d: DaemonProc, cache: str, origin: int | None = None) -> dict[str, str]:
    return {k: v for _o, k, v in d.call("dump", cache=cache, origin=origin, raw=True)}


def _loss_drops(fw: Netns) -> int:
    """Packets the `add_sync_loss` rule dropped in `fw` (its counter)."""
    out = fw.run("nft", "list", "table", "inet", "ctpy_loss").stdout
    m = re.search(r"counter packets (\d+)", out)
    return int(m.group(1)) if m else 0


def loss(kind: str, n: int = LOSS_N, percent: int = 5, settle: float = 40.0) -> dict[str, float]:
    with Lab("ctrs") as lab, tempfile.TemporaryDirectory(prefix="ctrs") as tmp:
        topo = cluster_topology(lab, n_fw=2)
        for fw in topo.fws:
            fw.sysctl("net.netfilter.nf_conntrack_udp_timeout", 600)
            add_sync_loss(fw, PORT, percent)
        a, b = start_pair(kind, topo, tmp)  # no waiting: the loss starts with the daemons
        gen = udp_flows_popen(topo.client, topo.server_ip, n, max_seconds=30)
        pin(gen.pid, 0)
        gen.communicate(timeout=40)
        t0 = time.monotonic()
        deadline = t0 + settle
        r: dict[str, float] = {}
        if isinstance(a, OursNode) and isinstance(b, OursNode):
            ia: dict[str, str] = {}
            eb: dict[str, str] = {}
            while time.monotonic() < deadline:
                ia, eb = _raw(a.d, "internal"), _raw(b.d, "external", 1)
                if len(ia) >= n and ia == eb:
                    break
                time.sleep(0.5)
            missing = len(ia.keys() - eb.keys())
            r = {"missing": float(missing), "extra": float(len(eb.keys() - ia.keys())),
                 "differing": float(sum(1 for k in ia.keys() & eb.keys() if ia[k] != eb[k])),
                 "a_internal": float(len(ia))}
            c = a.sync_counters()
            r["nacks"] = float(c["nacks_received"])
            r["resyncs"] = float(c["resyncs_sent"])
            r["retransmitted"] = float(c["retransmitted"])
        else:
            last, stable_since = (-1, -1), time.monotonic()
            ia_n = eb_n = 0
            while time.monotonic() < deadline:
                ia_n, eb_n = a.internal(), b.external()
                now = time.monotonic()
                if (ia_n, eb_n) != last:
                    last, stable_since = (ia_n, eb_n), now
                if ia_n >= n and (eb_n == ia_n or now - stable_since > 5):
                    break
                time.sleep(0.5)
            r = {"missing": float(ia_n - eb_n), "a_internal": float(ia_n)}
        r["settle_s"] = time.monotonic() - t0
        r["dropped"] = float(sum(_loss_drops(fw) for fw in topo.fws))
        say(f"{kind:<13} {percent}% loss from the start, N={n:,}: {r['missing']:.0f} of "
            f"A's {r['a_internal']:.0f} flows missing in B after {r['settle_s']:.1f} s; "
            f"{r['dropped']:.0f} sync datagrams dropped"
            + (f" (extra {r['extra']:.0f}, differing {r['differing']:.0f}; A got "
               f"{r['nacks']:.0f} NACKs, sent {r['resyncs']:.0f} resyncs)" if "extra" in r
               else ""))
        return r


# --- profile summary --------------------------------------------------------------------------

def summarize_profile(path: str, top: int = 12) -> None:
    """Self and inclusive sample shares from py-spy's collapsed stacks."""
    if not os.path.exists(path):
        say(f"no profile at {path}")
        return
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            c = int(count)
            frames = stack.split(";")
            total += c
            own[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    if not total:
        return
    say(f"profile {os.path.basename(path)}: {total} samples; top self:")
    for fr, c in own.most_common(top):
        print(f"    {100 * c / total:5.1f}%  {fr}")
    say("top inclusive:")
    for fr, c in incl.most_common(top + 8)[:top + 8]:
        print(f"    {100 * c / total:5.1f}%  {fr}")


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
