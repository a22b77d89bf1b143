"""The Flow model shared by every layer, and its compact packed form.

This module owns what a conntrack entry *is* inside conntrackd-py: the tuples, the replicated
state, the two byte forms every cache and the wire use (a packed key and a packed value, their
fields named by index once: K_*, V_*, T_*), the protocol names (`Proto`), the check of a
peer's packed flows against the kernel's ranges (`filter_untrusted`), and the order that puts
masters before RELATED flows. It must not do I/O, read a clock or import trio.

Addresses are kept as raw network-order bytes (4 or 16 long) on the hot path; `ipaddress`
objects are made only for display. Unknown layer-4 protocols keep their raw tuple attributes in
`Tuple.opaque` so they survive a decode/encode round trip untouched.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Hashable, Iterable, Mapping, Sequence
from enum import IntEnum, IntFlag
from socket import inet_ntop
from types import MappingProxyType
from typing import Any, Final, NamedTuple

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

#: every protocol name this package knows (`Proto`'s, lower case, as conntrack spells them)
PROTO_BY_NAME: Mapping[str, int] = MappingProxyType({p.name.lower(): int(p) for p in Proto})
_PROTO_NAME = {int(p): p.name.lower() for p in Proto}


def proto_number(name: str) -> int | None:
    """The number of a protocol named as conntrack does ("tcp", any case); None if unknown."""
    return PROTO_BY_NAME.get(name.lower())


def proto_name(n: int) -> str:
    """A protocol number's name as conntrack spells it ("tcp"), or the number as text."""
    return _PROTO_NAME.get(n, str(n))


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
        name = _PROTO_NAME.get(p, "unknown")  # conntrack -L's word for the others
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
#         (the zone, then the original tuple's 9 fields: `Tuple`'s order)
# value = msgpack [reply (nil = orig.invert(); [dst, dport] = SNAT; [src, sport, dst, dport];
#                  or the 9 fields), status, timeout, mark, state, tcp flags o/r,
#                  wscale o/r, labels, helper, master tuple or nil, secmark, ...later fields]
#
# Both are what the caches store and what a flow message on the wire carries, so a flow is
# packed once when it enters the node and its bytes are reused from then on. Code that reads
# the unpacked lists names the fields by the indexes below (PROTOCOL.md section 6 is this).

# a tuple's fields, in a `Tuple` and in a packed tuple (a reply or master in full)
T_SRC, T_DST, T_PROTO, T_SPORT, T_DPORT, T_ICMP_ID, T_ICMP_TYPE, T_ICMP_CODE, T_OPAQUE = range(9)
TUPLE_LEN: Final = 9
# the key: the zone, then the original tuple
K_ZONE: Final = 0
K_TUPLE: Final = 1  # k[K_TUPLE:] is the original tuple's fields
K_SRC, K_DST, K_PROTO, K_SPORT, K_DPORT, K_ICMP_ID, K_ICMP_TYPE, K_ICMP_CODE, K_OPAQUE = (
    K_TUPLE + i for i in range(TUPLE_LEN))
KEY_LEN: Final = K_TUPLE + TUPLE_LEN
# the value
(V_REPLY, V_STATUS, V_TIMEOUT, V_MARK, V_STATE, V_TCP_FLAGS_ORIG, V_TCP_FLAGS_REPLY,
 V_WSCALE_ORIG, V_WSCALE_REPLY, V_LABELS, V_HELPER, V_MASTER, V_SECMARK) = range(13)
#: the fields every value has; later versions may append more (kept, never read)
VALUE_LEN: Final = 13

_packer = msgpack.Packer(use_bin_type=True)


def pack_key(zone: int, orig: Tuple) -> bytes:
    key: bytes = _packer.pack((zone, *orig))
    return key


def _pack_reply(orig: Tuple, reply: Tuple) -> Any:
    """The reply tuple as the difference NAT made to orig's inverse: nil (no NAT), [dst, dport]
    (source NAT), [src, sport, dst, dport] (both), or the full 9 fields (anything else)."""
    if orig[T_PROTO] not in ICMP_PROTOS:  # the inverse swaps addresses and ports, keeps the rest
        if reply[T_PROTO] == orig[T_PROTO] and reply[T_ICMP_ID:] == orig[T_ICMP_ID:]:
            if reply[T_SRC] == orig[T_DST] and reply[T_SPORT] == orig[T_DPORT]:
                if reply[T_DST] == orig[T_SRC] and reply[T_DPORT] == orig[T_SPORT]:
                    return None
                return [reply[T_DST], reply[T_DPORT]]
            return [reply[T_SRC], reply[T_SPORT], reply[T_DST], reply[T_DPORT]]
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
    # in V_* order (a test checks each field lands at its index)
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
    if type(items) is not list or len(items) != TUPLE_LEN:
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
    if type(items) is not list or len(items) != KEY_LEN or type(items[K_ZONE]) is not int:
        raise PackError("key must be [zone, tuple...]")
    return items[K_ZONE], tuple_from(items[K_TUPLE:])


