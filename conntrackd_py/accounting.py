"""Flow accounting: one record per destroyed flow, running totals and top talkers.

`Accounting.on_flow_event` is on the event path (the tracker calls it for every kernel event,
before filtering), so it only updates integers and packs the record into a bounded buffer.
The `writer` task hands the records in batches to a child process (`acctwriter`) that formats
and writes them, on another CPU and outside this process's GIL: a burst of DESTROY events or a
slow or full disk never slows event ingestion. When the buffer is full (the child or its disk
cannot keep up), new records are dropped and counted.

Sinks, any number at once: the file, syslog, and IPFIX collectors (`stats.accounting.ipfix`,
encoded and sent by the writer process: the event path costs the same with or without them).
Each sink's records written and lost are counted (`sinks`); `records_dropped` counts the
records no sink got (buffer full, writer died, or every sink failed them).

The output file survives log rotation: `reopen()` (called on SIGHUP) and the child's
once-a-second check of the path's inode (the file was moved or deleted) both reopen it.
Top talkers (bytes by source address) use a bounded Misra-Gries sketch, not a dict that grows
with every address.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable

import msgpack
import trio

from .acctwriter import INFO, LOST, REOPENED, SINK, WRITTEN, json_line, record, text_line
from .config import Accounting as AccountingConfig
from .flow import Flow, addr_text, proto_name
from .kernel import codec
from .kernel.nl import set_sysctl
from .stats import AccountingStats, Direction, ProtoTotals, SinkStats, TopTalker

__all__ = ["Accounting", "HeavyHitters", "enable_kernel_accounting", "json_line", "record",
           "text_line"]

log = logging.getLogger(__name__)

DESTROY = codec.EventType.DESTROY
#: how often the writer hands buffered records over when the buffer is not filling up
DRAIN_INTERVAL = 0.2
#: records buffered that wake the writer before DRAIN_INTERVAL (at most)
WAKE_BATCH = 2048
#: asks the writer process to reopen its file (any msgpack integer; records are arrays)
REOPEN = msgpack.packb(1)
#: seconds to wait before starting a writer process again after it died
RESTART_DELAY = 1.0
#: the pipe to the writer process; Linux allows up to /proc/sys/fs/pipe-max-size (1 MiB)
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
#: on shutdown, how long the last records may take to reach the disk
SHUTDOWN_GRACE = 2.0


class HeavyHitters:
    """Misra-Gries with batched decrements: at most 4k counters, each an under-estimate by at
    most `error` (<= total weight / (k+1)). A shrink (O(k log k)) runs at most once per 3k new
    keys, so an update costs O(1) amortized."""

    def __init__(self, k: int) -> None:
        self.k = max(1, k)
        self.counts: dict[bytes, int] = {}
        self.error = 0  # the sum of all decrements: the worst under-count of any key
        self.total = 0

    def add(self, key: bytes, weight: int) -> None:
        self.total += weight
        counts = self.counts
        v = counts.get(key)
        if v is not None:
            counts[key] = v + weight
            return
        counts[key] = weight
        if len(counts) > 4 * self.k:
            self._shrink()

    def _shrink(self) -> None:
        # subtract the (k+1)-th largest count from all: at most k counters stay positive
        m = heapq.nlargest(self.k + 1, self.counts.values())[-1]
        self.error += m
        self.counts = {key: v - m for key, v in self.counts.items() if v > m}

    def top(self, n: int) -> list[tuple[bytes, int]]:
        return sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)[:n]


def ipfix_options(cfg: AccountingConfig, node_id: int, netns_name: str | None
                  ) -> dict[str, object] | None:
    """The writer's IPFIX options from `stats.accounting.ipfix` (None: no collectors).
    Read with getattr: the section may be a dataclass or absent."""
    ipfix = getattr(cfg, "ipfix", None)
    collectors = list(getattr(ipfix, "collectors", None) or ())
    if not collectors:
        return None
    domain = getattr(ipfix, "observation_domain", None)
    return {"collectors": collectors,
            "domain": node_id if domain is None else int(domain),
            "mtu": int(getattr(ipfix, "mtu", 1400)),
            "template_refresh": float(getattr(ipfix, "template_refresh", 600.0)),
            "template_refresh_packets": int(getattr(ipfix, "template_refresh_packets", 0)),
            "netns": netns_name}


class Accounting:
    """`node_id` is the IPFIX observation domain unless the config names one; `netns_name`
    is where the IPFIX socket is made (tests and benches, whose process is outside the
    namespace; the daemon runs inside its own and passes None)."""

    def __init__(self, cfg: AccountingConfig, clock: Callable[[], float] = time.time, *,
                 node_id: int = 0, netns_name: str | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.capacity = cfg.buffer
        #: records packed for the writer process, not yet handed over (`_packer` holds them:
        #: compact bytes rather than live Flow objects the garbage collector would scan)
        self.buffered = 0
        self._packer = msgpack.Packer(autoreset=False)
        #: the writer is woken early when this many records are buffered: in a burst, batches
        #: of at most WAKE_BATCH records keep the writer busy while events still arrive (a
        #: batch is ~0.3 MB in the 1 MiB pipe) instead of a quarter of the buffer at once
        self.wake_at = max(1, min(self.capacity // 4, WAKE_BATCH))
        self.flows = 0
        self.records_dropped = 0
        self.records_written = 0
        #: handed to the writer process, not yet reported written or lost
        self.in_flight = 0
        self.write_errors = 0
        self.reopens = 0
        self.writer_restarts = 0
        #: proto number -> [flows, orig_packets, orig_bytes, reply_packets, reply_bytes]
        self.totals: dict[int, list[int]] = {}
        self.talkers = HeavyHitters(max(1, cfg.top_talkers) * 10)
        #: sink name -> [records written, records lost] ("file", "syslog", "ipfix <collector>")
        self.sinks: dict[str, list[int]] = {}
        self.path = cfg.file
        self.ipfix = ipfix_options(cfg, node_id, netns_name)
        self.outputs = self.path is not None or cfg.syslog or self.ipfix is not None
        self._reopen = False
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._unpacker = msgpack.Unpacker(use_list=False, raw=False)
        self.writer_pid: int | None = None

    # --- the event path ---------------------------------------------------------------------
    def on_flow_event(self, kind: codec.EventType, flow: Flow) -> None:
        if kind != DESTROY:
            return
        c = flow.counters
        if c is None:
            return
        self.flows += 1
        t = self.totals.get(flow.orig.proto)
        if t is None:
            t = self.totals[flow.orig.proto] = [0, 0, 0, 0, 0]
        t[0] += 1
        t[1] += c.orig_packets
        t[2] += c.orig_bytes
        t[3] += c.reply_packets
        t[4] += c.reply_bytes
        self.talkers.add(flow.orig.src, c.orig_bytes + c.reply_bytes)
        if not self.outputs:
            return
        n = self.buffered
        if n >= self.capacity:
            self.records_dropped += 1
            return
        self._packer.pack((flow, self.clock()))
        self.buffered = n + 1
        if n + 1 == self.wake_at:
            self._wake.set()

    # --- queries ------------------------------------------------------------------------------
    def snapshot(self) -> AccountingStats:
        totals = {
            proto_name(p): ProtoTotals(t[0], Direction(t[1], t[2]), Direction(t[3], t[4]))
            for p, t in sorted(self.totals.items())
        }
        top = [TopTalker(addr_text(k), v, self.talkers.error)
               for k, v in self.talkers.top(self.cfg.top_talkers)]
        return AccountingStats(
            flows=self.flows,
            packets=sum(t[1] + t[3] for t in self.totals.values()),
            bytes=sum(t[2] + t[4] for t in self.totals.values()),
            totals=totals, top_talkers=top,
            records_written=self.records_written, records_dropped=self.records_dropped,
            records_pending=self.buffered + self.in_flight, buffer=self.capacity,
            write_errors=self.write_errors, writer_restarts=self.writer_restarts,
            file=self.path, format=self.cfg.format,
            sinks={k: SinkStats(*v) for k, v in sorted(self.sinks.items())})

    # --- the writer ---------------------------------------------------------------------------
    def reopen(self) -> None:
        """Ask the writer to reopen the file (SIGHUP after a rotation)."""
        self._reopen = True
        self._wake.set()

    async def settled(self) -> None:
        """Wait until every record buffered so far was written or counted lost."""
        while self.buffered or self.in_flight:
            self._wake.set()
            await self._progress.wait()

    def _settle(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _on_reports(self, data: bytes | bytearray) -> None:
        self._unpacker.feed(data)
        for msg in self._unpacker:
            if msg[0] == WRITTEN:
                self.in_flight -= msg[1]
                self.records_written += msg[1]
            elif msg[0] == LOST:
                self.in_flight -= msg[1]
                self.records_dropped += msg[1]
                self.write_errors += 1
                log.warning("%s", msg[2])
            elif msg[0] == REOPENED:
                self.reopens += 1
                log.info("%s", msg[1])
            elif msg[0] == INFO:
                log.info("%s", msg[1])
            elif msg[0] == SINK:
                counts = self.sinks.get(msg[1])
                if counts is None:
                    counts = self.sinks[msg[1]] = [0, 0]
                if msg[3] and not counts[1]:
                    log.warning("accounting: sink %s lost %d records (counted from now on)",
                                msg[1], msg[3])
                counts[0] += msg[2]
                counts[1] += msg[3]
        self._settle()

    async def _reports(self, stream: trio.abc.ReceiveStream, done: trio.Event) -> None:
        try:
            async for data in stream:
                self._on_reports(data)
        finally:
            done.set()  # _shutdown reads the rest: one reader at a time
        raise trio.BrokenResourceError("the accounting writer process exited")

    def _take(self) -> bytes:
        """The buffered records, now in flight."""
        data: bytes = self._packer.bytes()
        self._packer.reset()
        self.in_flight += self.buffered
        self.buffered = 0
        return data

    async def _feed(self, stdin: trio.abc.SendStream) -> None:
        while True:
            if self._reopen:
                self._reopen = False
                await stdin.send_all(REOPEN)
            if not self.buffered:
                if not self.in_flight:
                    self._settle()
                with trio.move_on_after(DRAIN_INTERVAL):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            await stdin.send_all(self._take())

    async def _shutdown(self, proc: trio.Process, reports_done: trio.Event) -> None:
        """Last records out within SHUTDOWN_GRACE: a stalled disk must not hold up the stop."""
        assert proc.stdin is not None
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + SHUTDOWN_GRACE
            await reports_done.wait()  # the reports task is cancelled too: let it let go
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                if self.buffered:
                    await proc.stdin.send_all(self._take())
                await proc.stdin.aclose()
            assert proc.stdout is not None
            async for data in proc.stdout:  # the child's last reports, up to its exit
                self._on_reports(data)
            await proc.wait()
        lost = self.buffered
        if lost or self.in_flight:
            log.warning("accounting: %d records not written at shutdown",
                        lost + self.in_flight)
        self.records_dropped += lost
        self.buffered = 0
        self._packer.reset()

    async def _run_child(self, task_status: trio.TaskStatus[None]) -> None:
        """One writer process, fed until cancelled; raises if the process fails."""
        cmd = [sys.executable, "-m", "conntrackd_py.acctwriter", self.path or "",
               self.cfg.format, "1" if self.cfg.syslog else "0", self.cfg.writer_priority,
               json.dumps(self.ipfix) if self.ipfix else ""]
        proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE)
        self._unpacker = msgpack.Unpacker(use_list=False, raw=False)
        assert isinstance(proc.stdin, trio.lowlevel.FdStream)
        assert proc.stdout is not None
        self.writer_pid = proc.pid
        with contextlib.suppress(OSError):  # a bigger pipe absorbs bursts (~6000 records)
            fcntl.fcntl(proc.stdin.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        try:
            reports_done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reports, proc.stdout, reports_done)
                task_status.started()
                try:
                    await self._feed(proc.stdin)
                except trio.Cancelled:
                    await self._shutdown(proc, reports_done)
                    raise
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            if self.in_flight:
                log.error("accounting writer process exited with %s: %d records lost",
                          proc.returncode, self.in_flight)
            self.records_dropped += self.in_flight
            self.in_flight = 0
            self._settle()

    async def writer(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
        """Run the writer process and feed it until cancelled; start it again if it dies."""
        if not self.outputs:
            task_status.started()
            return
        while True:
            try:
                await self._run_child(task_status)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as eg:
                log.error("accounting writer process failed (%s); starting it again in %gs",
                          eg.exceptions[0], RESTART_DELAY)
            task_status = trio.TASK_STATUS_IGNORED
            self.writer_restarts += 1
            await trio.sleep(RESTART_DELAY)


def enable_kernel_accounting(netns_name: str | None) -> None:
    """Turn on per-flow counters and timestamps in the namespace (logged)."""
    for key in ("net.netfilter.nf_conntrack_acct", "net.netfilter.nf_conntrack_timestamp"):
        try:
            old = set_sysctl(key, 1, netns_name)
        except OSError as e:
            log.warning("cannot set %s=1 (%s): accounting records will lack %s", key, e,
                        "counters" if key.endswith("acct") else "timestamps")
            continue
        if old is None:
            log.warning("%s does not exist in this kernel", key)
        elif old != "1":
            log.info("flow accounting: set %s=1 (was %s)", key, old)
        else:
            log.info("flow accounting: %s is already 1", key)
