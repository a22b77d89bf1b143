"""The replication datagram: header, msgpack body, authentication tag (proto/PROTOCOL.md).

This module owns the bytes on the sync link and nothing else: encoding datagrams, checking
their tag, and `decode_untrusted`, the only parser of received bytes, which raises exactly one
error type (`BadDatagram`, with a machine-readable `reason` for counters). It keeps no state,
reads no clock and decides nothing about reliability (that is `engine.py`/`ftfw.py`).

Flow keys and values are the packed forms of `flow.py` and cross the wire as raw msgpack,
embedded in the message arrays without being unpacked or re-packed (FLOW_UPDATE), or as
msgpack bin strings holding those bytes (FLOW_BATCH, which msgpack's C unpacker splits in one
call: a full resync's bulk). A decoded flow message is the tuple `(key bytes, value bytes)`
(or `(key bytes, None)` for a destroy) that the caches store as is. The decoder checks only
that each is a msgpack array (FLOW_UPDATE: one well-formed array; FLOW_BATCH: bytes that start
with an array header); what the arrays mean is checked where they are used (`flow.unpack_flow`
and the commit, which skip and count what does not unpack).
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag, StrEnum

import msgpack

MAGIC = b"CT"
VERSION = 1
HEADER = struct.Struct("!2sBBBIIIH")  # magic version flags key_id node epoch seq count
HEADER_SIZE = HEADER.size  # 19
TAG_SIZE = 16
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4
MAX_MESSAGES = 0xFFFF
MAX_NACK_RANGES = 64
ALL_NODES = 0  # RESYNC_REQUEST target meaning "every node"
KEY_MIN, KEY_MAX = 16, 64  # BLAKE2b key length bounds we accept


class Flag(IntFlag):
    TAGGED = 0x01  # a 16-byte BLAKE2b tag follows the body; key_id names the key
    SEQUENCED = 0x02  # this datagram occupies `seq` in the sender's reliable stream
    FIRST_LAP = 0x04  # the sender's sequence has not wrapped: its stream began at seq 1


class Kind(IntEnum):
    """Message kinds. 0-15 are stream messages (sequenced datagrams only), 16-127 control
    messages (unsequenced datagrams only). Any other value is skipped as unknown."""

    FLOW_UPDATE = 0  # [0, key, value]
    FLOW_DESTROY = 1  # [1, key]
    RESYNC_BEGIN = 2  # [2]
    RESYNC_END = 3  # [3]
    ALIVE = 4  # [4]
    FLOW_BATCH = 5  # [5, [key, value, key, value, ...]] (keys and values as bin)
    ACK = 16  # [16, target node, target epoch, seq]
    NACK = 17  # [17, target node, target epoch, [first, last, first, last, ...]]
    RESYNC_REQUEST = 18  # [18, target node or 0, target epoch or 0, from seq or 0]


MARKERS = (Kind.RESYNC_BEGIN, Kind.RESYNC_END, Kind.ALIVE)

# plain ints for the hot paths (IntFlag arithmetic costs a Python call per operation)
TAGGED, SEQUENCED, FIRST_LAP = int(Flag.TAGGED), int(Flag.SEQUENCED), int(Flag.FIRST_LAP)


class Reason(StrEnum):
    """Why `decode_untrusted` refused a datagram (stable names: they label counters)."""

    SHORT = "short"
    TOO_LONG = "too_long"
    MAGIC = "magic"
    VERSION = "version"
    UNTAGGED = "untagged"  # we have keys, the datagram has no tag
    UNEXPECTED_TAG = "unexpected_tag"  # we have no keys, the datagram has a tag
    UNKNOWN_KEY = "unknown_key"  # no configured key has the datagram's key id
    BAD_TAG = "bad_tag"
    MALFORMED = "malformed"
    MISPLACED = "misplaced"  # a stream message unsequenced, or a control message sequenced
    TRAILING = "trailing"  # bytes after the last message

    @property
    def is_auth(self) -> bool:
        return self in _AUTH_REASONS


_AUTH_REASONS = frozenset({Reason.UNTAGGED, Reason.UNEXPECTED_TAG, Reason.UNKNOWN_KEY,
                           Reason.BAD_TAG})


class BadDatagram(Exception):
    """A received datagram that must be dropped; `reason` is one of `Reason`."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Ack:
    """Receiver `target`'s stream of epoch `epoch` is delivered up to `seq` inclusive."""

    target: int
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """Receiver asks `target` (epoch `epoch`) to resend these inclusive seq ranges."""

    target: int
    epoch: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """Ask `target` (0 = every node) for a full resync. `epoch`/`from_seq` say where the
    requester stands in the target's stream (0/0 when it has not heard it)."""

    target: int
    epoch: int
    from_seq: int


