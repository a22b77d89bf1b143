"""The Flow model shared by every layer, and its compact packed form.

This module owns what a conntrack entry *is* inside conntrackd-py: the tuples, the replicated
state, and the two byte forms every cache and the wire use (a packed key and a packed value).
It must not do I/O, read a clock or import trio.

Addresses are kept as raw network-order bytes (4 or 16 long) on the hot path; `ipaddress`
objects are made only for display. Unknown layer-4 protocols keep their raw tuple attributes in
`Tuple.opaque` so they survive a decode/encode round trip untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum, IntFlag
from socket import inet_ntop
from typing import Any, NamedTuple

import msgpack

AF_INET = 2
AF_INET6 = 10


class Proto(IntEnum):
    ICMP = 1
    TCP = 6
    UDP = 17
    DCCP = 33
    GRE = 47
    ICMPV6 = 58
    SCTP = 132
    UDPLITE = 136


#: protocols whose tuples carry ports (GRE carries its keys in the same attributes)
PORT_PROTOS = frozenset({6, 17, 33, 47, 132, 136})
ICMP_PROTOS = frozenset({1, 58})


class Status(IntFlag):
    """IPS_* bits of `enum ip_conntrack_status` (uapi/linux/netfilter/nf_conntrack_common.h)."""

    EXPECTED = 1 << 0
    SEEN_REPLY = 1 << 1
    ASSURED = 1 << 2
    CONFIRMED = 1 << 3
    SRC_NAT = 1 << 4
    DST_NAT = 1 << 5
    SEQ_ADJUST = 1 << 6
    SRC_NAT_DONE = 1 << 7
    DST_NAT_DONE = 1 << 8
    DYING = 1 << 9
    FIXED_TIMEOUT = 1 << 10
    TEMPLATE = 1 << 11
    UNTRACKED = 1 << 12
    HELPER = 1 << 13
    OFFLOAD = 1 << 14
    HW_OFFLOAD = 1 << 15


# plain ints for hot paths (IntFlag arithmetic is slow)
_SEEN_REPLY = int(Status.SEEN_REPLY)
_ASSURED = int(Status.ASSURED)


class TcpState(IntEnum):
    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


#: IP_CT_TCP_FLAG_BE_LIBERAL: don't check TCP windows for this direction
TCP_FLAG_BE_LIBERAL = 0x08


def addr_text(addr: bytes) -> str:
    """An address as `conntrack -L` prints it (inet_ntop: a C call, unlike ipaddress)."""
    return inet_ntop(AF_INET if len(addr) == 4 else AF_INET6, addr)


class Tuple(NamedTuple):
    """One direction of a connection: addresses as raw bytes, layer-4 identifiers as ints.

    For TCP/UDP/SCTP/DCCP/UDPLITE `sport`/`dport` are ports; for GRE they are the keys; for
    ICMP/ICMPv6 `icmp_id`, `icmp_type` and `icmp_code` are used. `opaque` holds the raw
    CTA_TUPLE_PROTO payload of a protocol this code does not understand.
    """

    src: bytes
    dst: bytes
    proto: int
    sport: int = 0
    dport: int = 0
    icmp_id: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    opaque: bytes = b""

    @property
    def family(self) -> int:
        return AF_INET if len(self.src) == 4 else AF_INET6

    def invert(self) -> Tuple:
        """The tuple of the other direction, as the kernel computes it without NAT."""
        itype = self.icmp_type
        if self.proto in ICMP_PROTOS:
            itype = _ICMP_INVERSE.get((self.proto, itype), itype)
        return Tuple(
            self.dst, self.src, self.proto, self.dport, self.sport,
            self.icmp_id, itype, self.icmp_code, self.opaque,
        )

    def format(self) -> str:
        """`conntrack -L`-style text: `src=.. dst=.. sport=.. dport=..`."""
        s = f"src={addr_text(self.src)} dst={addr_text(self.dst)}"
        if self.proto in PORT_PROTOS:
            if self.proto == Proto.GRE:
                return f"{s} srckey=0x{self.sport:x} dstkey=0x{self.dport:x}"
            return f"{s} sport={self.sport} dport={self.dport}"
        if self.proto in ICMP_PROTOS:
            return f"{s} type={self.icmp_type} code={self.icmp_code} id={self.icmp_id}"
        return s


# echo request <-> reply, timestamp, info, address mask (v4); echo request/reply, node info (v6)
_ICMP_INVERSE = {
    (1, 8): 0, (1, 0): 8, (1, 13): 14, (1, 14): 13, (1, 15): 16, (1, 16): 15,
    (1, 17): 18, (1, 18): 17,
    (58, 128): 129, (58, 129): 128, (58, 139): 140, (58, 140): 139,
}


class Counters(NamedTuple):
    orig_packets: int
    orig_bytes: int
    reply_packets: int
    reply_bytes: int


class Flow(NamedTuple):
    """A conntrack entry: everything replicated plus what the kernel reports only locally.

    A NamedTuple rather than a frozen dataclass: it is built per kernel event, and a frozen
    dataclass's __init__ (one object.__setattr__ per field) was measured at a third of the
    decode cost.

    `counters`, `start_ns`/`stop_ns` and `ct_id` are never replicated (the kernel cannot set
    them); they feed accounting. `timeout` is in seconds, as the kernel reports it.
    """

    orig: Tuple
    reply: Tuple
    status: int = 0
    timeout: int = 0
    mark: int = 0
    zone: int = 0
    state: int | None = None  # TCP/SCTP/DCCP protocol state
    tcp_flags_orig: int = 0
    tcp_flags_reply: int = 0
    tcp_wscale_orig: int = 0
    tcp_wscale_reply: int = 0
    labels: bytes = b""
    helper: str = ""
    master: Tuple | None = None
    secmark: int = 0
    ct_id: int = 0
    counters: Counters | None = None
    start_ns: int = 0
    stop_ns: int = 0

    # --- derived NAT view -----------------------------------------------------------------
    @property
    def key(self) -> tuple[int, Tuple]:
        return (self.zone, self.orig)

    @property
    def is_snat(self) -> bool:
        return bool(self.status & 0x10)  # IPS_SRC_NAT (int: IntFlag math is slow)

    @property
    def is_dnat(self) -> bool:
        return bool(self.status & 0x20)  # IPS_DST_NAT

    @property
    def snat_to(self) -> tuple[bytes, int] | None:
        """Address and port the source is rewritten to (the reply tuple's destination)."""
        if not self.is_snat:
            return None
        return (self.reply.dst, self.reply.dport)

    @property
    def dnat_to(self) -> tuple[bytes, int] | None:
        """Address and port the destination is rewritten to (the reply tuple's source)."""
        if not self.is_dnat:
            return None
        return (self.reply.src, self.reply.sport)

    @property
    def proto(self) -> int:
        return self.orig.proto

    def with_(self, **changes: Any) -> Flow:
        return self._replace(**changes)

    def format(self) -> str:
        """One `conntrack -L`-style line."""
        p = self.orig.proto
        name = Proto(p).name.lower() if p in Proto._value2member_map_ else "unknown"
        parts = [f"{name:<8}{p:<2}", str(self.timeout)]
        if self.state is not None and p == Proto.TCP:
            parts.append(TcpState(self.state).name if self.state in TcpState._value2member_map_
                         else str(self.state))
        parts.append(self.orig.format())
        if self.counters:
            parts.append(f"packets={self.counters.orig_packets} bytes={self.counters.orig_bytes}")
        if not self.status & _SEEN_REPLY:
            parts.append("[UNREPLIED]")
        parts.append(self.reply.format())
        if self.counters:
            parts.append(
                f"packets={self.counters.reply_packets} bytes={self.counters.reply_bytes}"
            )
        if self.status & _ASSURED:
            parts.append("[ASSURED]")
        parts.append(f"mark={self.mark}")
        if self.zone:
            parts.append(f"zone={self.zone}")
        if self.helper:
            parts.append(f"helper={self.helper}")
        parts.append("use=1")
        return " ".join(parts)


# --- the packed forms ----------------------------------------------------------------------
#
# key   = msgpack [zone, src, dst, proto, sport, dport, icmp_id, icmp_type, icmp_code, opaque]
# value = msgpack [reply (nil = orig.invert(); [dst, dport] = SNAT; [src, sport, dst, dport];
#                  or the 9 fields), status, timeout,
#                  mark, state, tcp flags o/r,
#                  wscale o/r, labels, helper, master tuple or nil, secmark]
#
# Both are what the caches store and what a flow message on the wire carries, so a flow is
# packed once when it enters the node and its bytes are reused from then on.

_packer = msgpack.Packer(use_bin_type=True)


def pack_key(zone: int, orig: Tuple) -> bytes:
    key: bytes = _packer.pack((zone, *orig))
    return key


def _pack_reply(orig: Tuple, reply: Tuple) -> Any:
    """The reply tuple as the difference NAT made to orig's inverse: nil (no NAT), [dst, dport]
    (source NAT), [src, sport, dst, dport] (both), or the full 9 fields (anything else)."""
    if orig[2] not in ICMP_PROTOS:  # the inverse swaps addresses and ports, keeps the rest
        if reply[2] == orig[2] and reply[5:] == orig[5:]:
            if reply[0] == orig[1] and reply[3] == orig[4]:  # source as the inverse's
                if reply[1] == orig[0] and reply[4] == orig[3]:
                    return None
                return [reply[1], reply[4]]
            return [reply[0], reply[3], reply[1], reply[4]]
        return list(reply)
    return _pack_reply_by_inverse(orig, reply)


def _pack_reply_by_inverse(orig: Tuple, reply: Tuple) -> Any:
    """`_pack_reply` by its definition, through `Tuple.invert` (ICMP's inverse changes the
    type too); the fast path above is tested against it for every protocol."""
    inv = orig.invert()
    if reply == inv:
        return None
    if reply._replace(src=inv.src, sport=inv.sport, dst=inv.dst, dport=inv.dport) == inv:
        if reply.src == inv.src and reply.sport == inv.sport:
            return [reply.dst, reply.dport]
        return [reply.src, reply.sport, reply.dst, reply.dport]
    return list(reply)


def _unpack_reply(orig: Tuple, r: Any) -> Tuple:
    if r is None:
        return orig.invert()
    if type(r) is list and len(r) in (2, 4):
        inv = orig.invert()
        src, sport = (inv.src, inv.sport) if len(r) == 2 else (r[0], r[1])
        dst, dport = r[-2], r[-1]
        if not (type(src) is bytes and type(dst) is bytes and len(src) == len(dst) == len(inv.src)
                and type(sport) is int and type(dport) is int and 0 <= sport < 65536
                and 0 <= dport < 65536):
            raise PackError("NAT'd reply addresses/ports do not fit the original tuple")
        return inv._replace(src=src, sport=sport, dst=dst, dport=dport)
    return tuple_from(r)


def _pack_value_list(flow: Flow) -> list[Any]:
    return [
        _pack_reply(flow.orig, flow.reply), flow.status,
        flow.timeout, flow.mark, flow.state,
        flow.tcp_flags_orig, flow.tcp_flags_reply, flow.tcp_wscale_orig, flow.tcp_wscale_reply,
        flow.labels, flow.helper, list(flow.master) if flow.master else None, flow.secmark,
    ]


def pack_value(flow: Flow) -> bytes:
    value: bytes = _packer.pack(_pack_value_list(flow))
    return value


def pack_flow(flow: Flow) -> tuple[bytes, bytes]:
    return pack_key(flow.zone, flow.orig), pack_value(flow)


class PackError(ValueError):
    """Packed key/value bytes that do not describe a flow."""


def tuple_from(items: Any) -> Tuple:
    # exact type checks (not isinstance): this runs per flow on every commit and dump
    if type(items) is not list or len(items) != 9:
        raise PackError(f"tuple needs 9 fields, got {items!r:.80}")
    src, dst, proto, sport, dport, iid, itype, icode, opaque = items
    if type(src) is not bytes or type(dst) is not bytes or len(src) != len(dst) or len(
            src) not in (4, 16) or type(opaque) is not bytes:
        raise PackError("tuple addresses must be 4 or 16 bytes of the same family")
    if not (type(proto) is int and type(sport) is int and type(dport) is int
            and type(iid) is int and type(itype) is int and type(icode) is int
            and 0 <= proto < 256 and 0 <= sport < 65536 and 0 <= dport < 65536
            and 0 <= iid < 65536 and 0 <= itype < 256 and 0 <= icode < 256):
        raise PackError("tuple numbers out of range")
    return Tuple(src, dst, proto, sport, dport, iid, itype, icode, opaque)


def unpack_key(key: bytes) -> tuple[int, Tuple]:
    try:
        items = msgpack.unpackb(key, raw=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise PackError(f"bad key: {e}") from None
    if not isinstance(items, list) or len(items) < 10 or not isinstance(items[0], int):
        raise PackError("key must be [zone, tuple...]")
    return items[0], tuple_from(items[1:])


def flow_from_parts(zone: int, orig: Tuple, v: Any) -> Flow:
    """Build a Flow from an unpacked value list (from the cache or the wire)."""
    if type(v) is not list or len(v) < 13:
        raise PackError("value must be a list of at least 13 fields")
    reply, status, timeout, mark, state, tfo, tfr, wso, wsr, labels, helper, master, secmark = (
        v[:13]
    )
    for n in (status, timeout, mark, tfo, tfr, wso, wsr, secmark):
        if type(n) is not int or not 0 <= n < 0x100000000:
            raise PackError("value numbers must be 32-bit unsigned integers")
    if state is not None and (type(state) is not int or not 0 <= state < 256):
        raise PackError("state must be a small integer or nil")
    if type(labels) is not bytes or type(helper) is not str:
        raise PackError("labels must be bytes and helper a string")
    return Flow(
        orig, _unpack_reply(orig, reply), status, timeout, mark,
        zone, state, tfo, tfr, wso, wsr, labels, helper,
        None if master is None else tuple_from(master), secmark,
    )


def flow_from_lists(k: list[Any], v: list[Any]) -> Flow:
    """A Flow from a key and value already unpacked into lists (PackError if they do not
    describe one)."""
    return flow_from_parts(k[0], tuple_from(k[1:]), v)


def flows_of_entries(entries: Iterable[tuple[list[Any], list[Any]]]) -> tuple[list[Flow], int]:
    """Flows from unpacked cache entries, in their order except that each comes after its
    master (`masters_first`); and how many entries did not describe a flow (skipped)."""
    flows: list[Flow] = []
    bad = 0
    for k, v in entries:
        try:
            flows.append(flow_from_lists(k, v))
        except PackError:
            bad += 1
    return masters_first(flows), bad


def unpack_flow(key: bytes, value: bytes) -> Flow:
    zone, orig = unpack_key(key)
    try:
        v = msgpack.unpackb(value, raw=False, use_list=True)
    except Exception as e:
        raise PackError(f"bad value: {e}") from None
    return flow_from_parts(zone, orig, v)


def replicated(flow: Flow) -> Flow:
    """The part of a flow that crosses the wire (drops local-only counters, ids, times)."""
    return flow._replace(ct_id=0, counters=None, start_ns=0, stop_ns=0)


def masters_first(flows: list[Flow]) -> list[Flow]:
    """Reorder so that each flow comes after its master (the flow whose orig is its `master`),
    when the master is in `flows`; stable otherwise. Masters are matched by tuple, any zone.
    """
    if all(f.master is None for f in flows):
        return flows
    by_orig: dict[Tuple, Flow] = {}
    for f in flows:
        by_orig.setdefault(f.orig, f)
    depth: dict[int, int] = {}  # id(flow) -> how many masters precede it

    def depth_of(f: Flow) -> int:
        chain: list[Flow] = []
        cur: Flow | None = f
        while cur is not None and id(cur) not in depth:
            if any(c is cur for c in chain):  # a cycle cannot be honoured: cut it here
                break
            chain.append(cur)
            cur = by_orig.get(cur.master) if cur.master is not None else None
        d = depth.get(id(cur), -1) if cur is not None else -1
        for c in reversed(chain):
            d += 1
            depth[id(c)] = d
        return depth[id(f)]

    levels: list[list[Flow]] = []
    for f in flows:
        d = depth_of(f)
        while len(levels) <= d:
            levels.append([])
        levels[d].append(f)
    return [f for level in levels for f in level]
