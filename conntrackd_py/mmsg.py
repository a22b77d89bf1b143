"""Many datagrams per system call: recvmmsg(2) and sendmmsg(2) through ctypes, and UDP GSO.

The socket module binds neither call. Netlink delivers every conntrack event as a datagram of
its own, and the sync link carries thousands of datagrams per second under load; one system
call each was a third of event ingestion's cost. Without the calls in libc (a libc other than
glibc or musl) both classes fall back to one recv/sendto per datagram.

Datagrams of one length in a row (a full resync pads its full datagrams to the MTU) go out
as one buffer with UDP_SEGMENT (Linux 4.18+): the kernel cuts it into those datagrams after
a single pass through the stack, which receivers cannot tell from separate sends. Where the
kernel or the device refuses it, the sender falls back to sendmmsg for good.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from typing import Any


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IOVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _libc(name: str) -> Any:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int] + (
        [ctypes.c_void_p] if name == "recvmmsg" else [])
    fn.restype = ctypes.c_int
    return fn


_recvmmsg = _libc("recvmmsg")
_sendmmsg = _libc("sendmmsg")
MSG_DONTWAIT = 0x40
UDP_SEGMENT = 103  # linux/udp.h
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of older kernels (newer ones allow 128)
GSO_MAX_BYTES = 65000  # below the 65507-byte UDP payload limit of one (IPv4) send
_NAME_SIZE = 28  # sizeof(struct sockaddr_in6), the larger of the two
_FAMILY = struct.Struct("=H")


def _oserror() -> OSError:
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
        return BlockingIOError(err, os.strerror(err))
    return OSError(err, os.strerror(err))


class MultiReceiver:
    """recvmmsg on a non-blocking socket: up to `slots` datagrams per call. Datagram i of a
    call lands at `view[i * slot_size:]`; a longer one is cut to `slot_size`. With `names`,
    `source(i)` is datagram i's sender address as text (the kernel fills msg_name in the
    same call: no extra system call)."""

    def __init__(self, sock: socket.socket, slots: int = 64, slot_size: int = 16384,
                 names: bool = False) -> None:
        self.sock, self.slots, self.slot_size = sock, slots, slot_size
        self.buf = bytearray(slots * slot_size)
        self.view = memoryview(self.buf)
        self._fd = sock.fileno()
        self._hdrs: Any = None
        self._names = bytearray(slots * _NAME_SIZE) if names else None
        self._texts: dict[bytes, str] = {}
        self._last: list[str | None] = []
        #: True when a call returning fewer than `slots` datagrams means the queue was empty
        #: (recvmmsg); the fallback returns one per call
        self.batched = _recvmmsg is not None
        if _recvmmsg is not None:
            base = ctypes.addressof((ctypes.c_char * len(self.buf)).from_buffer(self.buf))
            names_base = (ctypes.addressof((ctypes.c_char * len(self._names)).from_buffer(
                self._names)) if self._names is not None else 0)
            self._iov = (_IOVec * slots)()
            self._hdrs = (_MMsgHdr * slots)()
            for i in range(slots):
                self._iov[i].iov_base = base + i * slot_size
                self._iov[i].iov_len = slot_size
                self._hdrs[i].msg_hdr.msg_iov = ctypes.pointer(self._iov[i])
                self._hdrs[i].msg_hdr.msg_iovlen = 1
                if names_base:
                    self._hdrs[i].msg_hdr.msg_name = names_base + i * _NAME_SIZE
                    self._hdrs[i].msg_hdr.msg_namelen = _NAME_SIZE

    def recv(self) -> list[int]:
        """The lengths of the datagrams received now (at least one); BlockingIOError when
        there is none, OSError (ENOBUFS: an overrun) as recv would raise it."""
        if self._hdrs is None:
            if self._names is None:
                return [self.sock.recv_into(self.buf, self.slot_size)]
            n, addr = self.sock.recvfrom_into(self.buf, self.slot_size)
            self._last = [str(addr[0])]
            return [n]
        n = _recvmmsg(self._fd, self._hdrs, self.slots, MSG_DONTWAIT, None)
        if n < 0:
            raise _oserror()
        hdrs = self._hdrs
        return [hdrs[i].msg_len for i in range(n)]

    def sources(self, n: int) -> list[str | None]:
        """The senders of the first `n` datagrams of the last `recv()` (needs `names`), as
        text: one copy of the address area, then a dict lookup per datagram (a sync link has
        a handful of senders; the cache is bounded against spoofed ones)."""
        names = self._names
        if names is None or not n:
            return [None] * n
        if self._hdrs is None:
            return list(self._last[:n])
        raw = bytes(names[:n * _NAME_SIZE])
        texts = self._texts
        v4 = _FAMILY.unpack_from(raw)[0] == socket.AF_INET
        first = raw[:_NAME_SIZE]
        if raw == first * n:  # one sender (a peer's burst): no step per datagram
            addr = first[4:8] if v4 else first[8:24]
            text = texts.get(addr)
            if text is None:
                text = self._text(addr)
            return [text] * n
        out: list[str | None] = []
        for off in range(0, n * _NAME_SIZE, _NAME_SIZE):
            addr = raw[off + 4:off + 8] if v4 else raw[off + 8:off + 24]
            text = texts.get(addr)
            if text is None:
                text = self._text(addr)
            out.append(text)
        return out

    def _text(self, addr: bytes) -> str:
        texts = self._texts
        if len(texts) > 4096:  # spoofed sources: keep the cache bounded
            texts.clear()
        text = texts[addr] = socket.inet_ntop(
            socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)
        return text


def sockaddr(dest: tuple[Any, ...]) -> bytes:
    """struct sockaddr_in/_in6 for a sendto()-style (host, port[, flowinfo, scope]) tuple."""
    host, port = dest[0], dest[1]
    if ":" in host:
        flow, scope = (dest[2], dest[3]) if len(dest) >= 4 else (0, 0)
        return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, flow)
                + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", scope))
    return (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
            + socket.inet_aton(host) + bytes(8))


class MultiSender:
    """sendmmsg of many datagrams to one destination (`dest` as sendto takes it); runs of
    datagrams of one length as one UDP GSO send (`gso`: False once the kernel refused it)."""

    def __init__(self, sock: socket.socket, dest: tuple[Any, ...], slots: int = 64,
                 gso: bool = True) -> None:
        self.sock, self.dest, self.slots = sock, dest, slots
        self.gso = gso and sock.type == socket.SOCK_DGRAM and sock.family in (
            socket.AF_INET, socket.AF_INET6)
        #: datagrams that left in GSO sends (for `-s link`)
        self.gso_sent = 0
        self._fd = sock.fileno()
        self._name = ctypes.create_string_buffer(sockaddr(dest))
        self._iov = (_IOVec * slots)()
        self._hdrs = (_MMsgHdr * slots)()
        for i in range(slots):
            h = self._hdrs[i].msg_hdr
            h.msg_name = ctypes.addressof(self._name)
            h.msg_namelen = len(self._name.raw)
            h.msg_iov = ctypes.pointer(self._iov[i])
            h.msg_iovlen = 1

    def send(self, datagrams: list[bytes], start: int = 0) -> int:
        """Send `datagrams[start:]` (at most `slots` of them); returns how many went (at least
        one), or raises the error of the first as sendto would."""
        if start == len(datagrams) - 1:
            # one datagram (the latency case: a single live update): plain sendto, no ctypes
            self.sock.sendto(datagrams[start], self.dest)
            return 1
        if self.gso:
            size = len(datagrams[start])
            end = min(len(datagrams), start + GSO_MAX_SEGMENTS, start + GSO_MAX_BYTES // size)
            run = start + 1
            while run < end and len(datagrams[run]) == size:
                run += 1
            if run < end and len(datagrams[run]) < size:
                run += 1  # the last segment may be shorter
            if run - start >= 2:
                try:
                    self.sock.sendmsg([b"".join(datagrams[start:run])],
                                      [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
                                      0, self.dest)
                    self.gso_sent += run - start
                    return run - start
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT,
                                       errno.EIO):
                        raise
                    self.gso = False  # not here: sendmmsg from now on
        if _sendmmsg is None:
            self.sock.sendto(datagrams[start], self.dest)
            return 1
        chunk = datagrams[start:start + self.slots]
        iov = self._iov
        for i, d in enumerate(chunk):  # the bytes objects outlive the call: the caller's list
            iov[i].iov_base = ctypes.cast(ctypes.c_char_p(d), ctypes.c_void_p).value
            iov[i].iov_len = len(d)
        n = _sendmmsg(self._fd, self._hdrs, len(chunk), MSG_DONTWAIT)
        if n < 0:
            raise _oserror()
        return int(n)