FlowMessage = tuple[bytes, bytes | None]  # (key, value) update or (key, None) destroy
Message = FlowMessage | Kind | Ack | Nack | ResyncRequest


@dataclass(frozen=True, slots=True)
class Datagram:
    """A decoded, authenticated datagram.

    `messages` holds flow messages as plain tuples (the hot path allocates nothing else),
    markers as `Kind` members and control messages as `Ack`/`Nack`/`ResyncRequest`.
    `n_flows == len(messages)` means the datagram carries flow messages only; `markers` has
    bit `1 << kind` set for each marker kind present, and for FLOW_BATCH (a full resync's
    bulk: the receiver sees a bracket progress); `unknown` counts messages of unknown
    kinds plus known messages with extra (newer) fields, all skipped.
    """

    node: int
    epoch: int
    seq: int
    flags: int
    key_id: int
    messages: list[Message]
    n_flows: int
    markers: int
    unknown: int

    @property
    def sequenced(self) -> bool:
        return bool(self.flags & SEQUENCED)

    @property
    def first_lap(self) -> bool:
        return bool(self.flags & FIRST_LAP)


# --- keys ----------------------------------------------------------------------------------

def key_id(key: bytes) -> int:
    """The one-byte id naming `key` in headers, derived from the key so nodes need not agree
    on an order of their keys (a keyed hash: it reveals nothing about the key)."""
    return hashlib.blake2b(b"conntrackd-py sync key id", key=key, digest_size=1).digest()[0]


class KeyRing:
    """The keys a node accepts; the first one signs what it sends (rotation: add the new key
    second everywhere, then make it first everywhere, then remove the old one)."""

    __slots__ = ("_by_id", "keys", "primary")

    def __init__(self, keys: Sequence[bytes] = ()) -> None:
        for k in keys:
            if not KEY_MIN <= len(k) <= KEY_MAX:
                raise ValueError(f"sync keys must be {KEY_MIN}-{KEY_MAX} bytes, got {len(k)}")
        if len(set(keys)) != len(keys):
            raise ValueError("sync keys must be distinct")
        self.keys = tuple(keys)
        self.primary: tuple[int, bytes] | None = (key_id(keys[0]), keys[0]) if keys else None
        self._by_id: dict[int, list[bytes]] = {}
        for k in self.keys:
            self._by_id.setdefault(key_id(k), []).append(k)

    def candidates(self, kid: int) -> list[bytes]:
        return self._by_id.get(kid, [])


def _tag(key: bytes, signed: bytes) -> bytes:
    return hashlib.blake2b(signed, key=key, digest_size=TAG_SIZE).digest()


# --- encoding ------------------------------------------------------------------------------

UPDATE_PREFIX = b"\x93\x00"  # fixarray(3), FLOW_UPDATE; then raw key, raw value
DESTROY_PREFIX = b"\x92\x01"  # fixarray(2), FLOW_DESTROY; then raw key
FLOW_OVERHEAD = 2
MARKER_BYTES = {k: bytes((0x91, k)) for k in MARKERS}
# a body may end with padding: bytes 0xC1, which msgpack never uses (datagrams of one length
# go out many per system call: UDP GSO)
PAD = b"\xc1"

