"""IPFIX (RFC 7011) encoding of accounting records: templates, data sets, message framing.

This module owns the bytes: which information elements a record carries, the templates that
describe them, when a template is sent again (UDP has no session to tell a collector that
restarted), the sequence numbers and how records are packed into messages that fit the path
MTU. It must not do I/O or read a clock: the accounting writer process (`acctwriter`) sends
the messages and passes the time in.

One record per destroyed conntrack entry, a biflow (RFC 5103) seen from the initiator:
  source/destination address and port, protocol  the original direction, before NAT
  postNAT* / postNAPT*                              the original direction after NAT, i.e. the
                                                    reply tuple reversed (equal to the pre-NAT
                                                    values when the flow was not NATed)
  octetDeltaCount, packetDeltaCount                 the original direction's counters
  reverseOctetDeltaCount, reversePacketDeltaCount   the reply direction's counters, as RFC 5103
                                                    defines them (enterprise 29305, same element
                                                    numbers): the same semantics as the forward
                                                    counters (layer-3 octets, what conntrack
                                                    counts), which initiatorOctets (231) does
                                                    not have (layer-4 payload octets)
  flowStartMilliseconds, flowEndMilliseconds        the kernel's timestamps (the time the event
                                                    was seen when nf_conntrack_timestamp is off)
ICMP flows carry type * 256 + code in destinationTransportPort, as NetFlow v5 did and
collectors (nfdump) read it. The conntrack mark and zone are not exported: IANA has no element
for either, and an enterprise element needs a private enterprise number this project does not
have (a collector would show them as unknown fields).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .flow import Flow

__all__ = ["IPV4_TEMPLATE", "IPV6_TEMPLATE", "Exporter", "Field", "Message", "parse_collector",
           "template_set"]

VERSION = 10
#: Set IDs (RFC 7011 3.3.2)
TEMPLATE_SET = 2
#: RFC 5103: reverse information elements are the forward element numbers under this PEN
REVERSE_PEN = 29305
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, domain
SET_HEADER = struct.Struct("!HH")
#: IPv6 (40) + UDP (8) headers: a message of at most mtu - this fits the path MTU either way
IP_UDP_OVERHEAD = 48
ICMP = (1, 58)
#: IANA's port for IPFIX over UDP, TCP and SCTP (RFC 7011 10.3.4)
DEFAULT_PORT = 4739


def parse_collector(text: str) -> tuple[str, int]:
    """`10.0.0.1:4739`, `[fd00::1]:4739`, or an address alone (port 4739) -> (address, port).
    Addresses only, never names: the config says exactly where records go. Raises ValueError."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [IPv6 address]:port")
        if rest:
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    addr = ipaddress.ip_address(host)  # ValueError for a name
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return str(addr), port


class Field(NamedTuple):
    """One field specifier: IANA element id, length, enterprise number (0 = IANA)."""

    ie: int
    length: int
    pen: int = 0


# IANA "IPFIX Information Elements" registry numbers (checked against the registry)
OCTET_DELTA_COUNT = 1
PACKET_DELTA_COUNT = 2
PROTOCOL_IDENTIFIER = 4
SOURCE_TRANSPORT_PORT = 7
SOURCE_IPV4_ADDRESS = 8
DESTINATION_TRANSPORT_PORT = 11
DESTINATION_IPV4_ADDRESS = 12
SOURCE_IPV6_ADDRESS = 27
DESTINATION_IPV6_ADDRESS = 28
FLOW_START_MILLISECONDS = 152
FLOW_END_MILLISECONDS = 153
POST_NAT_SOURCE_IPV4_ADDRESS = 225
POST_NAT_DESTINATION_IPV4_ADDRESS = 226
POST_NAPT_SOURCE_TRANSPORT_PORT = 227
POST_NAPT_DESTINATION_TRANSPORT_PORT = 228
POST_NAT_SOURCE_IPV6_ADDRESS = 281
POST_NAT_DESTINATION_IPV6_ADDRESS = 282


