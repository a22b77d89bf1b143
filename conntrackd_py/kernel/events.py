"""The conntrack event source on trio: NEW/UPDATE/DESTROY events, overruns and reconcile.

This module owns the event socket's life: subscription, buffer size, reliable mode, the
`wait_readable` + non-blocking `recv_into` drain loop, and what an overrun (ENOBUFS) means:
events were lost, so the caller is told to dump the table and reconcile. It keeps no cache.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..flow import Flow
from ..mmsg import MultiReceiver
from . import codec
from .nl import (
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_DROP_MEMBERSHIP,
    SOL_NETLINK,
    open_socket,
)

log = logging.getLogger(__name__)

#: measured here: a 190k/s DESTROY burst lost ~30% with the default 208 KiB buffer, none at 64 MiB
DEFAULT_RCVBUF = 64 << 20
ALL_GROUPS = codec.GROUP_NEW | codec.GROUP_UPDATE | codec.GROUP_DESTROY

EventBatch = list[tuple[codec.EventType, Flow]]


@dataclass
class EventStats:
    events: int = 0
    new: int = 0
    update: int = 0
    destroy: int = 0
    overruns: int = 0
    malformed: int = 0
    reads: int = 0
    #: events our own commit caused (their nlmsg_pid is in `ignore_ports`), not decoded
    ignored_own: int = 0
    #: the receive buffer the kernel granted (SO_RCVBUF read back: twice what was set)
    rcvbuf: int = 0


class EventSource:
    """Reads conntrack events and hands them over in batches (one drained burst per batch)."""

    def __init__(self, *, rcvbuf: int = DEFAULT_RCVBUF, reliable: bool = False,
                 groups: int = ALL_GROUPS, netns_name: str | None = None) -> None:
        self.sock = open_socket(groups, rcvbuf=rcvbuf, reliable=reliable, netns_name=netns_name)
        self.stats = EventStats(
            rcvbuf=self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        self._rx = MultiReceiver(self.sock)
        self._overrun_logged = False
        #: netlink port ids of our own request sockets whose changes are not news (a commit's:
        #: conntrackd does not propagate what its own commit wrote); empty on the hot path
        self.ignore_ports: set[int] = set()

    def close(self) -> None:
        self.sock.close()

    def subscribe_new(self, on: bool) -> None:
        """Join or leave the NEW events group. Left during a bulk create (a commit), so this
        process does not receive and decode an event per created flow; the caller reconciles
        with a dump afterwards to learn what it missed. (Kernel 6.18 still builds each
        create's event: `ctnetlink_conntrack_event` under `ctnetlink_new_conntrack` in perf.)"""
        opt = NETLINK_ADD_MEMBERSHIP if on else NETLINK_DROP_MEMBERSHIP
        self.sock.setsockopt(SOL_NETLINK, opt, 1)  # NFNLGRP_CONNTRACK_NEW

    def discard_pending(self) -> int:
        """Drop whatever is queued (used right before a reconcile dump covers it)."""
        dropped = 0
        while True:
            try:
                dropped += len(self._rx.recv())
            except BlockingIOError:
                return dropped
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise

    def _decode(self, view: memoryview, n: int) -> EventBatch:
        try:
            if self.ignore_ports:
                batch, skipped = codec.decode_events_except(view, n, self.ignore_ports)
                self.stats.ignored_own += skipped
                return batch
            return codec.decode_events(view, n)
        except codec.CodecError as e:
            self.stats.malformed += 1
            log.warning("dropped a malformed netlink datagram (%d bytes): %s", n, e)
            return []

    async def run(self, on_events: Callable[[EventBatch], None],
                  on_overrun: Callable[[], Awaitable[None]],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: drain the socket, call `on_events` per burst; on ENOBUFS await `on_overrun`.

        `on_overrun` is expected to dump the table and reconcile; events queued before it was
        called are discarded first, since the dump supersedes them.
        """
        task_status.started()
        stats = self.stats
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            batch: EventBatch = []
            overrun = False
            rx = self._rx
            view, size = rx.view, rx.slot_size
            while True:
                try:
                    lengths = rx.recv()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    overrun = True
                    break
                stats.reads += 1
                for i, n in enumerate(lengths):
                    batch.extend(self._decode(view[i * size:], n))
                if len(batch) >= 4096:
                    break  # hand over regularly so a flood cannot starve the rest
                if rx.batched and len(lengths) < rx.slots:
                    break  # drained: no second call just to hear EAGAIN (latency)
            if batch:
                self._count(batch)
                on_events(batch)
            if overrun:
                stats.overruns += 1
                if not self._overrun_logged:
                    log.warning(
                        "conntrack events lost (ENOBUFS: receive buffer overrun); dumping the "
                        "table to reconcile. Raise netlink.rcvbuf or enable reliable events. "
                        "Further overruns are counted, not logged.")
                    self._overrun_logged = True
                self.discard_pending()
                await on_overrun()
            await trio.lowlevel.checkpoint()

    def _count(self, batch: EventBatch) -> None:
        st = self.stats
        st.events += len(batch)
        for kind, _ in batch:
            if kind == codec.EventType.NEW:
                st.new += 1
            elif kind == codec.EventType.UPDATE:
                st.update += 1
            else:
                st.destroy += 1