_IS_ARRAY = bytes(1 if (0x90 <= b <= 0x9F or b in (0xDC, 0xDD)) else 0 for b in range(256))
_ARRAY_STARTS = bytes(b for b in range(256) if _IS_ARRAY[b])
_FIRST_BYTE = operator.itemgetter(0)
# FLOW_BATCH framing: fixarray(2), kind 5, then the list's header (1 byte up to 15 items, 3 up
# to 65535); each key or value is a bin8 (2 bytes of header up to 255 bytes, bin16 3 beyond)
BATCH_FRAMING_MAX = 5
BATCH_PAIR_OVERHEAD = 4
_batch_packer = msgpack.Packer(use_bin_type=True)


def is_packed_array(data: bytes) -> bool:
    """True if `data` starts like a msgpack array (what flow keys and values must be)."""
    return bool(data) and bool(_IS_ARRAY[data[0]])


def encode_batch(flat: list[bytes]) -> bytes:
    """A FLOW_BATCH message: `flat` is [key, value, key, value, ...] (packed flows)."""
    return _batch_packer.pack([Kind.FLOW_BATCH.value, flat])  # type: ignore[no-any-return]


def batch_size(flat: Sequence[bytes]) -> int:
    """The exact length of `encode_batch(flat)`, without building it."""
    n = len(flat)
    return (2 + (1 if n <= 15 else 3) + sum(map(len, flat)) + 2 * n
            + sum(map((255).__lt__, map(len, flat))))


def encode_message(m: Message | list[FlowMessage]) -> bytes:
    """One message as body bytes. Flow keys/values are embedded as they are (raw msgpack);
    a list of (key, value) updates becomes one FLOW_BATCH."""
    if type(m) is list:
        return encode_batch([x for kv in m for x in kv])  # type: ignore[misc]
    if type(m) is tuple:
        k, v = m
        return DESTROY_PREFIX + k if v is None else UPDATE_PREFIX + k + v
    if isinstance(m, Kind):
        return MARKER_BYTES[m]
    if isinstance(m, Ack):
        return msgpack.packb([Kind.ACK, m.target, m.epoch, m.seq])  # type: ignore[no-any-return]
    if isinstance(m, Nack):
        flat = [s for r in m.ranges for s in r]
        return msgpack.packb([Kind.NACK, m.target, m.epoch, flat])  # type: ignore[no-any-return]
    if isinstance(m, ResyncRequest):
        return msgpack.packb(  # type: ignore[no-any-return]
            [Kind.RESYNC_REQUEST, m.target, m.epoch, m.from_seq])
    raise TypeError(f"not a message: {m!r}")


def seal(flags: int, node: int, epoch: int, seq: int, count: int, body: bytes,
         keys: KeyRing | None) -> bytes:
    """Header + body (+ tag with the primary key, when `keys` has one)."""
    primary = keys.primary if keys is not None else None
    if primary is None:
        return HEADER.pack(MAGIC, VERSION, flags & ~TAGGED, 0, node, epoch, seq,
                           count) + body
    kid, key = primary
    signed = HEADER.pack(MAGIC, VERSION, flags | TAGGED, kid, node, epoch, seq,
                         count) + body
    return signed + _tag(key, signed)


def encode_datagram(node: int, epoch: int, seq: int,
                    messages: Iterable[Message | list[FlowMessage]], *,
                    sequenced: bool, first_lap: bool,
                    keys: KeyRing | Sequence[bytes] = ()) -> bytes:
    """A whole datagram (the general, slower path: control datagrams, vectors, tests)."""
    ring = keys if isinstance(keys, KeyRing) else KeyRing(keys)
    parts = [encode_message(m) for m in messages]
    flags = (SEQUENCED if sequenced else 0) | (FIRST_LAP if first_lap else 0)
    return seal(flags, node, epoch, seq, len(parts), b"".join(parts), ring)