def _fields(src: int, dst: int, post_src: int, post_dst: int, alen: int) -> tuple[Field, ...]:
    return (
        Field(src, alen), Field(dst, alen),
        Field(SOURCE_TRANSPORT_PORT, 2), Field(DESTINATION_TRANSPORT_PORT, 2),
        Field(PROTOCOL_IDENTIFIER, 1),
        Field(post_src, alen), Field(post_dst, alen),
        Field(POST_NAPT_SOURCE_TRANSPORT_PORT, 2), Field(POST_NAPT_DESTINATION_TRANSPORT_PORT, 2),
        Field(OCTET_DELTA_COUNT, 8), Field(PACKET_DELTA_COUNT, 8),
        Field(OCTET_DELTA_COUNT, 8, REVERSE_PEN), Field(PACKET_DELTA_COUNT, 8, REVERSE_PEN),
        Field(FLOW_START_MILLISECONDS, 8), Field(FLOW_END_MILLISECONDS, 8),
    )


IPV4_TEMPLATE_ID, IPV6_TEMPLATE_ID = 256, 257
IPV4_TEMPLATE = _fields(SOURCE_IPV4_ADDRESS, DESTINATION_IPV4_ADDRESS,
                        POST_NAT_SOURCE_IPV4_ADDRESS, POST_NAT_DESTINATION_IPV4_ADDRESS, 4)
IPV6_TEMPLATE = _fields(SOURCE_IPV6_ADDRESS, DESTINATION_IPV6_ADDRESS,
                        POST_NAT_SOURCE_IPV6_ADDRESS, POST_NAT_DESTINATION_IPV6_ADDRESS, 16)
#: the data records, in template field order
_V4 = struct.Struct("!4s4sHHB4s4sHHQQQQQQ")
_V6 = struct.Struct("!16s16sHHB16s16sHHQQQQQQ")


def template_set(templates: Sequence[tuple[int, Sequence[Field]]]) -> bytes:
    """A Template Set (RFC 7011 3.4.1) holding these (template id, fields)."""
    body = bytearray()
    for tid, fields in templates:
        body += struct.pack("!HH", tid, len(fields))
        for f in fields:
            if f.pen:
                body += struct.pack("!HHI", f.ie | 0x8000, f.length, f.pen)
            else:
                body += struct.pack("!HH", f.ie, f.length)
    return SET_HEADER.pack(TEMPLATE_SET, SET_HEADER.size + len(body)) + bytes(body)


TEMPLATES = template_set([(IPV4_TEMPLATE_ID, IPV4_TEMPLATE), (IPV6_TEMPLATE_ID, IPV6_TEMPLATE)])


#: Flow and Tuple field positions: records are read by position so that a Flow and the plain
#: arrays msgpack makes of it (what the writer process receives) encode alike, without
#: building NamedTuples first
_ORIG, _REPLY, _COUNTERS, _START, _STOP = (Flow._fields.index(k) for k in (
    "orig", "reply", "counters", "start_ns", "stop_ns"))
_pack4, _pack6 = _V4.pack, _V6.pack


def encode_record(flow: Sequence[Any], end_fallback: float) -> tuple[int, bytes] | None:
    """(template id, data record) of a destroyed flow, a Flow or its msgpack arrays; None when
    its addresses are neither IPv4 nor IPv6 (never from the kernel). Raises struct.error,
    TypeError or IndexError for what is not a flow."""
    o, r = flow[_ORIG], flow[_REPLY]
    src, dst, proto, sport, dport = o[0], o[1], o[2], o[3], o[4]
    if proto == 1 or proto == 58:  # ICMP, ICMPv6: type and code, no ports
        sport, dport, post_sport, post_dport = 0, (o[6] << 8) | o[7], 0, 0
    else:
        post_sport, post_dport = r[4], r[3]
    stop = flow[_STOP]
    end = stop // 1_000_000 if stop else int(end_fallback * 1000)
    start = flow[_START] // 1_000_000 if flow[_START] else end
    c = flow[_COUNTERS]
    if c is None:
        op = ob = rp = rb = 0
    else:
        op, ob, rp, rb = c
    n = len(src)
    if n == 4:
        return IPV4_TEMPLATE_ID, _pack4(src, dst, sport, dport, proto, r[1], r[0], post_sport,
                                        post_dport, ob, op, rb, rp, start, end)
    if n == 16:
        return IPV6_TEMPLATE_ID, _pack6(src, dst, sport, dport, proto, r[1], r[0], post_sport,
                                        post_dport, ob, op, rb, rp, start, end)
    return None


