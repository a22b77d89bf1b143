"""The ctnetlink codec against bytes captured from the real kernel (tests/data/netlink_golden.json).

The expectations come from `conntrack -L` run at capture time, not from our decoder.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conntrackd_py.flow import Flow, Proto, Status, TcpState, Tuple
from conntrackd_py.kernel import codec

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "netlink_golden.json").read_text())
DUMP = [bytes.fromhex(h) for h in GOLDEN["dump"]]
EVENTS = [bytes.fromhex(h) for h in GOLDEN["events"]]


def _decode_all(chunks: list[bytes]) -> list[tuple[codec.EventType, Flow]]:
    out = []
    for data in chunks:
        out.extend(codec.decode_events(data, len(data)))
    return out


def _parse_conntrack_line(line: str) -> dict[str, object]:
    """The fields of one `conntrack -L -o id` line, in the order conntrack prints them."""
    tuples = re.findall(
        r"src=(\S+) dst=(\S+) (?:sport=(\d+) dport=(\d+)|type=(\d+) code=(\d+) id=(\d+))", line)
    counters = [int(x) for pair in re.findall(r"packets=(\d+) bytes=(\d+)", line) for x in pair]
    fields = line.split()
    return {
        "proto": int(fields[1]),
        "timeout": int(fields[2]),
        "state": fields[3] if fields[3].isupper() else None,
        "tuples": tuples,
        "counters": counters,
        "mark": int(re.search(r"mark=(\d+)", line).group(1)),  # type: ignore[union-attr]
        "id": int(re.findall(r" id=(\d+)", line)[-1]),  # the ICMP id comes earlier
        "assured": "[ASSURED]" in line,
        "unreplied": "[UNREPLIED]" in line,
    }


def _tuple_fields(t: Tuple) -> tuple[str, ...]:
    src, dst = str(ipaddress.ip_address(t.src)), str(ipaddress.ip_address(t.dst))
    if t.proto in (Proto.ICMP, Proto.ICMPV6):
        return (src, dst, "", "", str(t.icmp_type), str(t.icmp_code), str(t.icmp_id))
    return (src, dst, str(t.sport), str(t.dport), "", "", "")


def test_dump_decodes_to_what_conntrack_lists() -> None:
    flows = {f.ct_id: f for kind, f in _decode_all(DUMP)}
    expected = [_parse_conntrack_line(line) for line in GOLDEN["conntrack_L"]
                if not line.startswith("conntrack")]
    assert len(flows) == len(expected) >= 6
    for exp in expected:
        f = flows[exp["id"]]  # type: ignore[index]
        assert f.orig.proto == exp["proto"]
        assert [_tuple_fields(f.orig), _tuple_fields(f.reply)] == exp["tuples"]
        assert f.mark == exp["mark"]
        assert bool(f.status & Status.ASSURED) == exp["assured"]
        assert (not f.status & Status.SEEN_REPLY) == exp["unreplied"]
        assert abs(f.timeout - exp["timeout"]) <= 1  # type: ignore[operator]
        if exp["state"]:
            assert f.state is not None
            assert TcpState(f.state).name == exp["state"]
        assert f.counters is not None
        assert list(f.counters) == exp["counters"]


def test_dump_decodes_nat_from_status_and_reply_tuple() -> None:
    flows = [f for _, f in _decode_all(DUMP)]
    snat = [f for f in flows if f.is_snat]
    dnat = [f for f in flows if f.is_dnat]
    assert len(snat) == 1
    assert snat[0].snat_to == (bytes([127, 0, 0, 3]), 6000)
    assert len(dnat) == 1
    assert dnat[0].dnat_to == (bytes([127, 0, 0, 1]), 7070)
    assert all(f.snat_to is None for f in flows if f not in snat)


def test_events_have_new_update_and_destroy_with_counters_and_times() -> None:
    events = _decode_all(EVENTS)
    kinds = [k for k, _ in events]
    assert kinds.count(codec.EventType.NEW) >= 6
    assert codec.EventType.UPDATE in kinds
    destroys = [f for k, f in events if k == codec.EventType.DESTROY]
    marked = [f for f in destroys if f.mark == 42]
    assert marked, "the DESTROY of the marked UDP flow was captured"
    d = marked[0]
    assert d.orig.dport == 5001
    assert d.counters is not None
    assert d.counters.orig_packets == 1
    assert d.start_ns > 0
    assert d.stop_ns >= d.start_ns
    tcp_updates = [f for k, f in events if k == codec.EventType.UPDATE and f.orig.proto == 6]
    assert {TcpState(f.state).name for f in tcp_updates if f.state is not None} & {
        "ESTABLISHED", "FIN_WAIT", "TIME_WAIT", "CLOSE_WAIT", "LAST_ACK"}


def test_ipv6_flow_decodes_with_16_byte_addresses() -> None:
    v6 = [f for _, f in _decode_all(DUMP) if f.orig.family == 10]
    assert len(v6) == 1
    assert v6[0].orig.src == ipaddress.ip_address("::1").packed


@pytest.mark.parametrize("proto", [6, 17, 1, 58, 132, 47, 99])
def test_create_message_round_trips_through_the_decoder(proto: int) -> None:
    if proto in (1, 58):
        orig = Tuple(bytes(16) if proto == 58 else b"\n\0\0\1",
                     bytes(15) + b"\1" if proto == 58 else b"\n\0\0\2", proto,
                     icmp_id=77, icmp_type=8 if proto == 1 else 128)
    elif proto == 99:
        orig = Tuple(b"\n\0\0\1", b"\n\0\0\2", proto)
    else:
        orig = Tuple(b"\n\0\0\1", b"\n\0\0\2", proto, 1234, 80)
    flow = Flow(orig, orig.invert(), status=int(Status.ASSURED | Status.SEEN_REPLY), timeout=300,
                mark=7, zone=3, state=3 if proto in (6, 132) else None)
    msg = codec.encode_create(flow, 9, be_liberal=False)
    (m,) = list(codec.iter_messages(msg, len(msg)))
    assert m.type == codec.CT_NEW
    assert m.seq == 9
    back = codec.decode_flow(msg, m.start, m.end)
    assert back.orig == flow.orig
    assert back.reply == flow.reply
    assert back.mark == 7
    assert back.zone == 3
    assert back.timeout == 300
    assert back.status == flow.status | Status.CONFIRMED
    assert back.state == flow.state


def test_create_of_natted_flow_sends_inverted_reply_plus_nat_attributes() -> None:
    orig = Tuple(b"\n\0\0\1", b"\n\0\0\2", 17, 1000, 53)
    reply = Tuple(b"\n\0\0\2", b"\n\0\0\x63", 17, 53, 40000)
    flow = Flow(orig, reply, status=int(Status.SRC_NAT | Status.SRC_NAT_DONE), timeout=30)
    msg = codec.encode_create(flow, 1)
    back = codec.decode_flow(msg, 16, len(msg))
    assert back.reply == orig.invert()
    assert b"\n\0\0\x63" in msg
    assert (40000).to_bytes(2, "big") in msg
    upd = codec.encode_create(flow, 2, update=True)
    assert b"\n\0\0\x63" not in upd  # NAT may not be sent on an update (EOPNOTSUPP)


def test_be_liberal_sets_the_tcp_window_flag_both_ways() -> None:
    orig = Tuple(b"\n\0\0\1", b"\n\0\0\2", 6, 1000, 80)
    flow = Flow(orig, orig.invert(), timeout=30, state=3)
    back = codec.decode_flow(m := codec.encode_create(flow, 1, be_liberal=True), 16, len(m))
    assert back.tcp_flags_orig & 0x08
    assert back.tcp_flags_reply & 0x08


def test_error_messages_carry_the_errno() -> None:
    import struct
    ack = struct.pack("=IHHII", 36, codec.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", -17) + bytes(16)
    (m,) = list(codec.iter_messages(ack, len(ack)))
    assert m.seq == 5
    assert codec.error_code(ack, m) == 17


def _all_golden() -> list[bytes]:
    return DUMP + EVENTS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(codec.CodecError):
        codec.decode_events(data, len(data))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_all_golden()), st.data())
def test_truncated_or_corrupted_kernel_bytes_raise_only_codec_error(
    sample: bytes, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(sample)))
    buf = bytearray(sample[:cut])
    if buf and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(codec.CodecError):
        codec.decode_events(bytes(buf), len(buf))


# a DESTROY event captured from this kernel with nf_conntrack_acct and nf_conntrack_timestamp on:
# COUNTERS_ORIG, COUNTERS_REPLY and TIMESTAMP back to back (read in one unpack), then
# CTA_TIMESTAMP_EVENT (27, newer kernels; ignored)
_ACCT_DESTROY = bytes.fromhex(
    "f400000002010000000000009b160000020000003400018014000180080001000a010102080002000a010202"
    "1c0002800500010011000000060002000404000006000300138800003400028014000180080001000a010202"
    "080002000a0102011c00028005000100110000000600020013880000060003000404000008000c00c7a42c83"
    "0800030000000398080007000000001d1c0009800c00010000000000000000010c0002000000000000000020"
    "1c000a800c00010000000000000000000c00020000000000000000001c0014800c00010018ebdc08858cdd26"
    "0c00020018ebdc0897f7fb910c001b0018ebdc0897f7fca0")


def test_destroy_with_accounting_fast_path_matches_the_general_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from conntrackd_py.kernel import codec as c
    ((kind, fast),) = c.decode_events(_ACCT_DESTROY, len(_ACCT_DESTROY))
    assert kind == c.EventType.DESTROY
    assert fast.counters == (1, 32, 0, 0)
    assert fast.start_ns == 0x18EBDC08858CDD26
    assert fast.stop_ns == 0x18EBDC0897F7FB91
    assert (fast.orig.sport, fast.orig.dport) == (1028, 5000)
    monkeypatch.setattr(c, "_ACCT_LAYOUTS", frozenset())
    ((_, slow),) = c.decode_events(_ACCT_DESTROY, len(_ACCT_DESTROY))
    assert slow == fast


def test_event_head_fast_path_matches_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head of an IPv4 event (both tuples, id, status, timeout) read in two unpacks gives
    what the attribute loop gives, for every kernel-captured event and dump message."""
    from conntrackd_py.kernel import codec as c
    msgs = [*EVENTS, *DUMP, _ACCT_DESTROY]
    fast = [c.decode_events(m, len(m)) for m in msgs]
    hits = 0
    real = c._HEAD4_HDRS.unpack_from
    for m in msgs:
        for msg in c.iter_messages(m, len(m)):
            if msg.end - msg.start - 4 >= 128 and real(m, msg.start + 4) == c._HEAD4_WANT:
                hits += 1
    assert hits >= 5  # the fast path is what these captures take
    monkeypatch.setattr(c, "_HEAD4_WANT", ())
    assert [c.decode_events(m, len(m)) for m in msgs] == fast


