"""The replication measurements the benchmark suites share (`replication`, `compare`): flows/s,
CPU and wire bytes per flow from A to B, replication latency, and convergence under loss, for
conntrackd-py and the real conntrackd alike, each in a fresh lab.

The method is described in bench/README.md and bench/suite_replication.py. This module owns
the sync-link tap (a socket in B's namespace) and the profiler it may start; it must not
return figures it did not measure (NaN when a run did not complete).
"""

from __future__ import annotations

import collections
import contextlib
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

from conntrackd_py.netns import socket_in

from .bench import (
    KEY,
    OURS,
    busy_share,
    cpu_busy,
    cpu_seconds,
    pct,
    pin,
    rss_bytes,
    start_pair,
    wait_ready,
)
from .bench import say as _say
from .daemons import DaemonProc, SyncDaemon
from .netns import Lab, Netns
from .topology import SYNC_GROUP, ClusterTopology, add_sync_loss, cluster_topology
from .traffic import FIRST_SPORT, udp_flows_popen


def say(msg: str) -> None:
    _say("replication", msg)


PORT = 3780
SMALL_N = 10_000
LOSS_N = 10_000
LAT_FLOWS, LAT_RATE, LAT_SPORT, LAT_DPORT = 300, 100.0, 20_000, 5000
POLL = 0.02
SO_TIMESTAMPNS = 35  # asm-generic; the socket module lacks the name



def sync_port_flows(n: int) -> int:
    """How many of `udp_flows_popen`'s first n flows use the sync port as a port (flow i has
    source port FIRST_SPORT + i % 64512 and destination port 5000 + i // 64512)."""
    first = PORT - FIRST_SPORT
    return 0 if first < 0 or n <= first else 1 + (n - 1 - first) // (65536 - FIRST_SPORT)


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


#: `after(topo, a, b, flows_in_b)`: more measurements in the same lab while B holds the flows
After = Callable[[ClusterTopology, SyncDaemon, SyncDaemon, int], dict[str, float]]


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
            base = b.external_count()
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
                got = b.external_count()
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
            a_internal = a.internal_count()
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
        watcher = Watcher(b) if isinstance(b, DaemonProc) else None
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

def raw_dump(d: DaemonProc, cache: str, origin: int | None = None) -> dict[str, str]:
    return {k: v for _o, k, v in d.call("dump", cache=cache, origin=origin, raw=True)}


def loss_drops(fw: Netns) -> int:
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
        if isinstance(a, DaemonProc) and isinstance(b, DaemonProc):
            ia: dict[str, str] = {}
            eb: dict[str, str] = {}
            while time.monotonic() < deadline:
                ia, eb = raw_dump(a, "internal"), raw_dump(b, "external", 1)
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
                ia_n, eb_n = a.internal_count(), b.external_count()
                now = time.monotonic()
                if (ia_n, eb_n) != last:
                    last, stable_since = (ia_n, eb_n), now
                if ia_n >= n and (eb_n == ia_n or now - stable_since > 5):
                    break
                time.sleep(0.5)
            r = {"missing": float(ia_n - eb_n), "a_internal": float(ia_n)}
        r["settle_s"] = time.monotonic() - t0
        r["dropped"] = float(sum(loss_drops(fw) for fw in topo.fws))
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