def flow_from_parts(zone: int, orig: Tuple, v: Any) -> Flow:
    """Build a Flow from an unpacked value list (from the cache or the wire)."""
    if type(v) is not list or len(v) < VALUE_LEN:
        raise PackError("value must be a list of at least 13 fields")
    reply, status, timeout, mark, state, tfo, tfr, wso, wsr, labels, helper, master, secmark = (
        v[:VALUE_LEN]
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
    if type(k) is not list or len(k) != KEY_LEN or type(k[K_ZONE]) is not int:
        raise PackError("key must be [zone, tuple...]")
    return flow_from_parts(k[K_ZONE], tuple_from(k[K_TUPLE:]), v)


Entry = tuple[list[Any], list[Any]]


def flows_of_entries(entries: Iterable[Entry]) -> tuple[list[Flow], int]:
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


# --- masters before RELATED flows ------------------------------------------------------------

def depth_order(origs: Sequence[Hashable | None], masters: Sequence[Hashable | None]
                ) -> list[int]:
    """Indexes 0..n-1 in an order where each item comes after its master: the first item
    whose orig (`origs[j]`) equals its `masters[i]`, when there is one. Items come by depth
    (how many masters precede them), in their given order within a depth.

    Linear: each item's depth is computed once (a walk up its masters stops at the first
    item whose depth is known). A cycle in a peer's bogus data cannot be honoured: the walk
    cuts it where it meets an item already on its path."""
    n = len(origs)
    first: dict[Hashable, int] = {}
    for i, o in enumerate(origs):
        if o is not None:
            first.setdefault(o, i)
    depth = [-1] * n
    levels: list[list[int]] = []
    for i in range(n):
        if depth[i] < 0:
            path: list[int] = []
            on_path: set[int] = set()
            j = i
            while True:
                path.append(j)
                on_path.add(j)
                m = masters[j]
                p = None if m is None else first.get(m)
                if p is None or p in on_path:  # a root (or a cycle, cut here)
                    d = -1
                    break
                if depth[p] >= 0:
                    d = depth[p]
                    break
                j = p
            for j in reversed(path):
                d += 1
                depth[j] = d
        d = depth[i]
        while len(levels) <= d:
            levels.append([])
        levels[d].append(i)
    return [i for level in levels for i in level]


def masters_first(flows: list[Flow]) -> list[Flow]:
    """Reorder so that each flow comes after its master (the flow whose orig is its `master`),
    when the master is in `flows`; stable otherwise. Masters are matched by tuple, any zone.
    """
    if all(f.master is None for f in flows):
        return flows
    order = depth_order([f.orig for f in flows], [f.master for f in flows])
    return [flows[i] for i in order]


def _hashable(fields: Any) -> tuple[Any, ...] | None:
    """A packed tuple's fields as a dict key (None if they are not a list of plain values)."""
    if type(fields) is not list:
        return None
    t = tuple(fields)
    try:
        hash(t)
    except TypeError:
        return None
    return t


def masters_first_entries(entries: list[Entry]) -> list[Entry]:
    """`masters_first` for unpacked cache entries (key and value lists): a master's original
    tuple (`k[K_TUPLE:]`) is matched with `v[V_MASTER]` without building Flows; entries that
    are not lists of the right shape just have no master."""
    masters = [_hashable(v[V_MASTER]) if type(v) is list and len(v) > V_MASTER else None
               for _, v in entries]
    if all(m is None for m in masters):
        return entries
    origs = [_hashable(k[K_TUPLE:]) if type(k) is list else None for k, _ in entries]
    return [entries[i] for i in depth_order(origs, masters)]


# --- a peer's flows: every field in the kernel's range ---------------------------------------
#
# A peer's key and value bytes are stored as they came and reach the kernel at a commit (or at
# once without the external cache). `filter_untrusted` refuses, at the edge, every entry the
# kernel would not take as it is or that the commit encoder could not encode, so nothing a
# peer sends can stop a commit or the daemon.

#: status bits a peer's flow may carry: the ones the kernel defines (CTA_STATUS's policy refuses
#: bits from __IPS_MAX_BIT = 16 on), less TEMPLATE (a template is never a table entry)
STATUS_VALID: Final = 0xFFFF & ~int(Status.TEMPLATE)
TCP_WSCALE_MAX: Final = 14  # TCP_MAX_WSCALE
LABELS_MAX: Final = 16  # bytes of connlabels (128 bits), in 32-bit words
HELPER_MAX: Final = 15  # NF_CT_HELPER_NAME_LEN, less the NUL
#: raw CTA_TUPLE_PROTO attributes of a protocol the codec does not know (none known today)
OPAQUE_MAX: Final = 256
#: fields a value may have, trailing ones of later versions included
VALUE_FIELDS_MAX: Final = 64
_U32_MAX = 0xFFFFFFFF
_TCP = int(Proto.TCP)
_TCP_STATE_MAX = max(TcpState)

#: why a peer's flow was refused (`filter_untrusted`'s counts): `shape` is anything that is not
#: the packed form's structure and types (bool, float, nested lists where a number goes...)
REFUSAL_REASONS = ("shape", "address", "zone", "proto", "port", "icmp", "opaque", "status",
                   "timeout", "mark", "secmark", "state", "tcp_state", "tcp_flags", "wscale",
                   "labels", "helper", "master")


def _tuple_refusal(t: Any, alen: int | None) -> str | None:
    """Why a packed 9-field tuple is not one the kernel takes (`alen`: the address length it
    must have, or None for either family)."""
    if type(t) is not list or len(t) != TUPLE_LEN:
        return "shape"
    src, dst, proto, sport, dport, iid, itype, icode, opaque = t
    if not (type(src) is bytes and type(dst) is bytes and type(opaque) is bytes
            and type(proto) is int and type(sport) is int and type(dport) is int
            and type(iid) is int and type(itype) is int and type(icode) is int):
        return "shape"
    if len(src) not in (4, 16) or len(dst) != len(src) or (alen is not None and len(src) != alen):
        return "address"
    if not 0 <= proto <= 255:
        return "proto"
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        return "port"
    if not (0 <= iid <= 0xFFFF and 0 <= itype <= 255 and 0 <= icode <= 255):
        return "icmp"
    if len(opaque) > OPAQUE_MAX:
        return "opaque"
    return None


def _unpack_untrusted(data: Any) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, use_list=True)
    except Exception:  # msgpack raises several unrelated types on bad input
        return None