# --- creates straight from cache entries -----------------------------------------------------

def _ip(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def _entry(flow: Flow) -> tuple[list[Any], list[Any]]:
    import msgpack

    from conntrackd_py.flow import pack_flow
    k, v = pack_flow(flow)
    return msgpack.unpackb(k, use_list=True), msgpack.unpackb(v, use_list=True)


_ASSURED = int(Status.ASSURED | Status.SEEN_REPLY)
_O4 = Tuple(_ip("10.0.0.2"), _ip("192.0.2.1"), 6, 40000, 443)
_O6 = Tuple(_ip("fd00::2"), _ip("fd00:1::9"), 17, 5353, 53)
_COMMON = [
    Flow(_O4, _O4.invert(), status=_ASSURED, timeout=431999, state=3, tcp_flags_orig=0x27,
         tcp_flags_reply=0x23, tcp_wscale_orig=7, tcp_wscale_reply=9, mark=42),
    Flow(_O4, _O4.invert(), status=0, timeout=120, state=1),
    Flow(_O6, _O6.invert(), status=_ASSURED, timeout=30),
    Flow(_O4, Tuple(_O4.dst, _ip("203.0.113.1"), 6, 443, 61000),
         status=_ASSURED | int(Status.SRC_NAT | Status.SRC_NAT_DONE), timeout=99, state=3),
    Flow(_O4, Tuple(_ip("10.9.9.9"), _O4.src, 6, 8443, 40000),
         status=_ASSURED | int(Status.DST_NAT), timeout=99, state=3),
    Flow(_O4, Tuple(_ip("10.9.9.9"), _ip("203.0.113.1"), 6, 8443, 61000),
         status=_ASSURED | int(Status.SRC_NAT | Status.DST_NAT), timeout=99, state=3),
]


@pytest.mark.parametrize("flow", _COMMON)
@pytest.mark.parametrize("be_liberal", [True, False])
def test_create_from_cache_entry_is_the_flows_create(flow: Flow, be_liberal: bool) -> None:
    k, v = _entry(flow)
    got = codec.create_body_packed(k, v, be_liberal=be_liberal)
    assert got == (flow.orig.family, codec.create_body(flow, be_liberal=be_liberal))


@pytest.mark.parametrize("flow", [
    Flow(_O4, _O4.invert(), zone=3),
    Flow(Tuple(_ip("10.0.0.2"), _ip("10.0.0.3"), 1, icmp_id=7, icmp_type=8), Tuple(
        _ip("10.0.0.3"), _ip("10.0.0.2"), 1, icmp_id=7, icmp_type=0)),
    Flow(_O4, _O4.invert(), helper="ftp"),
    Flow(_O4, _O4.invert(), labels=b"\x01" * 16),
    Flow(_O4, _O4.invert(), master=_O6),
    Flow(Tuple(_ip("10.0.0.2"), _ip("10.0.0.3"), 132, 1, 2), Tuple(
        _ip("10.0.0.3"), _ip("10.0.0.2"), 132, 2, 1)),
])
def test_create_from_cache_entry_leaves_other_shapes_to_the_flow_path(flow: Flow) -> None:
    k, v = _entry(flow)
    assert codec.create_body_packed(k, v) is None


def test_create_from_cache_entry_rejects_bad_values() -> None:
    k, v = _entry(_COMMON[0])
    v[2] = 1 << 40  # timeout beyond 32 bits
    with pytest.raises(ValueError, match="bad flow values"):
        codec.create_body_packed(k, v)
    k, v = _entry(_COMMON[0])
    v[5] = 300  # TCP flags beyond a byte (a peer's value that passed the 32-bit check)
    with pytest.raises(ValueError, match="bad flow values"):
        codec.create_body_packed(k, v)
    # the Flow path raises ValueError too: a commit skips and counts the entry
    with pytest.raises(ValueError, match="TCP protoinfo out of range"):
        codec.create_body(_COMMON[0]._replace(tcp_flags_orig=300))
    k, v = _entry(_COMMON[0])
    k[4] = 70000  # a port beyond 16 bits
    with pytest.raises(ValueError, match="bad flow values"):
        codec.create_body_packed(k, v)


@pytest.mark.parametrize(("addr", "port"), [
    ("203.0.113.1", 61000), ("10.0.0.1", 1), ("fd00::1", 443), ("fd00:1::9", 65535)])
@pytest.mark.parametrize("atype", [6, 13])
def test_nat_attribute_in_one_pack_is_the_nested_attributes(addr: str, port: int,
                                                            atype: int) -> None:
    """CTA_NAT_SRC/DST: the one-pack form is byte for byte the nest of the kernel's parts."""
    c = codec
    a = _ip(addr)
    mn, mx = (c._NAT_V4_MIN, c._NAT_V4_MAX) if len(a) == 4 else (c._NAT_V6_MIN, c._NAT_V6_MAX)
    want = c._nest(atype, c._ATTR.pack(4 + len(a), mn) + a, c._ATTR.pack(4 + len(a), mx) + a,
                   c._nest(c._NAT_PROTO, c._be16a(c._PNAT_PORT_MIN, port),
                           c._be16a(c._PNAT_PORT_MAX, port)))
    assert c._nat_ports(atype, a, port) == want
    assert c._nat(atype, a, port, 6) == want


def test_decoder_builds_complete_namedtuples() -> None:
    """The decoder builds Flow and Tuple with tuple.__new__ and every field in order: a field
    added to either must be added there too (this fails first)."""
    assert len(Flow._fields) == 19
    assert len(Tuple._fields) == 9
    ((_, f),) = codec.decode_events(_ACCT_DESTROY, len(_ACCT_DESTROY))
    assert len(f) == len(Flow._fields)
    assert len(f.orig) == len(f.reply) == len(Tuple._fields)
    assert f == Flow(*f)
    assert f.orig == Tuple(*f.orig)


def test_a_commit_skips_and_counts_entries_whose_values_do_not_encode() -> None:
    """One peer's bad value (TCP flags beyond a byte) costs its own entry, not the commit:
    on the packed path and on the Flow path (RELATED flows go that way, masters first)."""
    from conntrackd_py.kernel.table import Table
    table = Table.__new__(Table)  # preparing needs no socket
    good = [_entry(f) for f in _COMMON]
    k, v = _entry(_COMMON[0]._replace(orig=_O4._replace(sport=40001),
                                      reply=_O4._replace(sport=40001).invert()))
    v[5] = 300
    prepared, bad = table._prepare_entries([*good, (k, v)], True)
    assert (len(prepared), bad) == (len(good), 1)
    master = _COMMON[1]
    related = Flow(_O6, _O6.invert(), status=_ASSURED, timeout=30, master=master.orig)
    entries = [*good, (k, v), _entry(related)]
    prepared, bad = table._prepare_entries(entries, True)
    assert (len(prepared), bad) == (len(good) + 1, 1)
    assert prepared[-1][2] == related  # after its master


# --- the fixed layouts: described once, each derived form checked against the general one ---

@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 16]), st.sampled_from([1, 2, 14]), st.data())
def test_a_port_tuple_in_one_pack_is_the_nested_attributes_and_reads_back(
        alen: int, atype: int, data: st.DataObject) -> None:
    addr = st.binary(min_size=alen, max_size=alen)
    t = Tuple(data.draw(addr), data.draw(addr), data.draw(st.sampled_from([6, 17, 33, 47, 132])),
              data.draw(st.integers(0, 0xFFFF)), data.draw(st.integers(0, 0xFFFF)))
    c = codec
    v4 = alen == 4
    ip = c._nest(c._T_IP, c._attr(c._IP_V4_SRC if v4 else c._IP_V6_SRC, t.src),
                 c._attr(c._IP_V4_DST if v4 else c._IP_V6_DST, t.dst))
    proto = c._nest(c._T_PROTO, c._u8a(c._P_NUM, t.proto), c._be16a(c._P_SPORT, t.sport),
                    c._be16a(c._P_DPORT, t.dport))
    want = c._nest(atype, ip, proto)
    assert c._port_tuple(atype, t.src, t.dst, t.proto, t.sport, t.dport) == want
    layout = c._TUPLE4 if v4 else c._TUPLE6
    payload = want[4:]
    assert len(payload) == layout.size
    assert layout.check.unpack_from(payload) == layout.want
    assert layout.read.unpack_from(payload) == (t.src, t.dst, t.proto, t.sport, t.dport)
    assert c._decode_tuple(payload, 0, len(payload)) == (t, 0)
    assert c._decode_tuple_slow(payload, 0, len(payload)) == (t, 0)


