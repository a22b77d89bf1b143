"""Building our datagrams: space, framing, padding and sealing (aioquic's packet_builder habit).

This module owns how message bytes become one datagram of at most `mtu` bytes: the room a
body has (`body_limit`: the MTU less the header and, with keys, the tag), packing control
messages into as few datagrams as fit, padding (bytes 0xC1 that receivers skip: full resync
datagrams go out at one length for UDP GSO; a NACK is padded so that the retransmissions it
asks for stay within the sender's per-peer byte budget), and the header and tag (`wire.seal`).
What goes in a datagram and in which order is the sender's decision (`sender.py`); what the
bytes mean is `wire.py`'s. No clock, no socket.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import wire
from .outbox import Outbox, Snapshot
from .wire import Message, Nack

_UPDATE, _DESTROY = wire.UPDATE_PREFIX, wire.DESTROY_PREFIX


class StreamBody:
    """The body of one sequenced datagram being filled: message bytes, their size against
    the room, how many messages and flows; `pad` once a full resync's batch filled it."""

    __slots__ = ("count", "flows", "limit", "oversize", "pad", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = self.count = self.flows = self.oversize = 0
        self.pad = False

    def marker(self, b: bytes) -> bool:
        """Add a marker message (RESYNC_BEGIN/END, ALIVE) if it fits."""
        if self.size + len(b) > self.limit:
            return False
        self.parts.append(b)
        self.size += len(b)
        self.count += 1
        return True

    def changes(self, box: Outbox) -> bool:
        """Add `box`'s waiting live changes while they fit; True if one did not."""
        self.size, n, full = box.fill(self.parts, self.size, self.limit, -1, _UPDATE, _DESTROY)
        self.count += n
        self.flows += n
        return full

    def batch(self, box: Snapshot, allowance: int = -1) -> tuple[int, bool]:
        """Add `box`'s next flows as one FLOW_BATCH while they fit (at most `allowance`, -1:
        no limit). Returns (flows added, True if the next did not fit); a full batch pads."""
        msg, n, full = box.fill(self.limit - self.size, allowance)
        if msg is not None:
            self.parts.append(msg)
            self.size += len(msg)
            self.count += 1
            self.flows += n
            self.pad = full
            return n, full
        if full and self.size == 0:
            # not even one flow fits an empty datagram's batch: it goes as a FLOW_UPDATE,
            # which `Sender.put` made sure fits (or, never put, is counted and dropped)
            kv = box.take_one()
            if kv is not None:
                k, v = kv
                need = len(k) + len(v) + len(_UPDATE)
                if need <= self.limit:
                    self.parts += (_UPDATE, k, v)
                    self.size += need
                    self.count += 1
                    self.flows += 1
                    return 1, bool(box)
                self.oversize += 1
            return 0, bool(box)
        return 0, full


class DatagramBuilder:
    __slots__ = ("body_limit", "epoch", "keys", "mtu", "node")

    def __init__(self, node: int, epoch: int, mtu: int, keys: wire.KeyRing) -> None:
        self.node = node
        self.epoch = epoch
        self.mtu = mtu
        self.keys = keys
        self.body_limit = mtu - wire.HEADER_SIZE - (wire.TAG_SIZE if keys.keys else 0)

    def fits(self, need: int) -> bool:
        """Can a message of `need` bytes go in a datagram at all?"""
        return need <= self.body_limit

    def body(self) -> StreamBody:
        return StreamBody(self.body_limit)

    def stream(self, body: StreamBody, seq: int, first_lap: bool) -> bytes:
        """The sequenced datagram `seq` carrying `body`; a body a full batch filled is padded
        to the MTU (runs of full datagrams leave as one GSO send)."""
        parts = body.parts
        if body.pad and body.size < self.body_limit:
            parts.append(wire.PAD * (self.body_limit - body.size))
        flags = wire.SEQUENCED | (wire.FIRST_LAP if first_lap else 0)
        return wire.seal(flags, self.node, self.epoch, seq, body.count, b"".join(parts),
                         self.keys)

    def control(self, msgs: Iterable[Message], seq: int, first_lap: bool,
                nack_pad: float = 0.0) -> list[bytes]:
        """Unsequenced datagrams carrying `msgs`, packed to fit; their header seq is `seq`
        (our newest). A datagram holding NACKs is padded to at least 1/`nack_pad` of the
        bytes those NACKs may cost the peer to retransmit (0: no padding), up to the MTU."""
        out: list[bytes] = []
        parts: list[bytes] = []
        size = 0
        want = 0  # bytes of retransmission the NACKs in `parts` ask for
        flags = wire.FIRST_LAP if first_lap else 0
        limit = self.body_limit
        for m in msgs:
            b = wire.encode_message(m)
            if parts and size + len(b) > limit:
                out.append(self._control(parts, size, want, nack_pad, seq, flags))
                parts, size, want = [], 0, 0
            parts.append(b)
            size += len(b)
            if nack_pad and isinstance(m, Nack):
                want += sum((b - a) % (1 << 32) + 1 for a, b in m.ranges) * self.mtu
        if parts:
            out.append(self._control(parts, size, want, nack_pad, seq, flags))
        return out

    def _control(self, parts: list[bytes], size: int, want: int, nack_pad: float, seq: int,
                 flags: int) -> bytes:
        count = len(parts)
        if want and nack_pad:
            target = min(self.body_limit, int(want / nack_pad) + 1)
            if target > size:
                parts.append(wire.PAD * (target - size))
        return wire.seal(flags, self.node, self.epoch, seq, count, b"".join(parts), self.keys)