def _reply_refusal(r: Any, alen: int, proto: int) -> str | None:
    if r is None:
        return None
    if type(r) is not list:
        return "shape"
    if len(r) in (2, 4):
        for addr, port in zip(r[::2], r[1::2], strict=True):
            if type(addr) is not bytes or type(port) is not int:
                return "shape"
            if len(addr) != alen:
                return "address"
            if not 0 <= port <= 0xFFFF:
                return "port"
        return None
    why = _tuple_refusal(r, alen)
    if why is None and r[T_PROTO] != proto:
        return "proto"
    return why


def untrusted_refusal(key: Any, value: Any) -> str | None:
    """Why a peer's packed flow (key, and value unless it is a destroy: None) is refused, as
    one of REFUSAL_REASONS, or None when every field is in the kernel's range: the plain
    reference `filter_untrusted` is tested against, field by field."""
    k = _unpack_untrusted(key)
    if type(k) is not list or len(k) != KEY_LEN or type(k[K_ZONE]) is not int:
        return "shape"
    why = _tuple_refusal(k[K_TUPLE:], None)
    if why is not None:
        return why
    if not 0 <= k[K_ZONE] <= 0xFFFF:
        return "zone"
    if value is None:
        return None
    v = _unpack_untrusted(value)
    if type(v) is not list or not VALUE_LEN <= len(v) <= VALUE_FIELDS_MAX:
        return "shape"
    (reply, status, timeout, mark, state, tfo, tfr, wso, wsr, labels, helper, master,
     secmark) = v[:VALUE_LEN]
    if not all(type(n) is int for n in (status, timeout, mark, tfo, tfr, wso, wsr, secmark)):
        return "shape"
    if not (state is None or type(state) is int):
        return "shape"
    if type(labels) is not bytes or type(helper) is not str:
        return "shape"
    if not (reply is None or type(reply) is list) or not (master is None or type(master) is list):
        return "shape"
    alen = len(k[K_SRC])
    proto = k[K_PROTO]
    why = _reply_refusal(reply, alen, proto)
    if why is not None:
        return why
    if status < 0 or status & ~STATUS_VALID:
        return "status"
    if not 0 <= timeout <= _U32_MAX:
        return "timeout"
    if not 0 <= mark <= _U32_MAX:
        return "mark"
    if not 0 <= secmark <= _U32_MAX:
        return "secmark"
    if state is not None:
        if proto == Proto.TCP and state not in TcpState._value2member_map_:
            return "tcp_state"
        if not 0 <= state <= 255:
            return "state"
    if not (0 <= tfo <= 255 and 0 <= tfr <= 255):
        return "tcp_flags"
    if not (0 <= wso <= TCP_WSCALE_MAX and 0 <= wsr <= TCP_WSCALE_MAX):
        return "wscale"
    if len(labels) > LABELS_MAX or len(labels) % 4:
        return "labels"
    if len(helper) > HELPER_MAX or not (helper.isascii() and helper.isprintable()):
        return "helper"
    if master is not None and _tuple_refusal(master, alen) is not None:
        return "master"
    return None


