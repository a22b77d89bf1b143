"""Suite `ipfix`: IPFIX export of accounting records, side by side with ulogd2 on one burst.

Same lab and generator as the accounting suite (client -> fw -> server, one UDP packet per
flow). Both exporters run in the firewall namespace at the same time and get the same DESTROY
events from one `conntrack -F`:

  ours   the tracker + accounting (IPFIX sink only, default settings) in this process, the
         writer child process encoding and sending to server:4739
  ulogd  Debian's ulogd2: NFCT input (events only, DESTROY mask, 8 MiB socket buffer growing to
         64 MiB) stacked on the IPFIX output plugin (UDP), sending to server:4740

A receiver in the server namespace (a child process of this script) counts the data records
of each stream (set lengths over the record length its templates declare) and notes when the
last one arrived.

  records_per_s_X     records received / (last arrival - start of `conntrack -F`)
  cpu_us_per_record_X CPU (user + system) of the exporter over the burst / records received:
                      ours = this process (event ingestion, accounting) + the writer child;
                      ulogd = the ulogd process
  records_lost_X      flows destroyed - records received, after 3 s of quiet

The two exporters share the machine's CPUs during the burst, as they would on one firewall.
The writer runs at the default `writer_priority: idle` (SCHED_IDLE: it waits while the CPUs
are busy with the burst); CTPY_WRITER_PRIORITY=normal measures it at the ordinary priority,
where export keeps pace with event ingestion.
`--repeat` runs; figures are medians (with min and max).

Figures on the 2-core lab VM (2026-12-05, n=100000, --repeat 3, medians; other work running):
  priority   ours records/s  ours µs CPU/record  ours lost   ulogd2 records/s  µs/record  lost
  idle               7,995     46.3 (38.8 + 7.5)     33,617             48,044        6.8     4
  normal            17,418     34.2 (27.5 + 6.7)          0             57,823        9.4     4
(ours = event path + writer). Ours is bound by event ingestion (its last record leaves 0.06 s
after the last DESTROY event is read); at idle priority the writer waits out the burst and the
50000-record buffer overflows, as in the accounting suite. ulogd2 keeps the records of its last
unfilled message until it exits (4 here), then frees them ("flows have been lost").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from conntrackd_py.accounting import Accounting, enable_kernel_accounting
from conntrackd_py.config import Accounting as AccountingConfig
from conntrackd_py.config import Ipfix
from conntrackd_py.kernel.codec import EventType
from conntrackd_py.tracker import Tracker
from lab import Lab, firewall_topology, terminate
from lab.bench import cpu_seconds, create_flows, flush_flows, time_events

OURS_PORT, ULOGD_PORT = 4739, 4740
ULOGD_LIB = "/usr/lib/x86_64-linux-gnu/ulogd"
HERE = str(Path(__file__).resolve())
QUIET = 3.0  # seconds without a new record: the exporter is done
PRIORITY = os.environ.get("CTPY_WRITER_PRIORITY", "idle")

ULOGD_CONF = """[global]
logfile="{log}"
loglevel=5
plugin="{lib}/ulogd_inpflow_NFCT.so"
plugin="{lib}/ulogd_output_IPFIX.so"
stack=ct1:NFCT,ipfix1:IPFIX

[ct1]
hash_enable=0
event_mask=0x00000004
netlink_socket_buffer_size=8388608
netlink_socket_buffer_maxsize=67108864

