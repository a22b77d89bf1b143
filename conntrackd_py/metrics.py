"""Prometheus metrics: a collector over the daemon's stats() and a tiny trio HTTP responder.

The collector reads a callable returning the daemon's `stats(None)` dict (with the accounting
snapshot under "accounting", if any) at scrape time, so nothing on the event path knows about
Prometheus. The exposition text is made by prometheus_client; the HTTP server is ours (trio
sockets, HTTP/1.0, `GET /metrics` only) rather than the library's threaded one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

P = "conntrackd_py_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _n(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else float(bool(v))


class StatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]],
                 wall: Callable[[], float] = time.time) -> None:
        self.stats = stats
        self.wall = wall

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield from self._runtime(s.get("runtime"))
        yield from self._cache(s.get("cache"))
        yield from self._sync(s.get("sync"))
        yield from self._link(s.get("link"))
        yield from self._direct(s.get("direct"))
        yield from self._accounting(s.get("accounting"))

    def _runtime(self, r: dict[str, Any] | None) -> Iterator[Metric]:
        if not r:
            return
        yield GaugeMetricFamily(P + "uptime_seconds", "Seconds since the daemon started.",
                                value=_n(r.get("uptime_s", 0)))
        yield GaugeMetricFamily(P + "in_sync", "1 when every peer has acknowledged all our "
                                "updates and nothing is pending.", value=_n(r.get("in_sync")))
        yield CounterMetricFamily(P + "commits", "Commits of the external cache to the kernel.",
                                  value=_n(r.get("commits", 0)))
        last = r.get("last_commit") or {}
        yield GaugeMetricFamily(P + "last_commit_duration_seconds",
                                "Duration of the last commit.", value=_n(last.get("seconds", 0)))
        yield GaugeMetricFamily(P + "last_commit_failed_flows",
                                "Flows the last commit could not write.",
                                value=_n(last.get("failed", 0)))

    def _cache(self, c: dict[str, Any] | None) -> Iterator[Metric]:
        if not c:
            return
        g = GaugeMetricFamily(P + "cache_flows", "Flows in each cache.", labels=["cache"])
        g.add_metric(["internal"], _n(c.get("internal", 0)))
        g.add_metric(["external"], _n(c.get("external", 0)))
        yield g
        g = GaugeMetricFamily(P + "external_cache_flows", "External-cache flows by origin node.",
                              labels=["node"])
        for node, n in (c.get("external_by_node") or {}).items():
            g.add_metric([str(node)], _n(n))
        yield g
        yield CounterMetricFamily(P + "external_undecodable", "Peers' entries that did not "
                                  "describe a flow, skipped by a commit.",
                                  value=_n(c.get("external_undecodable", 0)))
        ev = c.get("kernel_events")
        if ev:
            m = CounterMetricFamily(P + "kernel_events", "ctnetlink events read, by type.",
                                    labels=["type"])
            for t in ("new", "update", "destroy"):
                m.add_metric([t], _n(ev.get(t, 0)))
            yield m
            yield CounterMetricFamily(P + "netlink_overruns", "Event socket overruns (ENOBUFS).",
                                      value=_n(ev.get("overruns", 0)))
            yield CounterMetricFamily(P + "netlink_malformed",
                                      "Event messages that did not decode.",
                                      value=_n(ev.get("malformed", 0)))
        tr = c.get("tracker")
        if tr:
            yield CounterMetricFamily(P + "kernel_dumps", "Full dumps of the kernel table.",
                                      value=_n(tr.get("dumps", 0)))
            yield CounterMetricFamily(P + "reconciles", "Reconciliations of the internal cache "
                                      "with a kernel dump (start, overruns, requests).",
                                      value=_n(tr.get("reconciles", 0)))
            yield GaugeMetricFamily(P + "last_dump_duration_seconds",
                                    "Duration of the last kernel dump.",
                                    value=_n(tr.get("last_dump_seconds", 0)))
            yield CounterMetricFamily(P + "ignored_events", "Events dropped by the filters.",
                                      value=_n(tr.get("ignored", 0)))

    def _sync(self, s: dict[str, Any] | None) -> Iterator[Metric]:
        if not s:
            return
        c = s.get("counters") or {}

        def directed(name: str, doc: str, sent: str, received: str) -> Metric:
            m = CounterMetricFamily(P + name, doc, labels=["direction"])
            m.add_metric(["sent"], _n(c.get(sent, 0)))
            m.add_metric(["received"], _n(c.get(received, 0)))
            return m

        yield directed("sync_datagrams", "Sync datagrams.", "datagrams_sent",
                       "datagrams_received")
        yield directed("sync_bytes", "Sync bytes.", "bytes_sent", "bytes_received")
        yield directed("sync_flows", "Flow messages (new datagrams only when sent).",
                       "flows_sent", "flows_received")
        yield directed("sync_acks", "Acknowledgements.", "acks_sent", "acks_received")
        yield directed("sync_nacks", "Negative acknowledgements.", "nacks_sent",
                       "nacks_received")
        yield directed("sync_resyncs", "Full resyncs (sent: started; received: completed).",
                       "resyncs_sent", "resyncs_received")
        for key, doc in (("retransmitted", "Datagrams retransmitted."),
                         ("lost", "Datagrams given up as lost."),
                         ("replayed", "Datagrams already delivered (duplicates, replays)."),
                         ("reorder_dropped", "Out-of-order datagrams beyond the window."),
                         ("evicted", "Resend-queue entries dropped unacknowledged."),
                         ("expired", "Remote flows expired by the alarm timeout."),
                         ("resyncs_aborted", "Received resyncs cut short."),
                         ("peer_restarts", "Peer restarts seen (new epoch)."),
                         ("oversize", "Flows too big for any datagram, never sent.")):
            yield CounterMetricFamily(P + "sync_" + key, doc, value=_n(c.get(key, 0)))
        rej = CounterMetricFamily(P + "sync_rejected", "Datagrams refused, by reason.",
                                  labels=["reason"])
        reasons = dict(s.get("rejected") or {})
        for key in ("stale_epoch", "unknown_node"):
            reasons.setdefault(key, c.get(key, 0))
        for reason, n in sorted(reasons.items()):
            rej.add_metric([str(reason)], _n(n))
        yield rej
        yield GaugeMetricFamily(P + "resend_queue_depth", "Datagrams awaiting acknowledgement.",
                                value=_n(c.get("resend_queue_depth", 0)))
        yield GaugeMetricFamily(P + "resend_queue_bytes", "Bytes awaiting acknowledgement.",
                                value=_n(s.get("resend_queue_bytes", 0)))
        rs = s.get("resync") or {}
        yield GaugeMetricFamily(P + "resync_active", "1 while we are sending a full resync.",
                                value=_n(rs.get("active")))
        peers = s.get("peers") or {}
        up = GaugeMetricFamily(P + "peer_up", "1 when the peer is alive.", labels=["node"])
        seen = GaugeMetricFamily(P + "peer_last_seen_seconds",
                                 "Unix time of the last datagram from the peer.",
                                 labels=["node"])
        silent = GaugeMetricFamily(P + "peer_silence_seconds",
                                   "Seconds since the last datagram from the peer.",
                                   labels=["node"])
        lag = GaugeMetricFamily(P + "peer_replication_lag_datagrams",
                                "Our datagrams the peer has not acknowledged yet.",
                                labels=["node"])
        now = self.wall()
        for node, p in sorted(peers.items()):
            up.add_metric([str(node)], _n(p.get("up")))
            silence = float(p.get("silent_s", 0.0))
            seen.add_metric([str(node)], now - silence)
            silent.add_metric([str(node)], silence)
            if p.get("lag") is not None:
                lag.add_metric([str(node)], _n(p["lag"]))
        yield from (up, seen, silent, lag)

    def _link(self, link: dict[str, Any] | None) -> Iterator[Metric]:
        if not link:
            return
        yield CounterMetricFamily(P + "link_switches", "Switches of the active sync channel.",
                                  value=_n(link.get("switches", 0)))
        up = GaugeMetricFamily(P + "link_up", "1 when the channel's link is up.",
                               labels=["channel"])
        active = GaugeMetricFamily(P + "link_active", "1 for the channel in use.",
                                   labels=["channel"])
        dg = CounterMetricFamily(P + "link_datagrams", "Datagrams on the channel.",
                                 labels=["channel", "direction"])
        err = CounterMetricFamily(P + "link_send_errors", "Send errors on the channel.",
                                  labels=["channel"])
        for ch in link.get("channels") or []:
            name = str(ch.get("channel"))
            up.add_metric([name], _n(ch.get("up")))
            active.add_metric([name], float(name == link.get("active")))
            dg.add_metric([name, "sent"], _n(ch.get("sent", 0)))
            dg.add_metric([name, "received"], _n(ch.get("received", 0)))
            err.add_metric([name], _n(ch.get("send_errors", 0)))
        yield from (up, active, dg, err)

    def _direct(self, d: dict[str, Any] | None) -> Iterator[Metric]:
        if not d:
            return
        m = CounterMetricFamily(P + "direct_writes", "Kernel writes of remote flows "
                                "(external cache off), by result.", labels=["result"])
        for k, v in sorted(d.items()):
            m.add_metric([k], _n(v))
        yield m

    def _accounting(self, a: dict[str, Any] | None) -> Iterator[Metric]:
        if not a:
            return
        flows = CounterMetricFamily(P + "accounting_flows", "Destroyed flows accounted.",
                                    labels=["proto"])
        pk = CounterMetricFamily(P + "accounting_packets", "Packets of destroyed flows.",
                                 labels=["proto", "direction"])
        by = CounterMetricFamily(P + "accounting_bytes", "Bytes of destroyed flows.",
                                 labels=["proto", "direction"])
        for proto, t in sorted((a.get("totals") or {}).items()):
            flows.add_metric([proto], _n(t["flows"]))
            for d in ("orig", "reply"):
                pk.add_metric([proto, d], _n(t[d]["packets"]))
                by.add_metric([proto, d], _n(t[d]["bytes"]))
        yield from (flows, pk, by)
        for family, key, doc in (
                (CounterMetricFamily, "records_written", "Accounting records written."),
                (CounterMetricFamily, "records_dropped",
                 "Accounting records dropped (buffer full or write error)."),
                (GaugeMetricFamily, "records_pending",
                 "Accounting records buffered, not yet written."),
                (CounterMetricFamily, "write_errors",
                 "Batches of accounting records the writer could not write."),
                (CounterMetricFamily, "writer_restarts",
                 "Times the accounting writer process was started again.")):
            yield family(P + "accounting_" + key, doc, value=_n(a.get(key, 0)))
        top = GaugeMetricFamily(P + "accounting_top_talker_bytes",
                                "Bytes of the heaviest sources (a lower bound).",
                                labels=["source"])
        for t in a.get("top_talkers") or []:
            top.add_metric([str(t["source"])], _n(t["bytes"]))
        yield top


def exposition(stats: Callable[[], dict[str, Any]]) -> Callable[[], bytes]:
    """A callable that renders the Prometheus text for the current stats."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return lambda: generate_latest(registry)


