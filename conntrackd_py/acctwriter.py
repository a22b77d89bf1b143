"""The accounting writer: a child process that formats and writes accounting records.

The daemon's event path only counts and hands records over (`accounting.Accounting`); the
formatting (~10 µs a record in Python) and the disk run here, on another CPU and outside the
daemon's GIL, so a burst of DESTROY events or a stalled disk never slows event ingestion.

Parent -> child (stdin), a msgpack stream of
    [flow, seen]               a record: a Flow as msgpack packs a NamedTuple (nested arrays),
                               and the Unix time its event was seen (the end time when the
                               kernel gives no timestamps)
    1                          reopen the file now (SIGHUP after a rotation)
Child -> parent (stdout), a msgpack stream:
    [0, n]                     n records written (by at least one sink)
    [1, n, "why"]              n records lost: every sink failed them (a file write error: the
                               file is reopened next time), or they were malformed
    [2, "text"]                something to log at info level
    [3, "text"]                the file was reopened (counted, and logged at info level)
    [4, sink, written, lost]   one sink's share of a batch: "file", "syslog", or
                               "ipfix <address>:<port>" (one per collector)

Sinks, any number at once: the file and/or syslog (`Sink`, formatted lines) and IPFIX over UDP
to each configured collector (`IpfixSink`, encoded by `ipfix`). argv: path, format, syslog
(0/1), priority, and the IPFIX options as JSON ("" when off).

The file survives log rotation: besides the explicit reopen, the path's inode is checked at
most once a second before a write, and the file reopened when it was moved or deleted.
This module must not import trio: it is the whole child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

import msgpack

from .flow import Counters, Flow, TcpState, Tuple, addr_text, proto_name
from .ipfix import Exporter, parse_collector
from .netns import socket_in

#: report kinds (child -> parent)
WRITTEN, LOST, INFO, REOPENED, SINK = 0, 1, 2, 3, 4
#: (flow, time seen) pairs, as the sinks take them
Records = Sequence[tuple[Flow, float]]
#: seconds between checks that the output file is still where the path says
STAT_INTERVAL = 1.0
#: nice values of the writer's `stats.accounting.writer_priority` (idle: SCHED_IDLE): the
#: writer yields the CPU to the daemon, replication and event ingestion first, records after,
#: from the bounded buffer that absorbs a burst
NICE = {"low": 10, "normal": 0}


def set_priority(priority: str) -> None:
    """Lower this process's claim on the CPU (`idle`, `low` or `normal`)."""
    with contextlib.suppress(OSError):
        if priority == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        elif NICE.get(priority):
            os.nice(NICE[priority])

_TCP_STATE_NAMES = {s.value: s.name for s in TcpState}


# --- formatting ---------------------------------------------------------------------------------

def _addr_port(addr: bytes, port: int) -> str:
    ip = addr_text(addr)
    if not port:
        return ip
    return f"[{ip}]:{port}" if len(addr) == 16 else f"{ip}:{port}"


def _fields(flow: Flow, end_fallback: float) -> tuple[Any, ...]:
    """The record's values, in RECORD_KEYS order.

    Times are Unix seconds. The kernel gives start/stop only with nf_conntrack_timestamp on;
    without it `end` is when the event was seen and `start`/`duration` are None.
    """
    c = flow.counters
    start = flow.start_ns / 1e9 if flow.start_ns else None
    end = flow.stop_ns / 1e9 if flow.stop_ns else end_fallback
    state: str | None = None
    st = flow.state
    if st is not None:
        state = _TCP_STATE_NAMES.get(st, str(st)) if flow.orig.proto == 6 else str(st)
    snat, dnat = flow.snat_to, flow.dnat_to
    return (flow.orig.format(), flow.reply.format(), proto_name(flow.orig.proto), state,
            _addr_port(*snat) if snat else None, _addr_port(*dnat) if dnat else None,
            flow.mark, flow.zone,
            c[0] if c else 0, c[1] if c else 0, c[2] if c else 0, c[3] if c else 0,
            start, end, None if start is None else round(max(0.0, end - start), 6))


RECORD_KEYS = ("orig", "reply", "proto", "state", "snat", "dnat", "mark", "zone",
               "orig_packets", "orig_bytes", "reply_packets", "reply_bytes",
               "start", "end", "duration")


def record(flow: Flow, end_fallback: float) -> dict[str, Any]:
    """The accounting record of a destroyed flow (JSON-ready)."""
    return dict(zip(RECORD_KEYS, _fields(flow, end_fallback), strict=True))


def _js(v: str | None) -> str:
    return "null" if v is None else f'"{v}"'


def _jf(v: float | None) -> str:
    return "null" if v is None else repr(v)


