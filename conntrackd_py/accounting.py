"""Flow accounting: one record per destroyed flow, running totals and top talkers.

`Accounting.on_flow_event` is on the event path (the tracker calls it for every kernel event,
before filtering), so it only updates integers and appends the flow to a bounded deque; records
are formatted and written by the `writer` task, in a worker thread, so a slow or full disk
never blocks event ingestion. When the deque is full, new records are dropped and counted.

The output file survives log rotation: `reopen()` (called on SIGHUP) and a once-a-second
check of the path's inode (the file was moved or deleted) both make the writer reopen it.
Top talkers (bytes by source address) use a bounded Misra-Gries sketch, not a dict that grows
with every address.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

import trio

from .config import Accounting as AccountingConfig
from .flow import Flow, Proto, TcpState
from .kernel import codec
from .kernel.nl import set_sysctl

log = logging.getLogger(__name__)

DESTROY = codec.EventType.DESTROY
#: seconds between checks that the output file is still where the path says
STAT_INTERVAL = 1.0
#: how often the writer drains the buffer when idle
DRAIN_INTERVAL = 0.2

_PROTO_NAMES = {p.value: p.name.lower() for p in Proto}


def proto_name(p: int) -> str:
    return _PROTO_NAMES.get(p, str(p))


def _addr_port(addr: bytes, port: int) -> str:
    ip = ipaddress.ip_address(addr)
    if not port:
        return str(ip)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def record(flow: Flow, end_fallback: float) -> dict[str, Any]:
    """The accounting record of a destroyed flow (JSON-ready).

    Times are Unix seconds. The kernel gives start/stop only with nf_conntrack_timestamp on;
    without it `end` is when the event was seen and `start`/`duration` are None.
    """
    c = flow.counters
    start = flow.start_ns / 1e9 if flow.start_ns else None
    end = flow.stop_ns / 1e9 if flow.stop_ns else end_fallback
    state: str | None = None
    if flow.state is not None:
        if flow.orig.proto == Proto.TCP and flow.state in TcpState._value2member_map_:
            state = TcpState(flow.state).name
        else:
            state = str(flow.state)
    snat, dnat = flow.snat_to, flow.dnat_to
    return {
        "orig": flow.orig.format(),
        "reply": flow.reply.format(),
        "proto": proto_name(flow.orig.proto),
        "state": state,
        "snat": _addr_port(*snat) if snat else None,
        "dnat": _addr_port(*dnat) if dnat else None,
        "mark": flow.mark,
        "zone": flow.zone,
        "orig_packets": c.orig_packets if c else 0,
        "orig_bytes": c.orig_bytes if c else 0,
        "reply_packets": c.reply_packets if c else 0,
        "reply_bytes": c.reply_bytes if c else 0,
        "start": start,
        "end": end,
        "duration": None if start is None else round(max(0.0, end - start), 6),
    }


def text_line(flow: Flow, end_fallback: float) -> str:
    """conntrackd's stats-log style: `[date]\\t<conntrack -L line> delta-time=N`."""
    end = flow.stop_ns / 1e9 if flow.stop_ns else end_fallback
    delta = f" delta-time={round(end - flow.start_ns / 1e9)}" if flow.start_ns else ""
    return f"[{time.ctime(end)}]\t{flow.format()}{delta}"


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