[ipfix1]
oid=2
host="{host}"
port={port}
proto="udp"
send_template="always"
"""


# --- the receiver (a child process in the server namespace) -------------------------------------

def _count(msg: bytes, templates: dict[int, int]) -> int:
    """Data records in one IPFIX message; learns templates (fixed-length fields only)."""
    n, off, end = 0, 16, min(len(msg), struct.unpack_from("!H", msg, 2)[0])
    while off + 4 <= end:
        set_id, length = struct.unpack_from("!HH", msg, off)
        if length < 4:
            break
        body, stop = off + 4, min(off + length, end)
        if set_id == 2:
            p = body
            while p + 4 <= stop:
                tid, count = struct.unpack_from("!HH", msg, p)
                p += 4
                size = 0
                for _ in range(count):
                    ie, flen = struct.unpack_from("!HH", msg, p)
                    p += 8 if ie & 0x8000 else 4
                    size += flen
                templates[tid] = size
        elif set_id >= 256 and templates.get(set_id):
            n += (stop - body) // templates[set_id]
        off += length
    return n


def receive(ip: str, ports: list[int]) -> None:
    """Count records per port until stdin closes; print {port: figures} as JSON."""
    socks = {}
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: no loss here
        s.bind((ip, port))
        socks[s.fileno()] = (s, port)
    figs = {p: {"messages": 0, "records": 0, "first": 0.0, "last": 0.0} for p in ports}
    templates: dict[int, dict[int, int]] = {p: {} for p in ports}
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin, *socks], [], [])
        for fd in ready:
            if fd == stdin:
                if not os.read(stdin, 4096):
                    print(json.dumps(figs), flush=True)
                    return
                continue
            s, port = socks[fd]
            while True:
                try:
                    msg = s.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                f = figs[port]
                now = time.time()
                f["messages"] += 1
                n = _count(msg, templates[port])
                if n:
                    f["records"] += n
                    f["first"] = f["first"] or now
                    f["last"] = now


# --- the measurement ---------------------------------------------------------------------------

def _cfg(collector: str) -> AccountingConfig:
    return AccountingConfig(enabled=True, ipfix=Ipfix(collectors=(collector,)),
                            writer_priority=PRIORITY)


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _once(n: int, workdir: str) -> dict[str, float]:
    with Lab("ctipfx") as lab:
        topo = firewall_topology(lab)
        fw = topo.fw
        fw.sysctl("net.netfilter.nf_conntrack_udp_timeout", 600)
        enable_kernel_accounting(fw.name)
        recv = topo.server.popen(sys.executable, HERE, "receive",
                                 topo.server_ip, str(OURS_PORT), str(ULOGD_PORT),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert recv.stdout is not None
        if recv.stdout.readline().strip() != "ready":
            raise RuntimeError("the IPFIX receiver did not start")
        conf = os.path.join(workdir, f"ulogd-{time.monotonic_ns()}.conf")
        await trio.Path(conf).write_text(ULOGD_CONF.format(
            log=conf + ".log", lib=ULOGD_LIB, host=topo.server_ip, port=ULOGD_PORT))
        ulogd = fw.popen("ulogd", "-c", conf, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        acc = Accounting(_cfg(f"{topo.server_ip}:{OURS_PORT}"), node_id=1,
                         netns_name=fw.name)
        tracker = Tracker(netns_name=fw.name, rcvbuf=64 << 20, on_flow_event=acc.on_flow_event)
        _, last = time_events(tracker)
        figs: dict[str, float] = {}
        try:
            await trio.sleep(0.5)
            if ulogd.poll() is not None:
                raise RuntimeError(f"ulogd exited with {ulogd.returncode}; see {conf}.log")
            async with trio.open_nursery() as nursery:
                await nursery.start(tracker.run)
                await nursery.start(acc.writer)
                kernel_n = await create_flows(topo, tracker, n, settle=0.3)
                assert acc.writer_pid is not None
                cpu0 = (_self_cpu(), cpu_seconds(acc.writer_pid), cpu_seconds(ulogd.pid))
                t0, p0 = time.time(), time.perf_counter()
                got = await flush_flows(fw, tracker, kernel_n)
                destroyed = last[EventType.DESTROY] - p0
                with trio.move_on_after(60):
                    await acc.settled()
                main_cpu = _self_cpu() - cpu0[0]
                writer_cpu = cpu_seconds(acc.writer_pid) - cpu0[1]
                ours_cpu = main_cpu + writer_cpu
                await trio.sleep(QUIET)
                ulogd_cpu = cpu_seconds(ulogd.pid) - cpu0[2]
                nursery.cancel_scope.cancel()
        finally:
            tracker.close()
            terminate(ulogd, 5)
            out, _ = recv.communicate("", timeout=10)
        res = json.loads(out.strip().splitlines()[-1])
        figs = {"flows": float(kernel_n), "destroy_events": float(got),
                "last_destroy_event_s": destroyed,
                "overruns": float(tracker.events.stats.overruns)}
        for name, port, cpu in (("ours", OURS_PORT, ours_cpu), ("ulogd", ULOGD_PORT, ulogd_cpu)):
            r = res[str(port)]
            recs = r["records"]
            window = r["last"] - t0
            figs[f"records_{name}"] = float(recs)
            figs[f"records_per_s_{name}"] = recs / window if recs and window > 0 else 0.0
            figs[f"cpu_us_per_record_{name}"] = cpu / recs * 1e6 if recs else float("nan")
            figs[f"records_lost_{name}"] = float(max(0, kernel_n - recs))
            figs[f"first_record_s_{name}"] = r["first"] - t0 if recs else float("nan")
            figs[f"last_record_s_{name}"] = window
        figs["sink_lost_ours"] = float(sum(v[1] for v in acc.sinks.values()))
        if recs := res[str(OURS_PORT)]["records"]:
            figs["cpu_us_per_record_ours_event_path"] = main_cpu / recs * 1e6
            figs["cpu_us_per_record_ours_writer"] = writer_cpu / recs * 1e6
    return figs


async def _ipfix(n: int, repeat: int) -> dict[str, float]:
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="ctpy-ipfix-") as workdir:
        os.chmod(workdir, 0o755)
        for i in range(repeat):
            r = await _once(n, workdir)
            runs.append(r)
            print(f"  run {i + 1}/{repeat}: {r['flows']:,.0f} flows; ours "
                  f"{r['records_per_s_ours']:,.0f} records/s, "
                  f"{r['cpu_us_per_record_ours']:.1f} µs CPU/record, "
                  f"{r['records_lost_ours']:,.0f} lost; ulogd2 "
                  f"{r['records_per_s_ulogd']:,.0f} records/s, "
                  f"{r['cpu_us_per_record_ulogd']:.1f} µs CPU/record, "
                  f"{r['records_lost_ulogd']:,.0f} lost", flush=True)
    figs: dict[str, float] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        figs[key] = statistics.median(values)
        if key.startswith(("records_per_s", "cpu_us")):
            figs[f"{key}_min"], figs[f"{key}_max"] = min(values), max(values)
    for key in ("records_lost_ours", "records_lost_ulogd", "sink_lost_ours", "overruns"):
        figs[key] = max(r[key] for r in runs)
    return figs


def run(args: argparse.Namespace) -> dict[str, float]:
    if os.geteuid() != 0:
        raise SystemExit("the ipfix suite needs root (network namespaces)")
    if not os.path.exists(f"{ULOGD_LIB}/ulogd_output_IPFIX.so"):
        raise SystemExit("the ipfix suite needs Debian's ulogd2 (NFCT input, IPFIX output)")
    return trio.run(_ipfix, args.n, args.repeat)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "receive":
    receive(sys.argv[2], [int(p) for p in sys.argv[3:]])