def json_line(flow: Flow, end_fallback: float) -> str:
    """`json.dumps(record(...))` without the dict and the generic encoder (2x faster): every
    string in a record is an address, a number or a fixed name, so nothing needs escaping
    (tested against json.dumps)."""
    (orig, reply, proto, state, snat, dnat, mark, zone, op, ob, rp, rb, start, end,
     duration) = _fields(flow, end_fallback)
    return (f'{{"orig":"{orig}","reply":"{reply}","proto":"{proto}","state":{_js(state)},'
            f'"snat":{_js(snat)},"dnat":{_js(dnat)},"mark":{mark},"zone":{zone},'
            f'"orig_packets":{op},"orig_bytes":{ob},"reply_packets":{rp},"reply_bytes":{rb},'
            f'"start":{_jf(start)},"end":{_jf(end)},"duration":{_jf(duration)}}}')


def text_line(flow: Flow, end_fallback: float) -> str:
    """conntrackd's stats-log style: `[date]\\t<conntrack -L line> delta-time=N`."""
    end = flow.stop_ns / 1e9 if flow.stop_ns else end_fallback
    delta = f" delta-time={round(end - flow.start_ns / 1e9)}" if flow.start_ns else ""
    return f"[{time.ctime(end)}]\t{flow.format()}{delta}"


FORMATTERS = {"json": json_line, "text": text_line}

# Flow field positions of the nested NamedTuples (msgpack sends them as plain arrays)
_MASTER = Flow._fields.index("master")
_COUNTERS = Flow._fields.index("counters")
_FLOW_FIELDS = len(Flow._fields)


_new = tuple.__new__  # NamedTuples without their Python-level __new__ (all fields given)


def flow_from_wire(a: Any) -> Flow:
    """A Flow back from the arrays msgpack made of it (the daemon packed a whole Flow, so
    every field is there, in order)."""
    if len(a) != _FLOW_FIELDS:
        raise ValueError(f"a record of {len(a)} fields, not {_FLOW_FIELDS}")
    f = list(a)
    f[0] = _new(Tuple, f[0])
    f[1] = _new(Tuple, f[1])
    if f[_MASTER] is not None:
        f[_MASTER] = _new(Tuple, f[_MASTER])
    if f[_COUNTERS] is not None:
        f[_COUNTERS] = _new(Counters, f[_COUNTERS])
    return _new(Flow, f)


# --- the sink -----------------------------------------------------------------------------------

class Sink:
    """The output file (reopened after rotation) and/or syslog."""

    def __init__(self, path: str | None, fmt: str, use_syslog: bool,
                 say: Any = lambda kind, text: None) -> None:
        self.path, self.format, self.use_syslog, self.say = path, FORMATTERS[fmt], use_syslog, say
        self.file: IO[str] | None = None
        self.ino: tuple[int, int] | None = None
        self.last_stat = 0.0
        self.syslog_open = False

    def open(self) -> None:
        assert self.path is not None
        reopen = self.file is not None
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self.say(INFO, f"closing accounting file {self.path}: {e}")
        self.file = None
        f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open across calls)
        st = os.fstat(f.fileno())
        self.file, self.ino = f, (st.st_dev, st.st_ino)
        if reopen:
            self.say(REOPENED, f"reopened accounting file {self.path}")

    def _moved(self) -> bool:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self.ino

    @property
    def name(self) -> str:
        return "file" if self.path is not None else "syslog"

    def write(self, records: Records) -> None:
        """Format and write records; raises OSError."""
        fmt = self.format
        lines = [fmt(flow, seen) for flow, seen in records]
        if not lines:
            return
        if self.path is not None:
            now = time.monotonic()
            check = now - self.last_stat >= STAT_INTERVAL
            if check:
                self.last_stat = now
            if self.file is None or (check and self._moved()):
                self.open()
            assert self.file is not None
            self.file.write("\n".join(lines) + "\n")
            self.file.flush()
        if self.use_syslog:
            import syslog
            if not self.syslog_open:
                syslog.openlog("conntrackd-py", 0, syslog.LOG_DAEMON)
                self.syslog_open = True
            for line in lines:
                syslog.syslog(syslog.LOG_INFO, line)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class IpfixSink:
    """IPFIX over UDP: one exporting process (sequence numbers, template refresh) whose
    messages go to every collector. A message a collector's send fails is lost for that
    collector only (counted per collector); the socket blocks when its buffer is full, so the
    local queue slows the writer down rather than dropping (the daemon's buffer absorbs it).
    """

    def __init__(self, collectors: Sequence[str], domain: int, *, mtu: int = 1400,
                 template_refresh: float = 600.0, template_refresh_packets: int = 0,
                 netns: str | None = None, clock: Callable[[], float] = time.time,
                 say: Any = lambda *msg: None) -> None:
        self.targets = [parse_collector(c) for c in collectors]
        self.names = [f"ipfix {h}:{p}" if ":" not in h else f"ipfix [{h}]:{p}"
                      for h, p in self.targets]
        self.exporter = Exporter(domain, mtu=mtu, template_refresh=template_refresh,
                                 template_refresh_packets=template_refresh_packets)
        self.netns, self.clock, self.say = netns, clock, say
        self.socks: dict[int, socket.socket] = {}
        self._errors: set[tuple[str, int | None]] = set()  # (collector, errno) said once

    def _sock(self, family: int) -> socket.socket:
        s = self.socks.get(family)
        if s is None:
            s = self.socks[family] = socket_in(self.netns, family, socket.SOCK_DGRAM)
        return s

    def write(self, records: Sequence[tuple[Any, float]]) -> list[tuple[str, int, int]]:
        """Send the records (Flows or their msgpack arrays, and the time seen) to every
        collector: (name, records sent, records lost) each; a record that does not encode
        is lost for all."""
        msgs = self.exporter.encode(records, self.clock())
        total = sum(m.records for m in msgs)
        unencoded = len(records) - total
        out = []
        for name, (host, port) in zip(self.names, self.targets, strict=True):
            lost = 0
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            for m in msgs:
                try:
                    self._sock(family).sendto(m.data, (host, port))
                except OSError as e:
                    lost += m.records
                    if (name, e.errno) not in self._errors:  # once per collector and cause
                        self._errors.add((name, e.errno))
                        self.say(INFO, f"accounting: cannot send IPFIX to {name[6:]}: {e}")
            out.append((name, total - lost, lost + unencoded))
        return out

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()