class Message(NamedTuple):
    """One IPFIX message and how many data records it carries."""

    data: bytes
    records: int


class Exporter:
    """The exporting process's state for one observation domain: sequence number and template
    refresh. `encode` turns records into messages; the caller sends every message, in order,
    to every collector (one stream: the same sequence numbers and templates for each).

    Templates go in the first message, then again (RFC 7011 8.4, UDP) in the first message
    after `template_refresh` seconds, and after `template_refresh_packets` messages when that
    is not 0.
    """

    def __init__(self, domain: int, *, mtu: int = 1400, template_refresh: float = 600.0,
                 template_refresh_packets: int = 0) -> None:
        self.domain = domain & 0xFFFFFFFF
        self.max_size = max(mtu - IP_UDP_OVERHEAD, HEADER.size + len(TEMPLATES) + _V6.size + 4)
        self.template_refresh = template_refresh
        self.template_refresh_packets = template_refresh_packets
        #: data records sent so far (RFC 7011: the sequence number of the next message)
        self.sequence = 0
        self.messages = 0
        self.bad = 0  # records that were not IPv4 or IPv6
        self._templates_at: float | None = None
        self._since_templates = 0

    def _templates_due(self, now: float) -> bool:
        if self._templates_at is None or now - self._templates_at >= self.template_refresh:
            return True
        n = self.template_refresh_packets
        return bool(n) and self._since_templates >= n

    def encode(self, records: Iterable[tuple[Sequence[Any], float]], now: float
               ) -> list[Message]:
        """Messages carrying these (flow, time seen) records, each within the MTU; a record
        that is not a flow is skipped and counted in `bad`."""
        out: list[Message] = []
        sets: list[bytes] = []
        size = HEADER.size
        count = 0  # data records in this message
        set_id = 0
        rows: list[bytes] = []
        templates = self._templates_due(now)
        if templates:
            sets.append(TEMPLATES)
            size += len(TEMPLATES)

        def close_set() -> None:
            if rows:
                body = b"".join(rows)
                sets.append(SET_HEADER.pack(set_id, SET_HEADER.size + len(body)) + body)
                rows.clear()

        def close_message() -> None:
            nonlocal size, count, templates
            close_set()
            if not sets:
                return
            body = b"".join(sets)
            out.append(Message(HEADER.pack(VERSION, HEADER.size + len(body),
                                           int(now) & 0xFFFFFFFF, self.sequence & 0xFFFFFFFF,
                                           self.domain) + body, count))
            self.sequence += count
            self.messages += 1
            if templates:
                self._templates_at, self._since_templates = now, 0
            else:
                self._since_templates += 1
            sets.clear()
            size, count = HEADER.size, 0
            templates = self._templates_due(now)
            if templates:
                sets.append(TEMPLATES)
                size += len(TEMPLATES)

        for flow, seen in records:
            try:
                rec = encode_record(flow, seen)
            except (struct.error, TypeError, IndexError, ValueError):
                rec = None
            if rec is None:
                self.bad += 1
                continue
            tid, row = rec
            need = len(row) + (0 if tid == set_id and rows else SET_HEADER.size)
            if size + need > self.max_size:
                close_message()
                need = len(row) + SET_HEADER.size
            if tid != set_id or not rows:
                close_set()
                set_id = tid
            rows.append(row)
            size += need
            count += 1
        if count:
            close_message()
        return out
