"""Prometheus metrics: a collector over the daemon's typed stats and a small trio HTTP server.

The collector reads a callable returning the daemon's `stats(None)` (a `stats.Snapshot`) at
scrape time, by attribute: a renamed field fails mypy, not a dashboard. Nothing on the event
path knows about Prometheus. The exposition text is made by prometheus_client; the HTTP server
is ours (trio sockets, HTTP/1.0, `GET /metrics` only) rather than the library's threaded one.

The server contains every client: a reset, a partial request, a client that never reads, or
anything else one connection does is counted (`client_errors`) and logged once, never raised
into the daemon. At most `max_connections` are served at once (more are closed at once and
counted in `refused`), each for at most `timeout` seconds, so idle clients cannot hold the
daemon's descriptors; an accept that fails for lack of descriptors waits and retries.
It keeps no state of its own beyond those counters.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .stats import (
    AccountingStats,
    CacheStats,
    ControlStats,
    DirectStats,
    LinkStats,
    RuntimeStats,
    Snapshot,
    SyncStats,
)

log = logging.getLogger(__name__)

P = "conntrackd_py_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: connections served at once; more are closed as soon as accepted
MAX_CONNECTIONS = 64
#: the whole exchange with one client (request, collection, reply)
CONNECTION_TIMEOUT = 5.0
MAX_REQUEST = 8192
#: accept errors meaning "no descriptor (or buffer) for one more": wait, then retry
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

OnError = Callable[[str, BaseException], None]

#: (metric suffix, help) for the engine's plain counters, each the `Counters` field of that
#: name (tests/unit/test_metrics.py checks that every Counters field is exported somewhere)
_SYNC_COUNTERS: tuple[tuple[str, str], ...] = (
    ("retransmitted", "Datagrams retransmitted."),
    ("bytes_retransmitted", "Bytes retransmitted (compare with bytes received: the "
     "amplification a NACK can cause is bounded by sync.limits.resend_ratio)."),
    ("forged", "Without auth: two different datagrams with one sequence number (a forger)."),
    ("lost", "Datagrams given up as lost."),
    ("replayed", "Datagrams already delivered (duplicates, replays)."),
    ("reorder_dropped", "Out-of-order datagrams beyond the window."),
    ("evicted", "Resend-queue entries dropped unacknowledged."),
    ("expired", "Remote flows expired by the alarm timeout."),
    ("resyncs_aborted", "Received resyncs cut short."),
    ("peer_restarts", "Peer restarts seen (new epoch)."),
    ("oversize", "Flows too big for any datagram, never sent."),
    ("oversize_received", "Datagrams longer than the MTU plus slack, dropped undecoded."),
    ("implausible", "Sequence numbers too far ahead of a peer's stream to be believed."),
    ("unconfirmed_epoch", "New epochs in control datagrams while the old one is alive."),
    ("doubts", "Times a peer's stream continuity was doubted (a resync was requested)."),
    ("stalls", "Peer streams stalled: a backlog or no delivery past the bound."),
    ("duplicate_node", "Datagrams carrying our node id from another host or epoch."),
    ("peers_refused", "Datagrams from a new node while sync.limits.max_peers are tracked."),
    ("peers_forgotten", "Peers down longer than sync.limits.peer_expire, forgotten."),
    ("resends_limited", "Retransmissions refused by the per-peer byte budget."),
    ("resync_requests_coalesced", "Full resync requests within resync_min_interval, merged."),
    ("bad_mac", "Datagrams refused by authentication (untagged, unknown key id, wrong tag)."),
    ("malformed", "Datagrams that did not decode."),
    ("own", "Our own datagrams looped back by multicast."),
    ("unknown_kind", "Messages or fields from a newer protocol version, skipped."),
)


class StatsCollector(Collector):
    def __init__(self, stats: Callable[[], Snapshot],
                 wall: Callable[[], float] = time.time) -> None:
        self.stats = stats
        self.wall = wall

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        if s.runtime is not None:
            yield from self._runtime(s.runtime)
        if s.cache is not None:
            yield from self._cache(s.cache)
        if s.sync is not None:
            yield from self._sync(s.sync)
        if s.link is not None:
            yield from self._link(s.link)
        if s.direct is not None:
            yield from self._direct(s.direct)
        if s.accounting is not None:
            yield from self._accounting(s.accounting)
        if s.control is not None:
            yield from self._control(s.control)

    def _runtime(self, r: RuntimeStats) -> Iterator[Metric]:
        yield GaugeMetricFamily(P + "uptime_seconds", "Seconds since the daemon started.",
                                value=r.uptime_s)
        yield GaugeMetricFamily(P + "in_sync", "1 when every live peer has sent us a complete "
                                "full resync and its stream has no gap and is not stuck, and "
                                "no other host uses our node id (-s sync's answer).",
                                value=float(r.in_sync))
        yield GaugeMetricFamily(P + "auth_enabled", "1 when sync datagrams must carry a valid "
                                "MAC; 0: anyone on the sync link can inject flows.",
                                value=float(r.auth_enabled))
        yield CounterMetricFamily(P + "commits", "Commits of the external cache to the kernel.",
                                  value=r.commits)
        last = r.last_commit
        yield GaugeMetricFamily(P + "last_commit_duration_seconds",
                                "Duration of the last commit.",
                                value=last.seconds if last is not None else 0.0)
        yield GaugeMetricFamily(P + "last_commit_failed_flows",
                                "Flows the last commit could not write.",
                                value=last.failed if last is not None else 0)
        yield CounterMetricFamily(P + "reloads", "Configuration reloads (SIGHUP) applied.",
                                  value=r.reloads)
        yield CounterMetricFamily(P + "reload_failures", "Reloads refused; the running "
                                  "configuration was kept.", value=r.reload_failures)
        yield CounterMetricFamily(P + "internal_errors", "Unexpected exceptions while serving "
                                  "one input, contained (see the log).",
                                  value=r.internal_errors)
        yield CounterMetricFamily(P + "fd_exhausted", "Times descriptors (or buffers) ran out "
                                  "(EMFILE, ENFILE, ...); survived.", value=r.fd_exhausted)
        yield CounterMetricFamily(P + "oversize_datagrams", "Sync datagrams longer than the MTU "
                                  "plus slack, dropped by the transport.",
                                  value=r.oversize_datagrams)
        yield CounterMetricFamily(P + "commit_echoes", "Flows our own commit wrote into the "
                                  "kernel, not sent to peers as ours (sent once they change "
                                  "here, or by a bulk send).", value=r.commit_echoes)
        yield CounterMetricFamily(P + "keepalived_transitions", "keepalived states (MASTER, "
                                  "BACKUP, FAULT) read from its notify FIFO and acted on.",
                                  value=r.keepalived_transitions)

    def _cache(self, c: CacheStats) -> Iterator[Metric]:
        g = GaugeMetricFamily(P + "cache_flows", "Flows in each cache.", labels=["cache"])
        g.add_metric(["internal"], c.internal)
        g.add_metric(["external"], c.external)
        yield g
        g = GaugeMetricFamily(P + "external_cache_flows", "External-cache flows by origin node.",
                              labels=["node"])
        for node, n in sorted(c.external_by_node.items()):
            g.add_metric([str(node)], n)
        yield g
        yield CounterMetricFamily(P + "external_undecodable", "Peers' entries that did not "
                                  "describe a flow, skipped by a commit.",
                                  value=c.external_undecodable)
        m = CounterMetricFamily(P + "external_refused", "Peers' flows refused by the per-peer "
                                "cap (sync.limits.max_flows_per_peer), by origin node.",
                                labels=["node"])
        for node, n in sorted(c.external_refused.items()):
            m.add_metric([str(node)], n)
        yield m
        m = CounterMetricFamily(P + "invalid_flows", "Peers' flows with a field out of the "
                                "kernel's range, refused before storing, by reason.",
                                labels=["reason"])
        for reason, n in sorted(c.invalid_flows.items()):
            m.add_metric([reason], n)
        yield m
        ev = c.kernel_events
        if ev is not None:
            m = CounterMetricFamily(P + "kernel_events", "ctnetlink events read, by type.",
                                    labels=["type"])
            m.add_metric(["new"], ev.new)
            m.add_metric(["update"], ev.update)
            m.add_metric(["destroy"], ev.destroy)
            yield m
            yield CounterMetricFamily(P + "netlink_overruns", "Event socket overruns (ENOBUFS).",
                                      value=ev.overruns)
            yield CounterMetricFamily(P + "netlink_malformed",
                                      "Event messages that did not decode.", value=ev.malformed)
            yield CounterMetricFamily(P + "kernel_events_own", "Events our own commit caused "
                                      "(by the commit socket's port id), dropped undecoded.",
                                      value=ev.ignored_own)
        tr = c.tracker
        if tr is not None:
            yield CounterMetricFamily(P + "kernel_dumps", "Full dumps of the kernel table.",
                                      value=tr.dumps)
            yield CounterMetricFamily(P + "reconciles", "Reconciliations of the internal cache "
                                      "with a kernel dump (start, overruns, requests).",
                                      value=tr.reconciles)
            yield GaugeMetricFamily(P + "last_dump_duration_seconds",
                                    "Duration of the last kernel dump.",
                                    value=tr.last_dump_seconds)
            yield CounterMetricFamily(P + "ignored_events", "Events dropped by the filters.",
                                      value=tr.ignored)

    def _sync(self, s: SyncStats) -> Iterator[Metric]:
        c = s.counters

        def directed(name: str, doc: str, sent: int, received: int) -> Metric:
            m = CounterMetricFamily(P + name, doc, labels=["direction"])
            m.add_metric(["sent"], sent)
            m.add_metric(["received"], received)
            return m

        yield directed("sync_datagrams", "Sync datagrams.", c.datagrams_sent,
                       c.datagrams_received)
        yield directed("sync_bytes", "Sync bytes.", c.bytes_sent, c.bytes_received)
        yield directed("sync_flows", "Flow messages (new datagrams only when sent).",
                       c.flows_sent, c.flows_received)
        yield directed("sync_acks", "Acknowledgements.", c.acks_sent, c.acks_received)
        yield directed("sync_nacks", "Negative acknowledgements.", c.nacks_sent,
                       c.nacks_received)
        yield directed("sync_resyncs", "Full resyncs (sent: started; received: completed).",
                       c.resyncs_sent, c.resyncs_received)
        yield directed("sync_resync_requests", "Full resync requests.", c.resync_requests_sent,
                       c.resync_requests_received)
        for key, doc in _SYNC_COUNTERS:
            yield CounterMetricFamily(P + "sync_" + key, doc, value=getattr(c, key))
        rej = CounterMetricFamily(P + "sync_rejected", "Datagrams refused, by reason.",
                                  labels=["reason"])
        reasons = dict(s.rejected)
        reasons.setdefault("stale_epoch", c.stale_epoch)
        reasons.setdefault("unknown_node", c.unknown_node)
        for reason, n in sorted(reasons.items()):
            rej.add_metric([reason], n)
        yield rej
        yield GaugeMetricFamily(P + "duplicate_node", "1 while another host sends with our "
                                "node id (we are then not in sync).",
                                value=float(s.duplicate_node))
        yield GaugeMetricFamily(P + "resend_queue_depth", "Datagrams awaiting acknowledgement.",
                                value=c.resend_queue_depth)
        yield GaugeMetricFamily(P + "resend_queue_bytes", "Bytes awaiting acknowledgement.",
                                value=s.resend_queue_bytes)
        yield GaugeMetricFamily(P + "resync_active", "1 while we are sending a full resync.",
                                value=float(s.resync.active))
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
        stuck = GaugeMetricFamily(P + "peer_stuck", "1 while the peer's stream makes no "
                                  "progress (a backlog or a doubt past the bound).",
                                  labels=["node"])
        state = GaugeMetricFamily(P + "peer_state", "1 for the state the peer's stream is in "
                                  "(need_resync, in_resync, synced, refreshing, doubtful).",
                                  labels=["node", "state"])
        now = self.wall()
        for p in sorted(s.peers, key=lambda p: p.node):
            node = str(p.node)
            up.add_metric([node], float(p.up))
            seen.add_metric([node], now - p.silent_s)
            silent.add_metric([node], p.silent_s)
            if p.lag is not None:
                lag.add_metric([node], p.lag)
            stuck.add_metric([node], float(p.stuck))
            state.add_metric([node, p.state], 1.0)
        yield from (up, seen, silent, lag, stuck, state)

    def _link(self, link: LinkStats) -> Iterator[Metric]:
        yield CounterMetricFamily(P + "link_switches", "Switches of the active sync channel.",
                                  value=link.switches)
        up = GaugeMetricFamily(P + "link_up", "1 when the channel's link is up.",
                               labels=["channel"])
        active = GaugeMetricFamily(P + "link_active", "1 for the channel in use.",
                                   labels=["channel"])
        dg = CounterMetricFamily(P + "link_datagrams", "Datagrams on the channel.",
                                 labels=["channel", "direction"])
        err = CounterMetricFamily(P + "link_send_errors", "Send errors on the channel.",
                                  labels=["channel"])
        big = CounterMetricFamily(P + "link_oversize", "Datagrams longer than the MTU plus "
                                  "slack, dropped before decoding.", labels=["channel"])
        for ch in link.channels:
            name = ch.channel
            up.add_metric([name], float(ch.up))
            active.add_metric([name], float(name == link.active))
            dg.add_metric([name, "sent"], ch.sent)
            dg.add_metric([name, "received"], ch.received)
            err.add_metric([name], ch.send_errors)
            big.add_metric([name], ch.oversize)
        yield from (up, active, dg, err, big)

    def _direct(self, d: DirectStats) -> Iterator[Metric]:
        m = CounterMetricFamily(P + "direct_writes", "Kernel writes of remote flows "
                                "(external cache off), by result.", labels=["result"])
        for k, v in (("created", d.created), ("deleted", d.deleted), ("failed", d.failed),
                     ("undecodable", d.undecodable), ("updated", d.updated),
                     ("refused", d.refused)):
            m.add_metric([k], v)
        yield m

    def _accounting(self, a: AccountingStats) -> Iterator[Metric]:
        flows = CounterMetricFamily(P + "accounting_flows", "Destroyed flows accounted.",
                                    labels=["proto"])
        pk = CounterMetricFamily(P + "accounting_packets", "Packets of destroyed flows.",
                                 labels=["proto", "direction"])
        by = CounterMetricFamily(P + "accounting_bytes", "Bytes of destroyed flows.",
                                 labels=["proto", "direction"])
        for proto, t in sorted(a.totals.items()):
            flows.add_metric([proto], t.flows)
            for d, counts in (("orig", t.orig), ("reply", t.reply)):
                pk.add_metric([proto, d], counts.packets)
                by.add_metric([proto, d], counts.bytes)
        yield from (flows, pk, by)
        yield CounterMetricFamily(P + "accounting_records_written",
                                  "Accounting records written.", value=a.records_written)
        yield CounterMetricFamily(P + "accounting_records_dropped",
                                  "Accounting records dropped (buffer full or write error).",
                                  value=a.records_dropped)
        yield GaugeMetricFamily(P + "accounting_records_pending",
                                "Accounting records buffered, not yet written.",
                                value=a.records_pending)
        yield CounterMetricFamily(P + "accounting_write_errors",
                                  "Batches of accounting records the writer could not write.",
                                  value=a.write_errors)
        yield CounterMetricFamily(P + "accounting_writer_restarts",
                                  "Times the accounting writer process was started again.",
                                  value=a.writer_restarts)
        sinks = CounterMetricFamily(P + "accounting_sink_records", "Accounting records per "
                                    "sink (file, syslog, each IPFIX collector), written or lost.",
                                    labels=["sink", "result"])
        for name, st in sorted(a.sinks.items()):
            sinks.add_metric([name, "written"], st.written)
            sinks.add_metric([name, "lost"], st.lost)
        yield sinks
        top = GaugeMetricFamily(P + "accounting_top_talker_bytes",
                                "Bytes of the heaviest sources (a lower bound).",
                                labels=["source"])
        for t2 in a.top_talkers:
            top.add_metric([t2.source], t2.bytes)
        yield top

    def _control(self, c: ControlStats) -> Iterator[Metric]:
        yield CounterMetricFamily(P + "control_requests", "Control socket requests.",
                                  value=c.requests)
        yield CounterMetricFamily(P + "control_bad_requests", "Control requests refused (bad "
                                  "JSON, unknown command, bad argument).", value=c.bad_requests)
        yield CounterMetricFamily(P + "control_errors", "Unexpected errors while serving one "
                                  "control client, contained.", value=c.errors)
        yield CounterMetricFamily(P + "control_refused_clients", "Control clients refused: "
                                  "too many at once.", value=c.refused_clients)
        yield CounterMetricFamily(P + "control_dropped_clients", "Control clients dropped: "
                                  "they stopped reading their replies, or stayed idle.",
                                  value=c.dropped_clients)
        yield CounterMetricFamily(P + "metrics_requests", "Metrics scrapes answered.",
                                  value=c.metrics_requests)
        yield CounterMetricFamily(P + "metrics_client_errors", "Metrics connections that "
                                  "failed (reset, timeout, malformed), contained.",
                                  value=c.metrics_client_errors)
        yield CounterMetricFamily(P + "metrics_refused", "Metrics connections closed at once: "
                                  "too many open.", value=c.metrics_refused)
        yield GaugeMetricFamily(P + "metrics_connections", "Metrics connections being served.",
                                value=c.metrics_connections)
        yield CounterMetricFamily(P + "metrics_accept_errors", "Metrics listener accept "
                                  "failures (descriptors exhausted), retried.",
                                  value=c.metrics_accept_errors)


def exposition(stats: Callable[[], Snapshot]) -> Callable[[], bytes]:
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


class MetricsServer:
    """`GET /metrics` over HTTP/1.0 on `listen` (ADDRESS:PORT). `serve()` reports the bound
    port to `started()` (useful with port 0). `on_error(where, exc)` hears unexpected
    exceptions (a failing collection): the daemon counts and logs them."""

    def __init__(self, listen: str, stats: Callable[[], Snapshot] | None = None, *,
                 collect: Callable[[], bytes] | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 timeout: float = CONNECTION_TIMEOUT, on_error: OnError | None = None) -> None:
        self.host, self.port = parse_listen(listen)
        if collect is None:
            assert stats is not None
            collect = exposition(stats)
        self.collect = collect
        self.max_connections = max_connections
        self.timeout = timeout
        self.on_error = on_error
        self.requests = 0
        self.client_errors = 0
        self.refused = 0
        self.connections = 0
        self.accept_errors = 0
        self._logged: set[str] = set()

    def _log_once(self, kind: str, msg: str, *args: object) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(msg + " (logged once; counted in metrics)", *args)

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("metrics on http://%s/metrics", f"[{self.host}]:{bound}" if ":" in self.host
                 else f"{self.host}:{bound}")
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started(bound)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn = await listener.accept()
            except OSError as e:
                # out of descriptors (they come back as connections close) or anything else
                # the listening socket says: wait and try again, never stop the daemon
                self.accept_errors += 1
                if self.on_error is not None:
                    self.on_error("metrics accept", e)
                elif e.errno not in _ACCEPT_RETRY:
                    log.error("metrics: accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            if self.connections >= self.max_connections:
                self.refused += 1
                self._log_once("refused", "metrics: more than %d connections at once; closing "
                               "the extra ones", self.max_connections)
                await trio.aclose_forcefully(conn)
                continue
            self.connections += 1
            nursery.start_soon(self._serve_one, conn)

    async def _serve_one(self, conn: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(self.timeout) as scope:
                await self._exchange(conn)
            if scope.cancelled_caught:
                self.client_errors += 1
                self._log_once("timeout", "metrics: a client took longer than %.0f s",
                               self.timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.client_errors += 1
            self._log_once(type(e).__name__, "metrics: a client connection failed (%s)", e)
        except Exception as e:  # anything else one client causes stays with that client
            self.client_errors += 1
            if self.on_error is not None:
                self.on_error("metrics client", e)
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(conn)

    async def _exchange(self, conn: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
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
                body = self.collect()
            except Exception as e:
                if self.on_error is not None:
                    self.on_error("metrics collection", e)
                else:
                    log.exception("metrics collection failed")
                reply = _response("500 Internal Server Error", b"collection failed\n")
            else:
                self.requests += 1
                reply = _response("200 OK", b"" if line[0] == "HEAD" else body, CONTENT_TYPE)
        await conn.send_all(reply)


async def serve_metrics(listen: str, collect: Callable[[], bytes],
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `GET /metrics` on `listen` with the default limits (see MetricsServer)."""
    await MetricsServer(listen, collect=collect).serve(task_status=task_status)