# --- decoding ------------------------------------------------------------------------------

def _u32(x: object) -> int:
    if type(x) is not int or not 0 <= x <= 0xFFFFFFFF:
        raise BadDatagram(Reason.MALFORMED, "expected a 32-bit unsigned integer")
    return x


def _ranges(x: object) -> tuple[tuple[int, int], ...]:
    if type(x) is not list or len(x) % 2 or len(x) > 2 * MAX_NACK_RANGES:
        raise BadDatagram(Reason.MALFORMED, "NACK ranges must be a list of pairs")
    v = [_u32(s) for s in x]
    return tuple(zip(v[0::2], v[1::2], strict=True))


def decode_untrusted(data: bytes, keys: KeyRing | Sequence[bytes] = ()) -> Datagram:
    """Parse and authenticate received bytes; raise only `BadDatagram`.

    With keys configured a datagram must carry a valid tag under one of them; without keys it
    must carry none. The tag is checked before the body is parsed.
    """
    ring = keys if isinstance(keys, KeyRing) else KeyRing(keys)
    n = len(data)
    if n < HEADER_SIZE:
        raise BadDatagram(Reason.SHORT, f"{n} bytes")
    if n > MAX_DATAGRAM:
        raise BadDatagram(Reason.TOO_LONG, f"{n} bytes")
    magic, version, flags, kid, node, epoch, seq, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadDatagram(Reason.MAGIC)
    if version != VERSION:
        raise BadDatagram(Reason.VERSION, f"version {version}")
    end = n
    if flags & TAGGED:
        if not ring.keys:
            raise BadDatagram(Reason.UNEXPECTED_TAG)
        end = n - TAG_SIZE
        if end < HEADER_SIZE:
            raise BadDatagram(Reason.SHORT, "no room for the tag")
        cands = ring.candidates(kid)
        if not cands:
            raise BadDatagram(Reason.UNKNOWN_KEY, f"key id {kid}")
        signed, tag = data[:end], data[end:]
        for k in cands:
            if hmac.compare_digest(_tag(k, signed), tag):
                break
        else:
            raise BadDatagram(Reason.BAD_TAG)
    elif ring.keys:
        raise BadDatagram(Reason.UNTAGGED)
    if node == 0 or epoch == 0:
        raise BadDatagram(Reason.MALFORMED, "node id and epoch 0 are reserved")
    body = data[HEADER_SIZE:end]
    msgs, n_flows, markers, unknown = _parse_body(body, count, bool(flags & SEQUENCED))
    return Datagram(node, epoch, seq, flags, kid, msgs, n_flows, markers, unknown)


_BATCH_BIT = 1 << Kind.FLOW_BATCH


def _split_batch(items: object) -> Iterator[FlowMessage]:
    """The (key, value) updates of a FLOW_BATCH's list, checked with C-speed passes only."""
    if type(items) is not list or not items or len(items) & 1:
        raise BadDatagram(Reason.MALFORMED, "a flow batch must be a list of key, value pairs")
    try:
        b"".join(items)  # TypeError unless every item is bytes (msgpack bin)
        firsts = bytes(map(_FIRST_BYTE, items))  # IndexError for an empty one
    except (TypeError, IndexError):
        raise BadDatagram(Reason.MALFORMED, "flow batch keys and values must be non-empty "
                          "bytes") from None
    if firsts.translate(None, _ARRAY_STARTS):
        raise BadDatagram(Reason.MALFORMED, "flow keys and values must be arrays")
    it = iter(items)
    return zip(it, it, strict=True)


