"""The daemon: wires kernel tracker, sync engine, transport, external cache and control.

This module owns the trio shell: one nursery, a task per input (netlink events, each sync
channel, the protocol timer, control clients, link watcher), and the rule "pump after every
input" (feed the sans-I/O engine, then send what it wants to send and apply what it decided).
It owns the lock file and signals too. Protocol decisions live in sync/, kernel rules in
kernel/, policy in filters.py and config.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gc
import json
import logging
import math
import os
import signal
import socket
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from typing import Any

import trio

from . import filters as filters_mod
from . import sdnotify
from . import sync as sync_engine
from .accounting import Accounting, enable_kernel_accounting
from .cache import ExternalCache
from .config import Config, load_keys
from .control import ControlError, ControlServer
from .flow import PackError, unpack_flow, unpack_key
from .kernel.codec import EventType
from .kernel.table import CommitResult, Table
from .metrics import exposition, serve_metrics
from .sync.config import config_from
from .tracker import Tracker
from .transport import ChannelSpec, Transport

log = logging.getLogger(__name__)

#: the commit process's nice value (root may raise priority; others keep the parent's)
COMMIT_NICE = -20


class LockError(Exception):
    pass


class PidLock:
    """An flock()ed lock file holding our pid. A lock left by a dead process is taken over:
    flock dies with its holder, so only a live daemon can block a restart."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                try:
                    with open(self.path) as f:
                        pid = f.read().strip()
                except OSError:
                    pid = "?"
                raise LockError(f"another conntrackd-py (pid {pid}) holds {self.path}") from None
            raise
        old = os.read(fd, 32).decode(errors="replace").strip()
        if old and old.isdigit() and int(old) != os.getpid():
            log.info("took over stale lock %s left by pid %s (not running)", self.path, old)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


def channel_specs(cfg: Config) -> list[ChannelSpec]:
    specs = []
    for ch in cfg.sync.channels:
        if ch.multicast is not None:
            m = ch.multicast
            specs.append(ChannelSpec(port=m.port, group=m.group, interface=m.interface,
                                     source=m.source, ttl=m.ttl, rcvbuf=m.rcvbuf,
                                     sndbuf=m.sndbuf))
        elif ch.udp is not None:
            u = ch.udp
            specs.append(ChannelSpec(port=u.port, peers=tuple(u.peers), bind=u.bind,
                                     interface=u.interface, rcvbuf=u.rcvbuf, sndbuf=u.sndbuf))
    return specs