def _shaped(a: Any) -> Any:
    """The flow's arrays as they came, once their length is a Flow's (ValueError if not)."""
    if len(a) != _FLOW_FIELDS:
        raise ValueError(f"a record of {len(a)} fields, not {_FLOW_FIELDS}")
    return a


def serve(inp: int, out: IO[bytes], *sinks: Sink | IpfixSink) -> None:
    """Read requests from fd `inp` until EOF, answering on `out`."""
    pack = msgpack.Packer().pack

    def report(*msg: Any) -> None:
        out.write(pack(list(msg)))
        out.flush()

    for sink in sinks:
        sink.say = report
    unpacker = msgpack.Unpacker(use_list=False, raw=False)
    files = [s for s in sinks if isinstance(s, Sink)]

    def flush(batch: list[Any]) -> None:
        records: list[tuple[Any, float]] = []
        bad = 0
        # the formatters need Flows; the IPFIX encoder reads the arrays as they are (a third
        # of its cost was building the NamedTuples)
        parse = flow_from_wire if files else _shaped
        for rec in batch:
            try:
                a, seen = rec
                records.append((parse(a), float(seen)))
            except (ValueError, TypeError):  # not what the daemon packs: never expected
                bad += 1
        if bad:
            report(LOST, bad, f"dropped {bad} malformed accounting records")
        n = len(records)
        if not n:
            return
        lost_everywhere = n
        why = ""
        for sink in sinks:
            if isinstance(sink, IpfixSink):
                for name, sent, lost in sink.write(records):
                    report(SINK, name, sent, lost)
                    lost_everywhere = min(lost_everywhere, lost)
                    why = why or f"cannot send {lost} accounting records to {name}"
                continue
            try:
                sink.write(records)
            except OSError as e:
                sink.file = None  # a fresh open next time
                report(SINK, sink.name, 0, n)
                why = f"cannot write {n} accounting records to {sink.path}: {e}"
                continue
            report(SINK, sink.name, n, 0)
            lost_everywhere = 0
        if lost_everywhere:
            report(LOST, lost_everywhere, why)
        if n > lost_everywhere:
            report(WRITTEN, n - lost_everywhere)

    while data := os.read(inp, 1 << 20):
        unpacker.feed(data)
        batch: list[Any] = []
        for msg in unpacker:
            if not isinstance(msg, int):
                batch.append(msg)
                continue
            if batch:  # records before the reopen go to the old file
                flush(batch)
                batch = []
            for sink in files:
                if sink.path is None:
                    continue
                try:
                    sink.open()
                except OSError as e:
                    sink.file = None
                    report(INFO, f"cannot reopen accounting file {sink.path}: {e}")
        if batch:
            flush(batch)
    for sink in sinks:
        sink.close()


def sinks_from_argv(argv: list[str]) -> list[Sink | IpfixSink]:
    """The sinks the daemon asked for (see the module docstring for argv)."""
    path, fmt, use_syslog = argv[0] or None, argv[1], argv[2] == "1"
    sinks: list[Sink | IpfixSink] = []
    if path is not None or use_syslog:
        sinks.append(Sink(path, fmt, use_syslog))
    opts = json.loads(argv[4]) if len(argv) > 4 and argv[4] else None
    if opts and opts.get("collectors"):
        sinks.append(IpfixSink(
            opts["collectors"], int(opts.get("domain", 0)), mtu=int(opts.get("mtu", 1400)),
            template_refresh=float(opts.get("template_refresh", 600.0)),
            template_refresh_packets=int(opts.get("template_refresh_packets", 0)),
            netns=opts.get("netns")))
    return sinks


def main(argv: list[str]) -> int:
    # the daemon handles the signals; a terminal's ^C or a HUP to the group must not kill this
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    set_priority(argv[3] if len(argv) > 3 else "normal")
    serve(sys.stdin.fileno(), sys.stdout.buffer, *sinks_from_argv(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