# The fast path, in two tiers; anything neither accepts is classified by `untrusted_refusal`
# (refusals are rare, so their cost does not matter).
#
# 1. The common shapes, matched on the packed bytes by one regular expression for the key and
#    one for the value, without unpacking them: each pattern below matches exactly the msgpack
#    encodings of one field type within its range (a uint format, never a bool, float, signed
#    or nested form), so a full match of the array header and its elements is a valid flow.
#    What it leaves out (non-empty opaque, labels other than 0 or 16 bytes, a reply or master
#    in full, a state above 9, trailing value fields...) goes to tier 2.
# 2. Unpacked, the exact types checked one by one (faster than comparing `map(type, ...)` with
#    a template) and the numbers' ranges by packing them (struct.error when one does not fit).

def _any_of(values: Iterable[int]) -> bytes:
    """A character class of these byte values."""
    return b"[" + b"".join(re.escape(bytes([v])) for v in values) + b"]"


_RE_U8 = rb"(?:[\x00-\x7f]|\xcc.)"
_RE_U16 = rb"(?:[\x00-\x7f]|\xcc.|\xcd..)"
_RE_U32 = rb"(?:[\x00-\x7f]|\xcc.|\xcd..|\xce....)"
# status: 16 bits (STATUS_VALID's high byte is checked; its low byte allows every bit)
assert STATUS_VALID & 0xFF == 0xFF
_RE_STATUS = (rb"(?:[\x00-\x7f]|\xcc.|\xcd"
              + _any_of(b for b in range(256) if not b & ~STATUS_VALID >> 8) + b".)")
_RE_STATE = rb"(?:\xc0|" + _any_of(range(_TCP_STATE_MAX + 1)) + b")"  # nil, or one for any proto
_RE_WSCALE = _any_of(range(TCP_WSCALE_MAX + 1))
_RE_LABELS = rb"\xc4(?:\x00|\x10.{16})"
_RE_HELPER = b"(?:" + b"|".join(bytes([0xA0 + n]) + rb"[\x20-\x7e]" + b"{%d}" % n
                                for n in range(HELPER_MAX + 1)) + b")"


def _re_addr(alen: int) -> bytes:
    return rb"\xc4" + re.escape(bytes([alen])) + b".{%d}" % alen


def _re_key(alen: int) -> re.Pattern[bytes]:
    a = _re_addr(alen)
    return re.compile(rb"\x9a" + _RE_U16 + a + a + _RE_U8 + _RE_U16 * 3 + _RE_U8 * 2 + rb"\xc4\x00",
                      re.DOTALL)


def _re_value(alen: int) -> re.Pattern[bytes]:
    a = _re_addr(alen)
    reply = rb"(?:\xc0|\x92" + a + _RE_U16 + rb"|\x94" + a + _RE_U16 + a + _RE_U16 + b")"
    return re.compile(rb"\x9d" + reply + _RE_STATUS + _RE_U32 * 2 + _RE_STATE + _RE_U8 * 2
                      + _RE_WSCALE * 2 + _RE_LABELS + _RE_HELPER + rb"\xc0" + _RE_U32, re.DOTALL)