class Accounting:
    def __init__(self, cfg: AccountingConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.capacity = cfg.buffer
        self.pending: deque[tuple[Flow, float]] = deque()
        self.flows = 0
        self.records_dropped = 0
        self.records_written = 0
        self.write_errors = 0
        self.reopens = 0
        #: proto number -> [flows, orig_packets, orig_bytes, reply_packets, reply_bytes]
        self.totals: dict[int, list[int]] = {}
        self.talkers = HeavyHitters(max(1, cfg.top_talkers) * 10)
        self.path = cfg.file
        self._file: TextIO | None = None
        self._ino: tuple[int, int] | None = None
        self._reopen = False
        self._last_stat = 0.0
        self._syslog = False

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
        if self.path is None and not self.cfg.syslog:
            return
        if len(self.pending) >= self.capacity:
            self.records_dropped += 1
            return
        self.pending.append((flow, self.clock()))

    # --- queries ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        totals = {
            proto_name(p): {"flows": t[0], "orig": {"packets": t[1], "bytes": t[2]},
                            "reply": {"packets": t[3], "bytes": t[4]}}
            for p, t in sorted(self.totals.items())
        }
        top = [{"source": str(ipaddress.ip_address(k)), "bytes": v,
                "max_undercount": self.talkers.error}
               for k, v in self.talkers.top(self.cfg.top_talkers)]
        return {
            "flows": self.flows,
            "packets": sum(t[1] + t[3] for t in self.totals.values()),
            "bytes": sum(t[2] + t[4] for t in self.totals.values()),
            "totals": totals,
            "top_talkers": top,
            "records_written": self.records_written,
            "records_dropped": self.records_dropped,
            "records_pending": len(self.pending),
            "buffer": self.capacity,
            "write_errors": self.write_errors,
            "file": self.path,
            "format": self.cfg.format,
        }

    # --- the writer ---------------------------------------------------------------------------
    def reopen(self) -> None:
        """Ask the writer to reopen the file (SIGHUP after a rotation)."""
        self._reopen = True

    def _format(self, batch: list[tuple[Flow, float]]) -> list[str]:
        if self.cfg.format == "text":
            return [text_line(f, t) for f, t in batch]
        return [json.dumps(record(f, t), separators=(",", ":")) for f, t in batch]

    def _open(self) -> None:
        assert self.path is not None
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                log.warning("closing accounting file %s: %s", self.path, e)
            self.reopens += 1
        self._file = None
        f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open across calls)
        st = os.fstat(f.fileno())
        self._file, self._ino = f, (st.st_dev, st.st_ino)

    def _moved(self) -> bool:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._ino

    def _write_blocking(self, lines: list[str], check: bool) -> None:
        """Runs in a worker thread: open/reopen as needed, write, flush."""
        if self.path is not None:
            if self._file is None or self._reopen or (check and self._moved()):
                self._reopen = False
                self._open()
            if lines:
                assert self._file is not None
                self._file.write("\n".join(lines) + "\n")
                self._file.flush()
        if self.cfg.syslog and lines:
            import syslog
            if not self._syslog:
                syslog.openlog("conntrackd-py", 0, syslog.LOG_DAEMON)
                self._syslog = True
            for line in lines:
                syslog.syslog(syslog.LOG_INFO, line)

    async def drain_once(self, abandon_on_cancel: bool = False) -> int:
        """Write everything buffered now; returns the number of records written."""
        batch: list[tuple[Flow, float]] = []
        q = self.pending
        while q:
            batch.append(q.popleft())
        now = time.monotonic()
        check = now - self._last_stat >= STAT_INTERVAL
        if check:
            self._last_stat = now
        if not batch and not check and not self._reopen:
            return 0
        lines = self._format(batch)
        try:
            await trio.to_thread.run_sync(self._write_blocking, lines, check,
                                          abandon_on_cancel=abandon_on_cancel)
        except OSError as e:
            self.write_errors += 1
            self.records_dropped += len(batch)
            log.warning("cannot write %d accounting records to %s: %s", len(batch), self.path,
                        e)
            self._file = None  # try a fresh open next time
            return 0
        self.records_written += len(batch)
        return len(batch)

    def close(self) -> None:
        """Close the file (the writer does this itself when it stops)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    async def writer(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
        """Drain the buffer to the file (and syslog) forever."""
        task_status.started()
        try:
            while True:
                await self.drain_once()
                await trio.sleep(DRAIN_INTERVAL)
        finally:
            # last records out, but a stalled disk must not hold up the shutdown
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 2.0
                await self.drain_once(abandon_on_cancel=True)
            if not scope.cancelled_caught:
                self.close()


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
