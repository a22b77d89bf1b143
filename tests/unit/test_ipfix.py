"""IPFIX encoding (ipfix.py), checked against an independent decoder (the `netflow` package from
PyPI), and the writer's IPFIX sink and per-sink counts (no sockets: a recording stand-in)."""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import struct
from dataclasses import replace
from typing import Any

import msgpack
import pytest

from conntrackd_py.accounting import Accounting, ipfix_options
from conntrackd_py.acctwriter import LOST, SINK, WRITTEN, IpfixSink, serve
from conntrackd_py.config import Accounting as AccCfg
from conntrackd_py.config import Ipfix
from conntrackd_py.flow import Counters, Flow, Status, Tuple
from conntrackd_py.ipfix import (
    HEADER,
    IP_UDP_OVERHEAD,
    IPV4_TEMPLATE_ID,
    IPV6_TEMPLATE_ID,
    REVERSE_PEN,
    Exporter,
    parse_collector,
)
from conntrackd_py.stats import SinkStats

nip = pytest.importorskip("netflow.ipfix")

T0 = 1_700_000_000.0


def ip(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in s else socket.AF_INET, s)


def ip_int(s: str) -> int:
    return int(ipaddress.ip_address(s))


def nat_flow(i: int = 0, v6: bool = False) -> Flow:
    """client:sport -> server:80 source-NATed to the firewall's wan address:61000+i."""
    c, s, w = ("fd00:1:1::2", "fd00:1:2::2", "fd00:1:2::1") if v6 else (
        "10.1.1.2", "10.1.2.2", "10.1.2.1")
    orig = Tuple(ip(c), ip(s), 6, 40000 + i, 80)
    reply = Tuple(ip(s), ip(w), 6, 80, 61000 + i)
    return Flow(orig, reply, status=int(Status.SRC_NAT | Status.ASSURED),
                counters=Counters(10 + i, 1000 + i, 7 + i, 5000 + i),
                start_ns=1_700_000_000_250_000_000, stop_ns=1_700_000_003_500_000_000)


def decode(messages: list[bytes]) -> tuple[list[Any], list[Any]]:
    """Every message through netflow's IPFIX parser: (headers, data records)."""
    templates: dict[str, Any] = {}
    headers, records = [], []
    for m in messages:
        p = nip.IPFIXExportPacket(m, templates)
        headers.append(p.header)
        records += p.flows
    return headers, records


def test_netflow_decodes_every_field_of_ipv4_and_ipv6_records() -> None:
    e = Exporter(7)
    flows = [nat_flow(0), nat_flow(1, v6=True)]
    msgs = [m.data for m in e.encode([(f, T0) for f in flows], T0)]
    headers, (r4, r6) = decode(msgs)
    assert headers[0].version == 10
    assert headers[0].length == len(msgs[0])
    assert headers[0].obervation_domain_id == 7  # (sic, netflow 0.12)
    assert r4.data | {"octetDeltaCount": 0, "packetDeltaCount": 0} == {
        "sourceIPv4Address": ip_int("10.1.1.2"), "destinationIPv4Address": ip_int("10.1.2.2"),
        "sourceTransportPort": 40000, "destinationTransportPort": 80,
        "protocolIdentifier": 6,
        "postNATSourceIPv4Address": ip_int("10.1.2.1"),
        "postNATDestinationIPv4Address": ip_int("10.1.2.2"),
        "postNAPTSourceTransportPort": 61000, "postNAPTDestinationTransportPort": 80,
        "octetDeltaCount": 0, "packetDeltaCount": 0,
        "flowStartMilliseconds": 1_700_000_000_250, "flowEndMilliseconds": 1_700_000_003_500,
    }
    # netflow keys values by element id without the enterprise number, so the forward and
    # the RFC 5103 reverse counters (same ids, PEN 29305) are both in `fields`, by id
    assert {(1, 1000), (2, 10), (1, 5000), (2, 7)} <= r4.fields
    assert r6.data["sourceIPv6Address"] == ip_int("fd00:1:1::2")
    assert r6.data["postNATSourceIPv6Address"] == ip_int("fd00:1:2::1")
    assert r6.data["postNAPTSourceTransportPort"] == 61001
    assert {(1, 1001), (2, 11), (1, 5001), (2, 8)} <= r6.fields