def _parse_body(body: bytes, count: int, sequenced: bool) -> tuple[list[Message], int, int, int]:
    blen = len(body)
    u = msgpack.Unpacker(raw=False, max_buffer_size=max(blen, 1))
    u.feed(body)
    rah, unp, tell, skip, read = u.read_array_header, u.unpack, u.tell, u.skip, u.read_bytes
    is_array = _IS_ARRAY
    peek = body + PAD  # 0xC1 is never used by msgpack: indexing at the end is safe
    msgs: list[Message] = []
    append = msgs.append
    n_flows = markers = unknown = 0
    pos = 0  # where the next message starts
    try:
        for _ in range(count):
            if peek[pos] == 0x93 and peek[pos + 1] == 0 and sequenced:
                # the hot path, read by position: [0, key, value], a plain FLOW_UPDATE
                read(2)
                a = pos + 2
                if not is_array[peek[a]]:
                    raise BadDatagram(Reason.MALFORMED, "flow key must be an array")
                skip()
                b = tell()
                if not is_array[peek[b]]:
                    raise BadDatagram(Reason.MALFORMED, "flow value must be an array")
                skip()
                pos = tell()
                append((body[a:b], body[b:pos]))
                n_flows += 1
                continue
            ln = rah()
            if ln == 0:
                raise BadDatagram(Reason.MALFORMED, "empty message")
            kind = unp()
            if type(kind) is not int:
                raise BadDatagram(Reason.MALFORMED, "message kind must be an integer")
            if 0 <= kind <= 1:  # FLOW_UPDATE with extra fields, FLOW_DESTROY
                if not sequenced:
                    raise BadDatagram(Reason.MISPLACED, "flow message in a control datagram")
                if ln < 3 - kind:
                    raise BadDatagram(Reason.MALFORMED, "flow message too short")
                a = tell()
                if not is_array[peek[a]]:
                    raise BadDatagram(Reason.MALFORMED, "flow key must be an array")
                skip()
                b = tell()
                if kind == 0:
                    if not is_array[peek[b]]:
                        raise BadDatagram(Reason.MALFORMED, "flow value must be an array")
                    skip()
                    append((body[a:b], body[b:tell()]))
                    extra = ln - 3
                else:
                    append((body[a:b], None))
                    extra = ln - 2
                n_flows += 1
            elif kind == Kind.FLOW_BATCH:
                if not sequenced:
                    raise BadDatagram(Reason.MISPLACED, "flow message in a control datagram")
                if ln < 2:
                    raise BadDatagram(Reason.MALFORMED, "flow batch without its list")
                items = unp()
                msgs += _split_batch(items)
                n_flows += len(items) >> 1
                markers |= _BATCH_BIT
                extra = ln - 2
            elif 2 <= kind <= 4:
                if not sequenced:
                    raise BadDatagram(Reason.MISPLACED, "stream marker in a control datagram")
                markers |= 1 << kind
                append(Kind(kind))
                extra = ln - 1
            elif 16 <= kind <= 18:
                if sequenced:
                    raise BadDatagram(Reason.MISPLACED, "control message in a stream datagram")
                if ln < 4:
                    raise BadDatagram(Reason.MALFORMED, "control message too short")
                target, epoch, third = _u32(unp()), _u32(unp()), unp()
                if kind == Kind.ACK:
                    append(Ack(target, epoch, _u32(third)))
                elif kind == Kind.NACK:
                    append(Nack(target, epoch, _ranges(third)))
                else:
                    append(ResyncRequest(target, epoch, _u32(third)))
                extra = ln - 4
            else:  # a kind from a newer version: skip the whole message
                unknown += 1
                for _ in range(ln - 1):
                    skip()
                pos = tell()
                continue
            if extra:  # fields added by a newer version: skip them
                unknown += 1
                for _ in range(extra):
                    skip()
            pos = tell()
        end = tell()
        if end != blen and body.count(PAD, end) != blen - end:
            raise BadDatagram(Reason.TRAILING, f"{blen - end} bytes after the last message")
    except (ValueError, msgpack.UnpackException) as e:
        raise BadDatagram(Reason.MALFORMED, str(e)[:80]) from None
    return msgs, n_flows, markers, unknown