@pytest.mark.parametrize("wscale", [(0, 0), (7, 9)])
def test_tcp_protoinfo_in_one_pack_is_the_nested_attributes(wscale: tuple[int, int]) -> None:
    c = codec
    wso, wsr = wscale
    parts = [c._u8a(c._TCP_STATE, 3), c._attr(c._TCP_FLAGS_O, bytes((0x27 | 8, 0xFF))),
             c._attr(c._TCP_FLAGS_R, bytes((0x23 | 8, 0xFF)))]
    if wso or wsr:
        parts += [c._u8a(c._TCP_WSCALE_O, wso), c._u8a(c._TCP_WSCALE_R, wsr)]
    want = c._nest(c.CTA.PROTOINFO, c._nest(c._PI_TCP_NEST, *parts))
    assert c._protoinfo_tcp(3, 0x27, 0x23, wso, wsr, True) == want
    assert c._decode_protoinfo(want, 4, len(want)) == (3, 0x2F, 0x2B, wso, wsr)


def test_a_creates_head_in_one_pack_is_the_tuples_status_and_timeout() -> None:
    for f in _COMMON:
        o = f.orig
        body = codec.create_body(f)
        head = (codec.encode_tuple(1, o) + codec.encode_tuple(2, o.invert())
                + codec._be32a(codec.CTA.STATUS, (f.status & codec.SETTABLE_STATUS) | 8)
                + codec._be32a(codec.CTA.TIMEOUT, f.timeout))
        assert body.startswith(head)