def test_templates_declare_the_reverse_counters_under_the_rfc5103_pen() -> None:
    e = Exporter(1)
    (m,) = e.encode([(nat_flow(), T0)], T0)
    templates: dict[Any, Any] = {}
    p = nip.IPFIXExportPacket(m.data, templates)
    tmpl = {s.header.set_id: s for s in p.sets}[2]
    by_id = {t.template_id: t.fields for t in tmpl.records}
    assert set(by_id) == {IPV4_TEMPLATE_ID, IPV6_TEMPLATE_ID}
    for fields in by_id.values():
        reverse = [(f.id, f.enterprise_number) for f in fields
                   if getattr(f, "enterprise_number", 0)]
        assert reverse == [(1, REVERSE_PEN), (2, REVERSE_PEN)]
        ids = [f.id for f in fields]
        assert ids.index(1) < ids.index(2) < len(ids) - 4  # forward pair before reverse pair


def test_sequence_numbers_count_data_records_before_each_message() -> None:
    e = Exporter(3, mtu=600)
    seqs: list[int] = []
    counts: list[int] = []
    for batch in (5, 40, 1):
        for m in e.encode([(nat_flow(i), T0) for i in range(batch)], T0):
            seqs.append(HEADER.unpack_from(m.data)[3])
            counts.append(m.records)
    assert sum(counts) == 46
    assert seqs == [sum(counts[:i]) for i in range(len(counts))]
    # the same, as netflow reads the headers and counts the records
    templates: dict[str, Any] = {}
    seen = 0
    for m in Exporter(3, mtu=600).encode([(nat_flow(i), T0) for i in range(46)], T0):
        p = nip.IPFIXExportPacket(m.data, templates)
        assert p.header.sequence_number == seen
        seen += len(p.flows)
    assert seen == 46


@pytest.mark.parametrize("mtu", [576, 1400, 9000])
def test_messages_fit_the_mtu_and_carry_every_record(mtu: int) -> None:
    e = Exporter(1, mtu=mtu)
    flows = [nat_flow(i, v6=bool(i % 3)) for i in range(500)]
    msgs = e.encode([(f, T0) for f in flows], T0)
    assert all(len(m.data) <= mtu - IP_UDP_OVERHEAD for m in msgs)
    assert all(struct.unpack_from("!H", m.data, 2)[0] == len(m.data) for m in msgs)
    _, records = decode([m.data for m in msgs])
    assert [r.data["sourceTransportPort"] for r in records] == [40000 + i for i in range(500)]
    assert e.sequence == 500


def _has_templates(m: bytes) -> bool:
    return bool(struct.unpack_from("!H", m, HEADER.size)[0] == 2)


def test_templates_are_sent_first_then_again_after_the_refresh_time() -> None:
    e = Exporter(1, template_refresh=600)
    rec = [(nat_flow(), T0)]
    assert _has_templates(e.encode(rec, T0)[0].data)
    assert not _has_templates(e.encode(rec, T0 + 599)[0].data)
    assert _has_templates(e.encode(rec, T0 + 600)[0].data)
    assert not _has_templates(e.encode(rec, T0 + 601)[0].data)


def test_templates_are_sent_again_every_n_messages() -> None:
    e = Exporter(1, template_refresh=1e9, template_refresh_packets=3)
    rec = [(nat_flow(), T0)]
    marks = [_has_templates(e.encode(rec, T0)[0].data) for _ in range(8)]
    assert marks == [True, False, False, False, True, False, False, False]


def test_icmp_carries_type_and_code_in_the_destination_port() -> None:
    orig = Tuple(ip("10.1.1.2"), ip("10.1.2.2"), 1, icmp_id=9, icmp_type=8, icmp_code=0)
    f = Flow(orig, Tuple(ip("10.1.2.2"), ip("10.1.1.2"), 1, icmp_id=9, icmp_type=0),
             counters=Counters(1, 84, 1, 84))
    (m,) = Exporter(1).encode([(f, T0)], T0)
    _, (r,) = decode([m.data])
    assert r.data["destinationTransportPort"] == 8 << 8
    assert r.data["sourceTransportPort"] == 0
    assert r.data["flowStartMilliseconds"] == r.data["flowEndMilliseconds"] == T0 * 1000