def parse_listen(listen: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", listen)
    if not m:
        raise ValueError(f"expected ADDRESS:PORT, got {listen!r}")
    host = m[1] or m[3]
    ipaddress.ip_address(host)
    return host, int(m[2] or m[4])


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def _handle(conn: trio.SocketStream, collect: Callable[[], bytes]) -> None:
    async with conn:
        data = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < 8192:
                chunk = await conn.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        line = data.split(b"\n", 1)[0].decode("latin-1").strip().split()
        if len(line) < 2 or line[0] not in ("GET", "HEAD"):
            reply = _response("405 Method Not Allowed", b"GET /metrics\n")
        elif line[1].split("?", 1)[0] not in ("/metrics", "/"):
            reply = _response("404 Not Found", b"try /metrics\n")
        else:
            try:
                body = collect()
            except Exception:
                log.exception("metrics collection failed")
                reply = _response("500 Internal Server Error", b"collection failed\n")
            else:
                reply = _response("200 OK", b"" if line[0] == "HEAD" else body, CONTENT_TYPE)
        with trio.move_on_after(10), contextlib.suppress(trio.BrokenResourceError, OSError):
            await conn.send_all(reply)


async def serve_metrics(listen: str, collect: Callable[[], bytes],
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `GET /metrics` on `listen` (ADDRESS:PORT); `started()` reports the bound port
    (useful with port 0)."""
    host, port = parse_listen(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s/metrics", f"[{host}]:{bound}" if ":" in host
             else f"{host}:{bound}")

    async def handler(conn: trio.SocketStream) -> None:
        await _handle(conn, collect)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