# the array headers above: fixarray 10 (key) and 13 (value)
assert KEY_LEN == 10
assert VALUE_LEN == 13
_KEY4, _KEY6 = _re_key(4).fullmatch, _re_key(16).fullmatch
_VALUE4, _VALUE6 = _re_value(4).fullmatch, _re_value(16).fullmatch

# tier 2: zone, proto, ports, ICMP id, type and code
_key_ranges = struct.Struct("!HBHHHBB").pack
# status, timeout, mark, TCP flags and window scales, secmark
_value_ranges = struct.Struct("!IIIBBBBI").pack
_unpackb = msgpack.unpackb


def filter_untrusted(flows: Sequence[tuple[bytes, bytes | None]]
                     ) -> tuple[list[tuple[bytes, bytes | None]], dict[str, int]]:
    """A peer's flow messages (key, value) or (key, None) for a destroy, as received: the ones
    whose key (and value) unpack and have every field in the kernel's range, in order; and how
    many were refused, by reason (REFUSAL_REASONS). Runs on every received flow."""
    ok: list[tuple[bytes, bytes | None]] = []
    keep = ok.append
    refused: dict[str, int] = {}
    key4, key6, value4, value6 = _KEY4, _KEY6, _VALUE4, _VALUE6
    for kv in flows:
        key, value = kv
        if type(key) is bytes and type(value) in _VALUE_TYPES:
            if key4(key):
                if value is None or value4(value):
                    keep(kv)
                    continue
            elif key6(key) and (value is None or value6(value)):
                keep(kv)
                continue
        why = _tier2(key, value)
        if why is None:
            keep(kv)
        else:
            refused[why] = refused.get(why, 0) + 1
    return ok, refused


_VALUE_TYPES = (bytes, type(None))


def _tier2(key: Any, value: Any) -> str | None:
    """Tier 2 of the fast path (see above), then the reference: why (key, value) is refused."""
    try:
        # msgpack's defaults are raw=False, use_list=True (passing them costs ~50 ns)
        zone, src, dst, proto, sport, dport, iid, itype, icode, opaque = _unpackb(key)
        if not (type(src) is bytes and type(dst) is bytes and type(opaque) is bytes
                and type(zone) is int and type(proto) is int and type(sport) is int
                and type(dport) is int and type(iid) is int and type(itype) is int
                and type(icode) is int):
            raise _Refused
        alen = len(src)
        if (alen != 4 and alen != 16) or len(dst) != alen or len(opaque) > OPAQUE_MAX:
            raise _Refused
        _key_ranges(zone, proto, sport, dport, iid, itype, icode)
        if value is None:
            return None
        v = _unpackb(value)
        if type(v) is not list or not VALUE_LEN <= len(v) <= VALUE_FIELDS_MAX:
            raise _Refused
        (reply, status, timeout, mark, state, tfo, tfr, wso, wsr, labels, helper,
         master, secmark) = v if len(v) == VALUE_LEN else v[:VALUE_LEN]
        if not (type(status) is int and type(timeout) is int and type(mark) is int
                and type(tfo) is int and type(tfr) is int and type(wso) is int
                and type(wsr) is int and type(secmark) is int
                and type(labels) is bytes and type(helper) is str
                and (state is None or type(state) is int)):
            raise _Refused
        _value_ranges(status, timeout, mark, tfo, tfr, wso, wsr, secmark)
        if (status & ~STATUS_VALID or wso > TCP_WSCALE_MAX or wsr > TCP_WSCALE_MAX
                or (state is not None and not (
                    0 <= state <= (_TCP_STATE_MAX if proto == _TCP else 255)))
                or (labels and (len(labels) > LABELS_MAX or len(labels) & 3))
                or (helper and (len(helper) > HELPER_MAX or not helper.isascii()
                                or not helper.isprintable()))):
            raise _Refused
        if reply is not None:
            if type(reply) is list and len(reply) == 2:  # source NAT, the usual one
                a, p = reply
                if type(a) is not bytes or len(a) != alen or type(p) is not int or not (
                        0 <= p <= 0xFFFF):
                    raise _Refused
            elif _reply_refusal(reply, alen, proto) is not None:
                raise _Refused
        if master is not None and _tuple_refusal(master, alen) is not None:
            raise _Refused
    except Exception:  # _Refused, struct.error, msgpack's errors, a non-list's TypeError
        return untrusted_refusal(key, value)  # the reference decides (a test holds them equal)
    return None


class _Refused(Exception):
    """The fast path's way out to the reference's classification."""