def test_the_tuple_fast_path_matches_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel-captured message decodes the same with the tuple layouts disabled."""
    from conntrackd_py.kernel import codec as c
    msgs = [*EVENTS, *DUMP, _ACCT_DESTROY]
    fast = [c.decode_events(m, len(m)) for m in msgs]
    monkeypatch.setattr(c, "_HEAD4_WANT", ())
    monkeypatch.setattr(c, "_T4_WANT", ())
    monkeypatch.setattr(c, "_T6_WANT", ())
    assert [c.decode_events(m, len(m)) for m in msgs] == fast


@pytest.mark.parametrize("bad", [
    Flow(_O4, _O4.invert(), zone=70000),
    Flow(_O4._replace(sport=70000), _O4.invert()),
    Flow(_O4._replace(dst=bytes(16)), _O4.invert()),
    Flow(_O4, _O4.invert(), mark=2**32),
    Flow(_O4, _O4.invert(), status=int(Status.SRC_NAT), timeout=1)._replace(
        reply=_O4.invert()._replace(dport=70000)),
    Flow(_O4, _O4.invert(), state=3, tcp_wscale_orig=300),
])
def test_values_a_create_cannot_carry_raise_encode_error_only(bad: Flow) -> None:
    with pytest.raises(codec.EncodeError):
        codec.create_body(bad)
    with contextlib.suppress(codec.EncodeError):  # an update carries no NAT: may encode
        codec.encode_create(bad, 1, update=True)
    k, v = _entry(bad)
    with contextlib.suppress(codec.EncodeError):  # or None: not the common shape
        codec.create_body_packed(k, v)


def test_a_delete_of_an_impossible_key_raises_encode_error() -> None:
    with pytest.raises(codec.EncodeError):
        codec.encode_delete(70000, _O4, 1)
    with pytest.raises(codec.EncodeError):
        codec.encode_get(0, _O4._replace(src=b"\1\2\3"), 1)


def _with_pids(data: bytes, pid_of: Any) -> bytes:
    """The same netlink messages, the i-th carrying nlmsg_pid `pid_of(i)`."""
    buf = bytearray(data)
    off = i = 0
    while off + 16 <= len(buf):
        length = int.from_bytes(buf[off:off + 4], "little")
        buf[off + 12:off + 16] = pid_of(i).to_bytes(4, "little")
        off += (length + 3) & ~3
        i += 1
    return bytes(buf)


def test_events_our_own_socket_caused_are_left_out_by_port_id() -> None:
    """A commit's updates come back as events carrying its socket's port id (nlmsg_pid)."""
    data = b"".join(EVENTS)  # one receive of several events
    every = codec.decode_events(data, len(data))
    assert len(every) == len(EVENTS) > 2
    mixed = _with_pids(data, lambda i: 777 if i % 2 else 0)
    kept, skipped = codec.decode_events_except(mixed, len(mixed), {777})
    assert kept == every[::2]
    assert skipped == len(every) // 2
    assert codec.decode_events_except(mixed, len(mixed), {5}) == (every, 0)
    with pytest.raises(codec.CodecError):
        codec.decode_events_except(mixed[:-3], len(mixed) - 3, {777})
