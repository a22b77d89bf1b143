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
from .wire import Message, Nack


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

    def stream(self, parts: list[bytes], size: int, count: int, seq: int, first_lap: bool,
               pad: bool) -> bytes:
        """A sequenced datagram from message bytes `parts` (`size` bytes, `count` messages);
        `pad`: fill it to the MTU (runs of full datagrams leave as one GSO send)."""
        if pad and size < self.body_limit:
            parts.append(wire.PAD * (self.body_limit - size))
        flags = wire.SEQUENCED | (wire.FIRST_LAP if first_lap else 0)
        return wire.seal(flags, self.node, self.epoch, seq, count, b"".join(parts), self.keys)

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