def build_filter(cfg: Config) -> Any:
    f = cfg.filters
    specs = channel_specs(cfg) if cfg.general.mode == "sync" else []
    sync_addrs: list[str] = []
    for s in specs:
        sync_addrs += [a for a in (s.source, s.bind, *s.peers) if a]
    ports = {s.port for s in specs}
    sync_addrs += [s.group for s in specs if s.group]
    def listed(lf: Any) -> tuple[str, tuple[Any, ...]] | None:
        return (lf.policy, tuple(lf.items)) if lf.items else None

    return filters_mod.build(
        protocols=listed(f.protocols), addresses=listed(f.addresses),
        tcp_states=listed(f.tcp_states),
        sync_ports=ports if f.ignore_sync_link else (),
        sync_addrs=sync_addrs if f.ignore_sync_link else (),
    )


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.netns = cfg.general.netns
        self.started = time.time()
        self.epoch = self._next_epoch()
        self.tracker: Tracker | None = None
        self.engine: sync_engine.Engine | None = None
        self.transport: Transport | None = None
        self.external = ExternalCache()
        self.commits = 0
        self.last_commit: dict[str, Any] | None = None
        self._wake = trio.Event()
        self._watchers: list[trio.MemorySendChannel[str]] = []
        self._direct: list[tuple[bytes, bytes | None]] = []
        self._direct_wake = trio.Event()
        self.direct_stats = {"created": 0, "updated": 0, "deleted": 0, "failed": 0,
                             "undecodable": 0}
        self.nursery: trio.Nursery | None = None
        self.accounting = (Accounting(cfg.stats.accounting) if cfg.stats.accounting.enabled
                           else None)

    def _next_epoch(self) -> int:
        """Epochs must grow across restarts (peers drop an older one as a replay), so the last
        one is kept beside the lock file; the wall clock alone would do unless it steps back."""
        path = self.cfg.general.lock_file + ".epoch"
        try:
            with open(path) as f:
                previous: int | None = int(f.read().strip())
        except (OSError, ValueError):
            previous = None
        epoch = sync_engine.new_epoch(time.time(), previous)
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(f"{epoch}\n")
        except OSError as e:
            log.warning("cannot keep the epoch in %s (%s); restarts rely on the clock", path, e)
        return epoch

    # --- engine plumbing ----------------------------------------------------------------
    def _now(self) -> float:
        return trio.current_time()

    def _on_delta(self, key: bytes, value: bytes | None) -> None:
        eng = self.engine
        if eng is not None:
            now = self._now()
            if value is None:
                eng.local_destroy(key, now)
            else:
                eng.local_update(key, value, now)
        if self._watchers:
            self._notify_watchers("internal", key, value)

    def _on_events(self, batch: Any) -> None:
        assert self.tracker is not None
        self.tracker.apply(batch)
        self.pump()

    def pump(self) -> None:
        """After an input: flush the engine, then wake the timer task (its deadline moved)."""
        self._flush()
        self._wake.set()

    def _flush(self) -> None:
        """Send what the engine wants to send and apply what it decided."""
        eng, tr = self.engine, self.transport
        if eng is None or tr is None:
            return
        now = self._now()
        tr.send(eng.datagrams_to_send(now))
        for ev in eng.events():
            self._apply_event(ev, now)

    def _apply_event(self, ev: Any, now: float) -> None:
        ext = self.external
        direct = not self.cfg.sync.external_cache
        if isinstance(ev, sync_engine.RemoteFlows):
            origin = ev.origin
            if direct:
                self._direct.extend(ev.flows)
                self._direct_wake.set()
            else:
                ext.apply(origin, ev.flows, now)
            if self._watchers:
                for k, v in ev.flows:
                    self._notify_watchers(f"external node {origin}", k, v)
        elif isinstance(ev, sync_engine.ResyncAborted):
            log.warning("full resync from node %d aborted; its stale entries stay until the "
                        "next one", ev.origin)
        elif isinstance(ev, sync_engine.ResyncStarted):
            ext.begin_sweep(ev.origin, now)
            log.info("full resync from node %d started", ev.origin)
        elif isinstance(ev, sync_engine.ResyncDone):
            if ext.sweeping(ev.origin) is not None:
                n = ext.end_sweep(ev.origin)
                log.info("full resync from node %d done; %d stale entries removed", ev.origin, n)
        elif isinstance(ev, sync_engine.PeerUp):
            log.info("peer node %d is up (epoch %08x)", ev.node, ev.epoch)
        elif isinstance(ev, sync_engine.PeerRestarted):
            log.warning("peer node %d restarted (new epoch %08x)", ev.node, ev.epoch)
        elif isinstance(ev, sync_engine.PeerDown):
            log.warning("peer node %d is down: silent for %.1f s; its %d flows are kept",
                        ev.node, self.cfg.sync.peer_timeout, ext.count(ev.node))

    # --- direct mode (external cache off) -------------------------------------------------
    async def _direct_writer(self, table: Table) -> None:
        be_liberal = not self.cfg.sync.tcp_window_tracking
        while True:
            await self._direct_wake.wait()
            self._direct_wake = trio.Event()
            batch, self._direct = self._direct, []
            latest: dict[bytes, bytes | None] = dict(batch)  # the latest state per flow wins
            ups = []
            for k, v in latest.items():
                if v is not None:
                    try:
                        ups.append(unpack_flow(k, v))
                    except PackError:
                        self.direct_stats["undecodable"] += 1
            if ups:
                res = await table.commit(ups, be_liberal=be_liberal)
                self.direct_stats["created"] += res.created
                self.direct_stats["updated"] += res.updated
                self.direct_stats["failed"] += res.failed
            for k, v in latest.items():
                if v is None:
                    try:
                        zone, orig = unpack_key(k)
                    except PackError:
                        self.direct_stats["undecodable"] += 1
                        continue
                    if await table.delete(zone, orig):
                        self.direct_stats["deleted"] += 1

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

    def _on_datagrams(self, burst: list[bytes]) -> None:
        eng = self.engine
        assert eng is not None
        now = self._now()
        for d in burst:
            eng.receive_datagram(d, now)
        self.pump()

    # --- control handlers ---------------------------------------------------------------
    async def commit(self) -> dict[str, Any]:
        """Commit the external cache into the kernel table, in a forked process at a higher
        priority: this process keeps serving the sync link and the control socket, the child
        shares the cache copy-on-write (no copy to make) and reports its result on a pipe.
        A failover waits for this path alone."""
        now = self._now()
        # Listening to NEW, this process would receive and decode an event per created flow
        # while the commit runs on the same CPU: leave the NEW group for the commit, then
        # learn the entries from a dump (which also covers any other connection opened in
        # that window).
        tracker = self.tracker
        if tracker is not None:
            tracker.events.subscribe_new(False)
        try:
            out = await self._commit_forked(now)
        finally:
            if tracker is not None:
                tracker.events.subscribe_new(True)
                assert self.nursery is not None
                self.nursery.start_soon(self._reconcile_after_commit)
        if "error" in out:
            log.error("commit of the external cache failed: %s", out["error"])
            raise ControlError(f"commit failed: {out['error']}")
        self.external.undecodable += out.pop("undecodable")
        self.commits += 1
        self.last_commit = out
        res = CommitResult(out["created"], out["updated"], out["failed"],
                           Counter(out["errors"]), out["seconds"])
        log.info("commit of the external cache: %s (of it: %.3f s ordering the entries, "
                 "%.3f s encoding, %.3f s sending)", res.summary(), out["plan_seconds"],
                 out["encode_seconds"], out["seconds"] - out["plan_seconds"]
                 - out["encode_seconds"])
        return self.last_commit

    async def _reconcile_after_commit(self) -> None:
        assert self.tracker is not None
        await self.tracker.resync_from_kernel()
        self.pump()

    async def _commit_forked(self, now: float) -> dict[str, Any]:
        rfd, wfd = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
            pid = os.fork()
        if pid == 0:  # the child: no trio, no logging; report, then exit whatever happens
            try:
                os.close(rfd)
                self._commit_child(wfd, now)
            finally:
                os._exit(0)
        os.close(wfd)
        data = bytearray()
        async with trio.lowlevel.FdStream(rfd) as stream:
            async for chunk in stream:
                data += chunk
        # it exits right after its report; WNOHANG never blocks the loop
        while os.waitpid(pid, os.WNOHANG) == (0, 0):  # noqa: ASYNC110, ASYNC222
            await trio.sleep(0.005)
        try:
            out: dict[str, Any] = json.loads(data)
        except ValueError:
            out = {"error": "the commit process ended without a result"}
        return out

    def _commit_child(self, wfd: int, now: float) -> None:
        """In the forked process: plan, commit, write the result as JSON to `wfd`."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        gc.disable()  # a short-lived process: no collector passes over the parent's heap
        # ahead of the parent on a shared CPU: the parent's work (the events this commit
        # causes) can wait in its socket buffer, a failover cannot
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, COMMIT_NICE)
        out: dict[str, Any]
        try:
            before = self.external.undecodable
            t0 = time.perf_counter()
            entries = self.external.commit_entries(
                now, commit_timeout=None if self.cfg.sync.commit_timeout is None
                else int(self.cfg.sync.commit_timeout))
            table = Table(self.netns, batch=self.cfg.netlink.commit_batch)
            try:
                res, bad = table.commit_entries_blocking(
                    entries, be_liberal=not self.cfg.sync.tcp_window_tracking)
            finally:
                table.close()
            out = {"created": res.created, "updated": res.updated, "failed": res.failed,
                   "errors": dict(res.errors), "seconds": time.perf_counter() - t0,
                   "encode_seconds": res.encode_seconds,
                   "plan_seconds": time.perf_counter() - t0 - res.seconds,
                   "undecodable": self.external.undecodable - before + bad}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        data = json.dumps(out).encode()
        while data:
            data = data[os.write(wfd, data):]

    def in_sync(self) -> bool:
        return self.engine.in_sync() if self.engine is not None else True

    def _dump_lines(self, which: str, args: dict[str, Any]) -> list[Any]:
        proto = args.get("proto")
        nat = args.get("nat")  # "src" | "dst" | "any"
        origin = args.get("origin")
        out = []
        pairs: Iterator[tuple[int | None, bytes, bytes]]
        if which == "internal":
            assert self.tracker is not None
            pairs = ((None, k, v) for k, v in self.tracker.cache.items())
        else:
            pairs = ((o, k, v) for o, k, v, _seen in self.external.items(
                None if origin is None else int(origin)))
        if args.get("raw"):  # exact bytes, for convergence checks
            return [[o, k.hex(), v.hex()] for o, k, v in pairs]
        bad = 0
        for o, k, v in pairs:
            try:
                f = unpack_flow(k, v)
            except PackError:  # a peer's bytes that do not describe a flow: not listed
                bad += 1
                continue
            if proto is not None and f.orig.proto != int(proto):
                continue
            if (nat == "src" and not f.is_snat) or (nat == "dst" and not f.is_dnat):
                continue
            if nat == "any" and not (f.is_snat or f.is_dnat):
                continue
            line = f.format()
            out.append(line if o is None else f"{line} [node={o}]")
        if bad:
            log.warning("dump of the %s cache: %d entries do not describe a flow (a peer's "
                        "bytes); not listed", which, bad)
        return out

    def _notify_watchers(self, where: str, key: bytes, value: bytes | None) -> None:
        try:
            if value is None:
                zone, orig = unpack_key(key)
                line = f"[DESTROY] {where}: zone={zone} {orig.format()}"
            else:
                line = f"[UPDATE] {where}: {unpack_flow(key, value).format()}"
        except PackError:  # a peer's bytes that do not describe a flow
            line = (f"[{'DESTROY' if value is None else 'UPDATE'}] {where}: undecodable, "
                    f"key {key.hex()}")
        for ch in list(self._watchers):
            try:
                ch.send_nowait(line)
            except trio.WouldBlock:
                pass  # a slow watcher loses lines rather than slowing the daemon
            except trio.BrokenResourceError:
                self._watchers.remove(ch)

    async def _watch(self, args: dict[str, Any]) -> AsyncIterator[str]:
        send, recv = trio.open_memory_channel[str](10000)
        self._watchers.append(send)
        try:
            async for line in recv:
                yield line
        finally:
            if send in self._watchers:
                self._watchers.remove(send)

    def stats(self, kind: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if kind in (None, "runtime", "general"):
            out["runtime"] = {"node": self.cfg.node.id, "epoch": f"{self.epoch:08x}",
                              "uptime_s": round(time.time() - self.started, 1),
                              "pid": os.getpid(), "mode": self.cfg.sync.mode,
                              "in_sync": self.in_sync(), "commits": self.commits,
                              "last_commit": self.last_commit}
        if kind in (None, "cache"):
            tr = self.tracker
            out["cache"] = {
                "internal": len(tr.cache) if tr else 0,
                "external": len(self.external),
                "external_by_node": {str(o): self.external.count(o)
                                     for o in self.external.origins()},
                "external_undecodable": self.external.undecodable,
            }
            if tr is not None:
                out["cache"]["kernel_events"] = asdict(tr.events.stats)
                out["cache"]["tracker"] = asdict(tr.stats)
        if kind in (None, "network", "sync", "queue") and self.engine is not None:
            out["sync"] = self.engine.stats()
        if kind in (None, "link", "network") and self.transport is not None:
            tr2 = self.transport
            out["link"] = {"active": tr2.channels[tr2.active].spec.describe(),
                           "switches": tr2.switches,
                           "channels": [{"channel": c.spec.describe(), "up": c.link_up,
                                         **asdict(c.stats),
                                         "gso": all(x.gso for x in c.senders),
                                         "gso_datagrams": sum(x.gso_sent for x in c.senders)}
                                        for c in tr2.channels]}
        if not self.cfg.sync.external_cache:
            out["direct"] = dict(self.direct_stats)
        if kind in (None, "accounting") and self.accounting is not None:
            out["accounting"] = self.accounting.snapshot()
        return out

    def handlers(self) -> dict[str, Any]:
        async def commit(a: dict[str, Any]) -> Any:
            return await self.commit()

        async def flush(a: dict[str, Any]) -> Any:
            which = a.get("cache", "both")
            res = {}
            if which in ("internal", "both") and self.tracker is not None:
                res["internal"] = len(self.tracker.cache)
                self.tracker.cache.clear()
            if which in ("external", "both"):
                res["external"] = self.external.purge()
            return res

        async def flush_kernel(a: dict[str, Any]) -> Any:
            table = Table(self.netns)
            try:
                await table.flush()
            finally:
                table.close()
            return "flushed"

        async def resync_internal(a: dict[str, Any]) -> Any:
            if self.tracker is None:
                raise ControlError("no internal cache in this mode")
            await self.tracker.resync_from_kernel()
            self.pump()
            return {"internal": len(self.tracker.cache)}

        async def bulk_send(a: dict[str, Any]) -> Any:
            if self.engine is None:
                raise ControlError("replication is off (general.mode: stats)")
            self.engine.bulk_send(self._now())
            self.pump()
            return "bulk send started"

        async def request_resync(a: dict[str, Any]) -> Any:
            if self.engine is None:
                raise ControlError("replication is off (general.mode: stats)")
            node = a.get("node")
            self.engine.request_resync(None if node is None else int(node), self._now())
            self.pump()
            return "resync requested"

        async def purge(a: dict[str, Any]) -> Any:
            # -t (keepalived: on BACKUP): the flows this node carried as master are zombies
            # now; shorten their kernel timeouts to the purge timeout so they expire, as
            # conntrackd does. The external cache (the new master's flows) is left alone.
            timeout = int(a.get("timeout", self.cfg.sync.purge_timeout))
            table = Table(self.netns, batch=self.cfg.netlink.commit_batch)
            try:
                accept = self.tracker.accept if self.tracker is not None else None
                n = await table.shorten_timeouts(timeout, accept)
            finally:
                table.close()
            log.info("purge: %d kernel entries now expire within %d s", n, timeout)
            return {"shortened": n, "timeout": timeout}

        async def stop(a: dict[str, Any]) -> Any:
            assert self.nursery is not None
            log.info("stop requested over the control socket")
            nursery = self.nursery

            async def after_reply() -> None:
                await trio.sleep(0.1)  # let the reply reach the client first
                nursery.cancel_scope.cancel()

            nursery.start_soon(after_reply)
            return "stopping"

        async def stats(a: dict[str, Any]) -> Any:
            return self.stats(a.get("kind"))

        async def dump(a: dict[str, Any]) -> Any:
            which = a.get("cache", "internal")
            if which not in ("internal", "external"):
                raise ControlError("cache must be internal or external")
            return self._dump_lines(which, a)

        async def in_sync(a: dict[str, Any]) -> Any:
            return {"in_sync": self.in_sync()}

        return {"commit": commit, "flush": flush, "flush_kernel": flush_kernel,
                "resync_internal": resync_internal, "bulk_send": bulk_send,
                "request_resync": request_resync, "purge": purge, "stop": stop,
                "stats": stats, "dump": dump, "in_sync": in_sync}

    # --- the main task ------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        lock = PidLock(cfg.general.lock_file)
        lock.acquire()
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await self._start(nursery)
                log.info("conntrackd-py node %d ready (mode %s, epoch %08x)", cfg.node.id,
                         cfg.sync.mode if cfg.general.mode == "sync" else "stats", self.epoch)
                sdnotify.notify("READY=1")
                nursery.start_soon(sdnotify.watchdog)
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
        if sync_on:
            keys = load_keys(cfg.sync.auth)
            if not keys:
                log.warning("sync.auth.key_files is empty: sync datagrams are not "
                            "authenticated; anyone on the sync link can inject flows")
            self.transport = Transport(channel_specs(cfg), netns_name=self.netns,
                                       silence_timeout=cfg.sync.peer_timeout,
                                       failback=cfg.sync.failback)
        if self.accounting is not None:
            enable_kernel_accounting(self.netns)
            nursery.start_soon(self.accounting.writer)
        self.tracker = Tracker(
            netns_name=self.netns, rcvbuf=cfg.netlink.rcvbuf,
            reliable=cfg.netlink.reliable_events,
            set_events_sysctl=cfg.netlink.set_events_sysctl, accept=build_filter(cfg),
            on_delta=self._on_delta if sync_on else None,
            on_flow_event=self.accounting.on_flow_event if self.accounting else None)
        if sync_on:
            assert self.transport is not None
            self.engine = sync_engine.Engine(
                config_from(cfg, keys), epoch=self.epoch,
                source=self.tracker.cache.mapping, now=self._now())
        # the internal cache is loaded before the engine can be asked for a resync
        await self.tracker.resync_from_kernel()
        nursery.start_soon(self.tracker.events.run, self._on_events,
                           self.tracker.resync_from_kernel)
        if sync_on:
            assert self.transport is not None
            for i in range(len(self.transport.channels)):
                nursery.start_soon(self.transport.receive_loop, i, self._on_datagrams, self._now)
            nursery.start_soon(self.transport.watch_links, self._now)
            nursery.start_soon(self._timer)
            if not cfg.sync.external_cache:
                nursery.start_soon(self._direct_writer, Table(self.netns,
                                                              batch=cfg.netlink.commit_batch))
            self.pump()
        if cfg.metrics.listen:
            await nursery.start(serve_metrics, cfg.metrics.listen,
                                exposition(lambda: self.stats(None)))
        # the control socket last: once it answers, everything else is up
        server = ControlServer(cfg.general.control_socket, self.handlers(),
                               {"watch": self._watch})
        await nursery.start(server.serve)
        nursery.start_soon(self._signals)

    def reload(self) -> None:
        """SIGHUP: apply what can change without a restart (log level, filters); name the rest."""
        from .config import ConfigError, load
        if not self.cfg.path:
            log.info("SIGHUP: running on the embedded default config; nothing to reload")
            return
        try:
            new = load(self.cfg.path)
        except (ConfigError, OSError) as e:
            log.error("SIGHUP: %s; keeping the running configuration", e)
            return
        logging.getLogger().setLevel(new.logging.level.upper())
        if self.tracker is not None:
            self.tracker.accept = build_filter(new)
        needs_restart = [name for name in ("node", "general", "netlink", "sync")
                         if getattr(new, name) != getattr(self.cfg, name)]
        self.cfg = dataclasses.replace(self.cfg, logging=new.logging, filters=new.filters,
                                       stats=new.stats, metrics=new.metrics)
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


__all__ = ["Daemon", "EventType", "LockError", "socket"]
