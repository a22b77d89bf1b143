"""UDP channels on trio: multicast (IPv4/IPv6) and unicast, redundant links with failover.

This module owns sockets for the sync link and the choice of the active channel. It moves
opaque datagrams only: who sent them and what they mean is the sync engine's business (the
node id is inside every datagram, so addresses do not matter here).

Failover: traffic goes out on one active channel; every channel receives. The active channel
is left when its interface goes down (rtnetlink link events) or when it
has heard nothing for `silence_timeout` while another channel has; with `failback` traffic
returns to the first channel once it is up and heard again.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from . import netns
from .mmsg import MultiReceiver, MultiSender
from .stats import ChannelSnapshot, LinkStats

if TYPE_CHECKING:
    from .config import Channel as ChannelConfig

log = logging.getLogger(__name__)

#: datagrams handed to the engine per turn: it acknowledges after each turn, so a sender in a
#: full resync (flow control: at most `resync_window` datagrams unacknowledged) keeps going
#: while this side works, rather than the two taking turns
RX_BURST = 64

RTMGRP_LINK = 1
NETLINK_ROUTE = 0
IFF_UP = 0x1
IFF_RUNNING = 0x40
#: struct ifinfomsg after the netlink header: family, pad, type, then index and flags
_IFINFO = struct.Struct("=4xiI")


@dataclass(frozen=True)
class ChannelSpec:
    """Where one channel sends and listens. `peers` empty = multicast to `group`."""

    port: int
    group: str | None = None
    peers: tuple[str, ...] = ()
    bind: str | None = None
    interface: str | None = None
    source: str | None = None
    ttl: int = 1
    rcvbuf: int = 8 << 20
    sndbuf: int = 8 << 20

    @property
    def ipv6(self) -> bool:
        addr = self.group or (self.peers[0] if self.peers else self.bind or "0.0.0.0")
        return ipaddress.ip_address(addr).version == 6

    def describe(self) -> str:
        where = f"multicast {self.group}" if self.group else f"udp -> {','.join(self.peers)}"
        return f"{where}:{self.port}" + (f" on {self.interface}" if self.interface else "")


@dataclass
class ChannelStats:
    sent: int = 0
    received: int = 0
    send_errors: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    last_rx: float = 0.0
    #: datagrams longer than the MTU plus slack, dropped before the engine saw them
    oversize: int = 0


@dataclass
class Channel:
    spec: ChannelSpec
    sock: socket.socket
    dests: list[tuple[object, ...]]
    ifindex: int = 0
    link_up: bool = True
    stats: ChannelStats = field(default_factory=ChannelStats)
    #: one per destination (sendmmsg, UDP GSO), made from `sock` and `dests`
    senders: list[MultiSender] = field(init=False)

    def __post_init__(self) -> None:
        self.senders = [MultiSender(self.sock, d) for d in self.dests]


def _ifindex(name: str | None) -> int:
    return socket.if_nametoindex(name) if name else 0


def open_channel(spec: ChannelSpec, netns_name: str | None = None) -> Channel:
    """The channel's socket, bound and joined. An OSError names the channel and what failed
    (the interface, the address), so that the start-up error says which setting to fix."""
    try:
        return _open_channel(spec, netns_name)
    except OSError as e:
        if spec.interface and e.errno in (errno.ENODEV, errno.ENXIO, None):
            what = f"interface {spec.interface!r}"
        elif e.errno == errno.EADDRNOTAVAIL:
            what = f"address {spec.bind or spec.source or '?'}"
        else:
            what = f"port {spec.port}"
        raise OSError(e.errno or errno.ENODEV,
                      f"sync channel {spec.describe()}: {what}: {e.strerror or e}"
                      ) from None


def _open_channel(spec: ChannelSpec, netns_name: str | None) -> Channel:
    fam = socket.AF_INET6 if spec.ipv6 else socket.AF_INET
    with netns.entered(netns_name):
        ifindex = _ifindex(spec.interface)  # first: a missing interface leaks no socket
        sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for opt, force, size in ((socket.SO_RCVBUF, 33, spec.rcvbuf),
                                 (socket.SO_SNDBUF, 32, spec.sndbuf)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
        if spec.interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, spec.interface.encode())
        dests: list[tuple[object, ...]]
        if spec.group:
            grp = ipaddress.ip_address(spec.group).packed
            if fam == socket.AF_INET:
                sock.bind(("", spec.port))
                local = ipaddress.ip_address(spec.source).packed if spec.source else bytes(4)
                mreqn = grp + local + struct.pack("=i", ifindex)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)  # full ip_mreqn
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, spec.ttl)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                dests = [(spec.group, spec.port)]
            else:
                sock.bind(("::", spec.port))
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                                grp + struct.pack("=I", ifindex))
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, spec.ttl)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                dests = [(spec.group, spec.port, 0, ifindex)]
        else:
            sock.bind((spec.bind or ("::" if fam == socket.AF_INET6 else ""), spec.port))
            dests = [(p, spec.port) for p in spec.peers]
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return Channel(spec, sock, dests, ifindex)


class Transport:
    """The set of redundant channels, one of them active for sending."""

    def __init__(self, specs: list[ChannelSpec], *, netns_name: str | None = None,
                 silence_timeout: float = 3.0, failback: bool = True,
                 max_datagram: int = 65535) -> None:
        if not specs:
            raise ValueError("at least one channel is needed")
        self.netns_name = netns_name
        #: longer datagrams are dropped before decoding (the MTU plus the engine's slack)
        self.max_datagram = max_datagram
        self.channels = [open_channel(s, netns_name) for s in specs]
        self.active = 0
        self.silence_timeout = silence_timeout
        self.failback = failback
        self.switches = 0

    def close(self) -> None:
        for ch in self.channels:
            ch.sock.close()

    def snapshot(self) -> LinkStats:
        return LinkStats(
            active=self.channels[self.active].spec.describe(), switches=self.switches,
            channels=[ChannelSnapshot(
                channel=c.spec.describe(), up=c.link_up, sent=c.stats.sent,
                received=c.stats.received, send_errors=c.stats.send_errors,
                bytes_sent=c.stats.bytes_sent, bytes_received=c.stats.bytes_received,
                last_rx=c.stats.last_rx, oversize=c.stats.oversize,
                gso=all(x.gso for x in c.senders),
                gso_datagrams=sum(x.gso_sent for x in c.senders)) for c in self.channels])

    # --- sending ------------------------------------------------------------------------
    def send(self, datagrams: list[bytes]) -> None:
        """Send each datagram to every destination of the active channel (sendmmsg: up to 64
        per system call). A datagram the kernel refuses is counted and skipped."""
        if not datagrams:
            return
        ch = self.channels[self.active]
        st = ch.stats
        for sender in ch.senders:
            i, total = 0, len(datagrams)
            gso = sender.gso
            while i < total:
                try:
                    n = sender.send(datagrams, i)
                except OSError as e:
                    # A full socket buffer or a down link: the sync protocol recovers the loss.
                    st.send_errors += 1
                    if e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENETUNREACH,
                                       errno.ENETDOWN, errno.EHOSTUNREACH, errno.EPERM):
                        raise
                    n = 1
                else:
                    st.sent += n
                    st.bytes_sent += sum(len(d) for d in datagrams[i:i + n])
                i += n
            if gso and not sender.gso:
                log.info("%s: the kernel refused UDP GSO; full resyncs go datagram by "
                         "datagram (sendmmsg) from now on", ch.spec.describe())

    # --- receiving ----------------------------------------------------------------------
    async def receive_loop(self, index: int,
                           on_datagrams: Callable[[list[bytes], list[str | None]], None],
                           clock: Callable[[], float]) -> None:
        """Drain channel `index` after each wakeup; hand over each burst at once, with each
        datagram's sender address (recvmmsg fills it in the same call). Datagrams longer than
        `max_datagram` are counted (`oversize`) and dropped here."""
        ch = self.channels[index]
        sock, st = ch.sock, ch.stats
        rx = MultiReceiver(sock, slots=32, slot_size=65536, names=True)
        view, size, sources_of = rx.view, rx.slot_size, rx.sources
        limit = self.max_datagram
        while True:
            await trio.lowlevel.wait_readable(sock)
            burst: list[bytes] = []
            sources: list[str | None] = []
            while len(burst) < RX_BURST:
                try:
                    lengths = rx.recv()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.ECONNREFUSED, errno.ENETDOWN):
                        continue
                    raise
                if max(lengths) <= limit:
                    burst += [bytes(view[i * size:i * size + n]) for i, n in enumerate(lengths)]
                    sources += sources_of(len(lengths))
                else:
                    senders = sources_of(len(lengths))
                    for i, n in enumerate(lengths):
                        if n > limit:
                            st.oversize += 1
                            continue
                        burst.append(bytes(view[i * size:i * size + n]))
                        sources.append(senders[i])
                if rx.batched and len(lengths) < rx.slots:
                    break  # drained: no second call just to hear EAGAIN
            if burst:
                st.received += len(burst)
                st.bytes_received += sum(map(len, burst))
                st.last_rx = clock()
                on_datagrams(burst, sources)
            await trio.lowlevel.checkpoint()

    # --- failover -----------------------------------------------------------------------
    def _usable(self, i: int, now: float) -> bool:
        ch = self.channels[i]
        if not ch.link_up:
            return False
        return len(self.channels) == 1 or now - ch.stats.last_rx < self.silence_timeout or (
            ch.stats.last_rx == 0.0)

    def reevaluate(self, now: float) -> None:
        """Pick the active channel: the current one while usable, else the first usable one."""
        if len(self.channels) == 1:
            return
        best = self.active
        if self.failback and self.active != 0 and self._usable(0, now) and (
                self.channels[0].stats.last_rx and now - self.channels[0].stats.last_rx
                < self.silence_timeout):
            best = 0
        elif not self._usable(self.active, now):
            others = [i for i in range(len(self.channels)) if i != self.active
                      and self._usable(i, now)]
            heard = [i for i in others if self.channels[i].stats.last_rx]
            if heard or others:
                best = (heard or others)[0]
        if best != self.active:
            old = self.channels[self.active]
            log.warning("sync channel %s is %s; switching to %s", old.spec.describe(),
                        "down" if not old.link_up else "silent",
                        self.channels[best].spec.describe())
            self.active = best
            self.switches += 1

    async def watch_links(self, clock: Callable[[], float]) -> None:
        """Follow rtnetlink link events for the channels' interfaces."""
        by_index = {ch.ifindex: ch for ch in self.channels if ch.ifindex}
        if not by_index:
            return
        sock = netns.socket_in(self.netns_name, socket.AF_NETLINK, socket.SOCK_RAW,
                               NETLINK_ROUTE)
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
        with sock:
            while True:
                await trio.lowlevel.wait_readable(sock)
                while True:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        break
                    off = 0
                    while off + 16 <= len(data):
                        length, mtype = struct.unpack_from("=IH", data, off)
                        if length < 16:
                            break
                        if mtype in (16, 17) and length >= 32:  # RTM_NEWLINK / RTM_DELLINK
                            index, flags = _IFINFO.unpack_from(data, off + 16)
                            ch = by_index.get(index)
                            if ch is not None:
                                up = mtype == 16 and bool(flags & IFF_RUNNING)
                                if up != ch.link_up:
                                    ch.link_up = up
                                    log.warning("sync link %s is %s", ch.spec.interface,
                                                "up" if up else "down")
                                    self.reevaluate(clock())
                        off += (length + 3) & ~3


def channel_specs(channels: Sequence[ChannelConfig]) -> list[ChannelSpec]:
    """The configured channels (sync.channels) as the transport opens them, in order."""
    specs = []
    for ch in channels:
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