def test_parse_collector() -> None:
    assert parse_collector("10.0.0.1:2055") == ("10.0.0.1", 2055)
    assert parse_collector("10.0.0.1") == ("10.0.0.1", 4739)
    assert parse_collector("[fd00::1]:9995") == ("fd00::1", 9995)
    assert parse_collector("fd00::1") == ("fd00::1", 4739)
    for bad, why in (("collector.example:4739", "does not appear to be an IP"),
                     ("10.0.0.1:0", "out of range"), ("10.0.0.1:65536", "out of range"),
                     ("[fd00::1", "not \\[IPv6"), ("[fd00::1]x", "not \\[IPv6")):
        with pytest.raises(ValueError, match=why):
            parse_collector(bad)


# --- the writer's sink -------------------------------------------------------------------

class FakeSock:
    """Records datagrams; refuses those to `refuse` (as a full or unreachable path would)."""

    def __init__(self, refuse: str = "") -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.refuse = refuse

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        if addr[0] == self.refuse:
            raise OSError(101, "Network is unreachable")
        self.sent.append((data, addr))
        return len(data)

    def close(self) -> None:
        pass


def test_writer_sends_every_record_to_each_collector_and_counts_per_sink(
        tmp_path: Any) -> None:
    sink = IpfixSink(["10.9.0.1:4739", "10.9.0.2"], 5, clock=lambda: T0)
    fake = FakeSock(refuse="10.9.0.2")
    sink.socks[socket.AF_INET] = fake  # type: ignore[assignment]
    r, w = os.pipe()
    for i in range(300):
        os.write(w, msgpack.packb([nat_flow(i), T0]))
    os.close(w)
    out = io.BytesIO()
    try:
        serve(r, out, sink)
    finally:
        os.close(r)
    reports = list(msgpack.Unpacker(io.BytesIO(out.getvalue()), raw=False))
    per_sink: dict[str, list[int]] = {}
    for msg in reports:
        if msg[0] == SINK:
            c = per_sink.setdefault(msg[1], [0, 0])
            c[0] += msg[2]
            c[1] += msg[3]
    assert per_sink == {"ipfix 10.9.0.1:4739": [300, 0], "ipfix 10.9.0.2:4739": [0, 300]}
    # one collector took them all: written, not lost
    assert sum(m[1] for m in reports if m[0] == WRITTEN) == 300
    assert not [m for m in reports if m[0] == LOST]
    _, records = decode([d for d, _ in fake.sent])
    assert sorted(rec.data["sourceTransportPort"] for rec in records) == [
        40000 + i for i in range(300)]
    assert {a for _, a in fake.sent} == {("10.9.0.1", 4739)}


def test_records_every_sink_lost_are_reported_lost() -> None:
    sink = IpfixSink(["10.9.0.2"], 5, clock=lambda: T0)
    sink.socks[socket.AF_INET] = FakeSock(refuse="10.9.0.2")  # type: ignore[assignment]
    r, w = os.pipe()
    os.write(w, msgpack.packb([nat_flow(), T0]))
    os.close(w)
    out = io.BytesIO()
    try:
        serve(r, out, sink)
    finally:
        os.close(r)
    reports = list(msgpack.Unpacker(io.BytesIO(out.getvalue()), raw=False))
    assert [m[:2] for m in reports if m[0] == LOST] == [[LOST, 1]]
    assert not [m for m in reports if m[0] == WRITTEN]


def test_accounting_counts_per_sink_reports_and_takes_ipfix_options() -> None:
    ipfix = Ipfix(collectors=("10.9.0.1:4739",), mtu=1200, template_refresh=30.0,
                  template_refresh_packets=10)
    cfg = AccCfg(enabled=True, ipfix=ipfix)
    acc = Accounting(cfg, node_id=4, netns_name="ns1")
    assert acc.outputs  # IPFIX alone is an output
    assert acc.ipfix == {"collectors": ["10.9.0.1:4739"], "domain": 4, "mtu": 1200,
                         "template_refresh": 30.0, "template_refresh_packets": 10,
                         "netns": "ns1"}
    acc.in_flight = 5
    acc._on_reports(msgpack.packb([SINK, "ipfix 10.9.0.1:4739", 3, 2])
                    + msgpack.packb([WRITTEN, 5]))
    assert acc.sinks == {"ipfix 10.9.0.1:4739": [3, 2]}
    assert acc.records_written == 5
    assert acc.snapshot().sinks == {"ipfix 10.9.0.1:4739": SinkStats(written=3, lost=2)}
    assert ipfix_options(AccCfg(enabled=True), 1, None) is None
    other = AccCfg(enabled=True, ipfix=replace(ipfix, observation_domain=99))
    assert (ipfix_options(other, 4, None) or {})["domain"] == 99
