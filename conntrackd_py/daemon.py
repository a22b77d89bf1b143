"""The daemon: the trio shell around the tracker, the sync engine, the transport and control.

This module owns tasks, the pump and signals: one nursery, a task per input (netlink events,
each sync channel, the protocol timer, the direct writer, the control and metrics listeners,
the link watcher), and the rule "pump after every input" (feed the sans-I/O engine, send what
it wants to send, hand its events to `remote`, wake the timer task). It implements the control
commands' `Ops` (commands.py), owns the lock and epoch files and SIGHUP reload.

Every task that serves inputs runs under `_supervised`: an unexpected exception from one
datagram, one flow, one client or one request is logged (once per kind, rate-limited),
counted (contain.py) and the task carries on; nothing but cancellation reaches the top
nursery. What the shell decides is elsewhere and pure: event application and dumps in
remote.py, the commit in commit.py, the stats and their assembly in stats.py, -t's schedule
in purge.py, what SIGHUP applies in reload.py, -E's fan-out in watchers.py; protocol rules in
sync/, kernel rules in kernel/, policy in filters.py and config.py. This module must not grow
decisions a test can only reach through trio: it moves bytes and time.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from . import sdnotify
from . import sync as sync_engine
from .cache import ExternalCache
from .commit import CommitError, CommitJob, EchoWindow, commit_forked, run_commit
from .config import Config, ConfigError, load, load_keys
from .contain import Containment
from .control import ControlServer
from .ctlclient import ControlError
from .filters import build_filter
from .kernel.events import EventBatch
from .kernel.table import CommitResult, Table
from .lockfile import (
    LockError,
    PidLock,
    next_epoch,
    open_nofollow,
    process_age,
    raise_nofile_limit,
)
from .purge import PurgeTimer
from .reload import log_import, reloaded
from .remote import Remote, dump_entries, plan_direct
from .stats import CommitReport, RuntimeStats, Snapshot, runtime_stats, snapshot
from .sync.config import config_from
from .tracker import Tracker
from .transport import Transport, channel_specs
from .vrrp import Follower, follow_fifo, open_fifo
from .watchers import Watchers

if TYPE_CHECKING:  # imported when the config uses them: start-up time (#14)
    from .accounting import Accounting
    from .metrics import MetricsServer

log = logging.getLogger(__name__)

#: a supervised task that failed starts again after this long
RESTART_DELAY = 1.0


CommitRunner = Callable[[CommitJob, float], Awaitable[CommitReport]]


async def _commit_in_child(job: CommitJob, now: float) -> CommitReport:
    return await commit_forked(lambda: run_commit(job, now))


class Daemon:
    """The shell. Collaborators are injectable (`tracker`, `transport`, `table` and `commit`
    factories) so that a test drives the whole daemon on trio's MockClock without root."""

    def __init__(self, cfg: Config, *,
                 tracker: Callable[..., Tracker] = Tracker,
                 transport: Callable[..., Transport] = Transport,
                 table: Callable[..., Table] = Table,
                 commit: CommitRunner = _commit_in_child,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.netns = cfg.general.netns
        self._make_tracker, self._make_transport = tracker, transport
        self._make_table, self._run_commit = table, commit
        self._wall = wall
        self.started = wall()
        self.epoch = 0  # taken in run(), next to the lock
        self.tracker: Tracker | None = None
        self.engine: sync_engine.Engine | None = None
        self.transport: Transport | None = None
        self.external = ExternalCache(max_per_origin=cfg.sync.limits.max_flows_per_peer)
        limits = cfg.sync.limits
        self.remote = Remote(self.external, direct=not cfg.sync.external_cache,
                             peer_timeout=cfg.sync.peer_timeout,
                             max_pending=limits.max_flows_per_peer * limits.max_peers,
                             derived_node_id=cfg.import_warning is not None)
        self.commits = 0
        self.last_commit: CommitReport | None = None
        self.auth_enabled = False
        self.reloads = 0
        self.reload_failures = 0
        self.errors = Containment()  # exceptions one input caused: counted, logged, survived
        self._wake = trio.Event()
        self.watchers = Watchers(self._watched)  # -E's clients
        self._direct_wake = trio.Event()
        self._event_loop_runs = 0
        self.nursery: trio.Nursery | None = None
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.accounting: Accounting | None = None
        if cfg.stats.accounting.enabled:
            from .accounting import Accounting
            self.accounting = Accounting(cfg.stats.accounting, node_id=cfg.node.id)
        self.echo = EchoWindow(self.external)  # what our own commit wrote is not news
        # -t: the pending flush (conntrackd's reset_cache_alarm)
        self._purge = PurgeTimer[trio.CancelScope](cfg.sync.purge_timeout)
        self.keepalived_fifo = cfg.keepalived.notify_fifo
        self.keepalived = Follower(frozenset(cfg.keepalived.instances))

    # --- containment --------------------------------------------------------------------
    def contained(self, where: str, exc: BaseException) -> None:
        """Count and log (once per kind per minute) an exception that one input caused."""
        self.errors.record(where, exc, trio.current_time())

    async def _supervised(self, where: str, fn: Callable[..., Awaitable[object]],
                          *args: object) -> None:
        """Run a task that serves inputs; if it fails, count, log, and start it again. A task
        that returns (nothing to watch, no watchdog asked for) is done."""
        while True:
            try:
                await fn(*args)
            except Exception as e:  # contained by design: see the module docstring
                self.contained(where, e)
            else:
                return
            await trio.sleep(RESTART_DELAY)

    # --- engine plumbing ----------------------------------------------------------------
    def _now(self) -> float:
        return trio.current_time()

    def _on_delta(self, key: bytes, value: bytes | None) -> None:
        echo = self.echo.contains
        if echo is not None and value is not None and echo(key):
            # our commit wrote it: replicated once it changes here, or by a bulk send (-B)
            self.echo.echoes += 1
            return
        eng = self.engine
        if eng is not None:
            now = self._now()
            try:
                if value is None:
                    eng.local_destroy(key, now)
                else:
                    eng.local_update(key, value, now)
            except Exception as e:  # one flow the engine refuses must not lose the burst
                self.contained("replicating a local flow", e)

    def _on_events(self, batch: EventBatch) -> None:
        assert self.tracker is not None
        self.tracker.apply(batch)
        self.pump()

    def pump(self) -> None:
        """After an input: flush the engine, then wake the timer task (its deadline moved)."""
        self._flush()
        self._wake.set()

    def _flush(self) -> None:
        """Send what the engine wants to send and hand what it decided to `remote`."""
        eng, tr = self.engine, self.transport
        if eng is None or tr is None:
            return
        now = self._now()
        try:
            tr.send(eng.datagrams_to_send(now))
        except Exception as e:  # lost datagrams are the protocol's to recover, not a crash
            self.contained("sending sync datagrams", e)
        apply = self.remote.apply
        watch = self.watchers.notify if self.watchers.channels else None
        for ev in eng.events():
            try:
                if apply(ev, now, watch):
                    self._direct_wake.set()
            except Exception as e:  # one event (one datagram's flows) never stops the daemon
                self.contained("applying a sync event", e)

    def _on_datagrams(self, burst: list[bytes], sources: list[str | None]) -> None:
        eng = self.engine
        assert eng is not None
        now = self._now()
        receive = eng.receive_datagram
        for d, source in zip(burst, sources, strict=True):
            try:
                receive(d, now, source)
            except Exception as e:  # the engine refuses bad bytes itself; this is a bug
                self.contained("receiving a sync datagram", e)
        self.pump()

    # --- tasks --------------------------------------------------------------------------
    async def _timer(self) -> None:
        eng = self.engine
        assert eng is not None
        while True:
            t = eng.get_timer()
            deadline = math.inf if t is None else t
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = self._now()
            if t is not None and now >= t:
                eng.handle_timer(now)
            if self.transport is not None:
                self.transport.reevaluate(now)
            self._flush()  # not pump(): waking ourselves would spin
            await trio.lowlevel.checkpoint()

    async def _kernel_events(self) -> None:
        """The event socket's loop. Started again after a failure, it first reconciles with a
        dump: events of the failed burst are lost, and peers must not miss them."""
        tr = self.tracker
        assert tr is not None
        if self._event_loop_runs:
            await tr.resync_from_kernel()
            self.pump()
        self._event_loop_runs += 1
        await tr.events.run(self._on_events, tr.resync_from_kernel)

    async def _direct_writer(self, table: Table) -> None:
        """External cache off: peers' flows straight into the kernel, latest state wins."""
        be_liberal = not self.cfg.sync.tcp_window_tracking
        counts = self.remote.direct_counts
        while True:
            await self._direct_wake.wait()
            self._direct_wake = trio.Event()
            plan = plan_direct(self.remote.take())
            counts.undecodable += plan.undecodable
            if plan.updates:
                try:
                    res = await table.commit(plan.updates, be_liberal=be_liberal)
                except Exception as e:  # a batch the kernel side could not take
                    counts.failed += len(plan.updates)
                    self.contained("direct write", e)
                    res = CommitResult()
                counts.created += res.created
                counts.updated += res.updated
                counts.failed += res.failed
            for zone, orig in plan.deletes:
                try:
                    if await table.delete(zone, orig):
                        counts.deleted += 1
                except Exception as e:
                    counts.failed += 1
                    self.contained("direct delete", e)

    async def _reconcile_after_commit(self, port: int | None = None) -> None:
        tracker = self.tracker
        assert tracker is not None
        try:
            await tracker.resync_from_kernel()
        except Exception as e:  # EMFILE for the dump socket, ...: the next overrun retries
            self.contained("reconcile after a commit", e)
        finally:
            self.echo.end()
            # the commit's socket is closed: its events were all queued before the dump
            if port is not None:
                tracker.events.ignore_ports.discard(port)
        self.pump()


    # --- Ops: what the control commands ask (commands.Ops) --------------------------------
    async def commit(self) -> CommitReport:
        """Commit the external cache into the kernel table, in a forked process at a higher
        priority (commit.py). A failover waits for this path alone."""
        now = self._now()
        # Listening to NEW, this process would receive and decode an event per created flow
        # while the commit runs on the same CPU: leave the NEW group for the commit, then
        # learn the entries from a dump (which also covers any other connection opened in
        # that window).
        self._cancel_purge("a commit")
        tracker = self.tracker
        cfg = self.cfg
        # The events this commit causes (updates of entries the kernel had) carry its socket's
        # port id: opened here, before the fork, the event source drops them from the start.
        # Opened before anything below changes state: when it fails (no descriptors left) the
        # commit is refused and the daemon stays subscribed and echo-free as it was.
        table = port = None
        if tracker is not None:
            table = self._table()
            port = table.port_id
            tracker.events.ignore_ports.add(port)
            tracker.events.subscribe_new(False)
            self.echo.begin()  # ended by _reconcile_after_commit
        job = CommitJob(self.external, self.netns, cfg.netlink.commit_batch,
                        None if cfg.sync.commit_timeout is None else int(cfg.sync.commit_timeout),
                        not cfg.sync.tcp_window_tracking, table)
        try:
            report = await self._run_commit(job, now)
        except CommitError as e:
            self.errors.exhausted(e.errno)
            log.error("commit of the external cache failed: %s", e)
            raise ControlError(f"commit failed: {e}") from None
        finally:
            if table is not None:
                table.close()  # the parent's copy; the child had its own
            if tracker is not None:
                tracker.events.subscribe_new(True)
                assert self.nursery is not None
                self.nursery.start_soon(self._reconcile_after_commit, port)
        self.external.undecodable += report.undecodable
        self.commits += 1
        self.last_commit = report
        res = CommitResult(report.created, report.updated, report.failed,
                           Counter(report.errors), report.seconds)
        log.info("commit of the external cache: %s (of it: %.3f s ordering the entries, "
                 "%.3f s encoding, %.3f s sending)", res.summary(), report.plan_seconds,
                 report.encode_seconds,
                 report.seconds - report.plan_seconds - report.encode_seconds)
        return report

    def flush_caches(self, which: str) -> dict[str, int]:
        res = {}
        if which in ("internal", "both"):
            self._cancel_purge("a flush of the internal cache")
        if which in ("internal", "both") and self.tracker is not None:
            res["internal"] = len(self.tracker.cache)
            self.tracker.cache.clear()
        if which in ("external", "both"):
            self.echo.before_external_flush()
            res["external"] = self.external.purge()
        return res

    def _table(self) -> Table:
        try:
            return self._make_table(self.netns, batch=self.cfg.netlink.commit_batch)
        except OSError as e:
            self.errors.exhausted(e.errno)
            raise ControlError(f"cannot open a netlink socket: {e}") from None

    async def flush_kernel(self) -> str:
        table = self._table()
        try:
            await table.flush()
        finally:
            table.close()
        return "flushed"

    async def resync_internal(self) -> dict[str, int]:
        if self.tracker is None:
            raise ControlError("no internal cache in this mode")
        await self.tracker.resync_from_kernel()
        self.pump()
        return {"internal": len(self.tracker.cache)}

    def _engine(self) -> sync_engine.Engine:
        if self.engine is None:
            raise ControlError("replication is off (general.mode: stats)")
        return self.engine

    def bulk_send(self) -> str:
        self._engine().bulk_send(self._now())
        self.pump()
        return "bulk send started"

    def request_resync(self, node: int | None) -> str:
        self._engine().request_resync(node, self._now())
        self.pump()
        return "resync requested"

    async def purge(self, timeout: int | None) -> dict[str, int]:  # noqa: ASYNC109 (Ops name)
        """-t, as conntrackd 1.4.7's RESET_TIMERS (purge.py decides when): one flush of every
        kernel entry the filters would replicate, and of the internal cache. The external cache
        (the new master's flows) is left alone."""
        now = self._now()
        left, arm = self._purge.request(now, timeout)
        if arm:
            scope = trio.CancelScope()
            self._purge.arm(scope, now, left)
            assert self.nursery is not None
            self.nursery.start_soon(self._purge_later, left, scope)
            log.info("flushing the kernel's conntrack table in %d s (-t; a commit cancels it)",
                     left)
        return {"flush_in": left}

    async def _purge_later(self, delay: int, scope: trio.CancelScope) -> None:
        try:
            with scope:  # a commit cancels the flush even once it has begun
                await trio.sleep(delay)
                tracker = self.tracker
                table = self._table()
                try:
                    n = await table.flush(tracker.accept if tracker is not None else None)
                finally:
                    table.close()
                if tracker is not None:
                    tracker.cache.clear()
                log.info("flushed the kernel's conntrack table (scheduled by -t): %s",
                         "everything" if n < 0 else f"{n} entries")
        except Exception as e:  # a failed flush never stops the daemon
            self.contained("scheduled flush (-t)", e)
        finally:
            self._purge.done(scope)

    def _cancel_purge(self, why: str) -> None:
        scope = self._purge.cancel(why)
        if scope is not None:
            scope.cancel()

    def stop(self) -> str:
        assert self.nursery is not None
        log.info("stop requested over the control socket")
        nursery = self.nursery

        async def after_reply() -> None:
            await trio.sleep(0.1)  # let the reply reach the client first
            nursery.cancel_scope.cancel()

        nursery.start_soon(after_reply)
        return "stopping"

    def in_sync(self) -> bool:
        return self.engine.in_sync() if self.engine is not None else True

    def dump(self, which: str, proto: int | None, nat: str | None,
             origin: int | None, raw: bool) -> list[object]:
        internal = None if self.tracker is None else self.tracker.cache.items()
        return dump_entries(which, internal, self.external, proto, nat, origin, raw)

    def watch(self) -> AsyncIterator[object]:
        """Every change of either cache while the client listens (watchers.py)."""
        return self.watchers.listen()

    def _watched(self, on: bool) -> None:
        if self.tracker is not None:
            self.tracker.on_change = self.watchers.internal if on else None

    def stats(self, kind: str | None) -> Snapshot:
        return snapshot(
            kind, runtime=self._runtime_stats, tracker=self.tracker, external=self.external,
            invalid=self.remote.invalid, engine=self.engine, transport=self.transport,
            direct=None if self.cfg.sync.external_cache else self.remote.direct_counts,
            accounting=self.accounting, control=self.control, metrics=self.metrics)

    def _runtime_stats(self) -> RuntimeStats:
        return runtime_stats(
            self.cfg, epoch=self.epoch, uptime_s=self._wall() - self.started, pid=os.getpid(),
            in_sync=self.in_sync(), commits=self.commits, last_commit=self.last_commit,
            auth_enabled=self.auth_enabled, reloads=self.reloads,
            reload_failures=self.reload_failures, internal_errors=self.errors.internal_errors,
            fd_exhausted=self.errors.fd_exhausted, transport=self.transport, remote=self.remote,
            commit_echoes=self.echo.echoes, keepalived=self.keepalived,
            keepalived_followed=bool(self.keepalived_fifo))

    # --- the main task ------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        log_import(cfg, None)
        soft, _ = raise_nofile_limit()
        lock = PidLock(cfg.general.lock_file)
        lock.acquire()
        self.epoch = next_epoch(cfg.general.lock_file + ".epoch", self._wall())
        if soft < 4096:
            log.warning("only %d file descriptors allowed (RLIMIT_NOFILE); set LimitNOFILE",
                        soft)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await self._start(nursery)
                age = process_age()
                log.info("conntrackd-py node %d ready (mode %s, epoch %08x)%s", cfg.node.id,
                         cfg.sync.mode if cfg.general.mode == "sync" else "stats", self.epoch,
                         "" if age is None else f", {age:.3f} s after the process started")
                sdnotify.notify("READY=1")
                nursery.start_soon(self._supervised, "systemd watchdog", sdnotify.watchdog)
                task_status.started()
        finally:
            sdnotify.notify("STOPPING=1")
            for c in (self.tracker, self.transport):
                if c is not None:
                    c.close()
            lock.release()
            log.info("conntrackd-py node %d stopped", cfg.node.id)

    async def _start(self, nursery: trio.Nursery) -> None:
        cfg = self.cfg
        sync_on = cfg.general.mode == "sync"
        keys: tuple[bytes, ...] = ()
        if sync_on:
            keys = load_keys(cfg.sync.auth)
            if not keys:
                log.warning("sync datagrams are not authenticated (sync.auth.required: false "
                            "and no key): anyone on the sync link can inject flows")
            sync_cfg = config_from(cfg, keys)
            self.transport = self._make_transport(
                channel_specs(cfg.sync.channels), netns_name=self.netns,
                silence_timeout=cfg.sync.peer_timeout,
                failback=cfg.sync.failback,
                max_datagram=sync_cfg.mtu + sync_cfg.oversize_slack)
        self.auth_enabled = bool(keys)  # keys are loaded in mode sync only
        if self.accounting is not None:
            from .accounting import enable_kernel_accounting
            enable_kernel_accounting(self.netns)
            nursery.start_soon(self._supervised, "accounting writer", self.accounting.writer)
        self.tracker = self._make_tracker(
            netns_name=self.netns, rcvbuf=cfg.netlink.rcvbuf,
            reliable=cfg.netlink.reliable_events,
            set_events_sysctl=cfg.netlink.set_events_sysctl, accept=build_filter(cfg),
            on_delta=self._on_delta if sync_on else None,
            on_flow_event=self.accounting.on_flow_event if self.accounting else None)
        if sync_on:
            self.engine = sync_engine.Engine(
                sync_cfg, epoch=self.epoch,
                source=self.tracker.cache.mapping, now=self._now())
        # the internal cache is loaded before the engine can be asked for a resync
        await self.tracker.resync_from_kernel()
        nursery.start_soon(self._supervised, "kernel events", self._kernel_events)
        if sync_on:
            tp = self.transport
            assert tp is not None
            for i in range(len(tp.channels)):
                nursery.start_soon(self._supervised, f"sync channel {i}", tp.receive_loop, i,
                                   self._on_datagrams, self._now)
            nursery.start_soon(self._supervised, "link watcher", tp.watch_links, self._now)
            nursery.start_soon(self._supervised, "protocol timer", self._timer)
            if not cfg.sync.external_cache:
                nursery.start_soon(self._supervised, "direct writer", self._direct_writer,
                                   self._make_table(self.netns, batch=cfg.netlink.commit_batch))
            self.pump()
        if cfg.metrics.listen:
            from .metrics import MetricsServer
            self.metrics = MetricsServer(cfg.metrics.listen, lambda: self.stats(None),
                                         on_error=self.contained)
            await nursery.start(self.metrics.serve)
        if self.keepalived_fifo:
            os.close(open_fifo(self.keepalived_fifo))  # a wrong path stops the start, named
            nursery.start_soon(self._supervised, "keepalived notify fifo", follow_fifo,
                               self.keepalived_fifo, self.keepalived, self)
        # the control socket last: once it answers, everything else is up
        self.control = ControlServer(cfg.general.control_socket, ops=self)
        await nursery.start(self.control.serve)
        nursery.start_soon(self._supervised, "signals", self._signals)

    def reload(self) -> None:
        """SIGHUP: apply what can change without a restart (log level, filters); name the rest.
        Any failure keeps the running configuration."""
        if not self.cfg.path:
            log.info("SIGHUP: running on the embedded default config; nothing to reload")
            return
        try:
            new = load(self.cfg.path)
            accept = build_filter(new)
            level = new.logging.level.upper()
            logging.getLevelName(level)
        except (ConfigError, OSError) as e:
            self.reload_failures += 1
            log.error("SIGHUP: %s; keeping the running configuration", e)
            return
        except Exception as e:  # a bug in loading: still never the end of the daemon
            self.reload_failures += 1
            self.contained("SIGHUP reload", e)
            log.error("SIGHUP: reading %s failed (%s); keeping the running configuration",
                      self.cfg.path, type(e).__name__)
            return
        log_import(new, self.cfg)
        logging.getLogger().setLevel(level)
        if self.tracker is not None:
            self.tracker.accept = accept
        self.cfg, needs_restart = reloaded(self.cfg, new)
        self.reloads += 1
        log.info("SIGHUP: reloaded logging and filters from %s%s", self.cfg.path,
                 f"; changes to {', '.join(needs_restart)} need a restart" if needs_restart
                 else "")

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    self.reload()
                    if self.accounting is not None:
                        self.accounting.reopen()
                    continue
                log.info("received %s, stopping", signal.Signals(sig).name)
                assert self.nursery is not None
                self.nursery.cancel_scope.cancel()
                return


__all__ = ["Daemon", "LockError", "PidLock", "build_filter", "channel_specs", "next_epoch",
           "open_nofollow", "raise_nofile_limit"]
