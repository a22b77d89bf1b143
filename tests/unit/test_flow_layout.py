"""The packed key and value fields are where flow.py's named indexes say, and the protocol
names have one source (`flow.Proto`)."""

from __future__ import annotations

import msgpack

from conntrackd_py import flow
from conntrackd_py.flow import Flow, Proto, Tuple, pack_flow, proto_name, proto_number


def test_each_field_of_a_packed_flow_is_at_its_named_index() -> None:
    orig = Tuple(b"\n\0\0\1", b"\n\0\0\2", 6, 1111, 2222, 3, 4, 5, b"op")
    master = Tuple(b"\n\0\0\3", b"\n\0\0\4", 6, 21, 3333)
    f = Flow(orig, Tuple(b"\n\0\0\x09", b"\n\0\0\x08", 6, 7, 8, 9, 10, 11, b"r"), status=0x1E,
             timeout=101, mark=102, zone=103, state=3, tcp_flags_orig=104, tcp_flags_reply=105,
             tcp_wscale_orig=6, tcp_wscale_reply=7, labels=b"\1\2\3\4", helper="ftp",
             master=master, secmark=106)
    k, v = (msgpack.unpackb(b) for b in pack_flow(f))
    assert len(k) == flow.KEY_LEN
    assert k[flow.K_ZONE] == 103
    assert Tuple(*k[flow.K_TUPLE:]) == orig
    for name in Tuple._fields:
        assert k[getattr(flow, "K_" + name.upper())] == getattr(orig, name)
        assert list(orig)[getattr(flow, "T_" + name.upper())] == getattr(orig, name)
    assert len(v) == flow.VALUE_LEN
    assert v[flow.V_REPLY] == list(f.reply)
    assert v[flow.V_MASTER] == list(master)
    for index, field in [(flow.V_STATUS, "status"), (flow.V_TIMEOUT, "timeout"),
                         (flow.V_MARK, "mark"), (flow.V_STATE, "state"),
                         (flow.V_TCP_FLAGS_ORIG, "tcp_flags_orig"),
                         (flow.V_TCP_FLAGS_REPLY, "tcp_flags_reply"),
                         (flow.V_WSCALE_ORIG, "tcp_wscale_orig"),
                         (flow.V_WSCALE_REPLY, "tcp_wscale_reply"),
                         (flow.V_LABELS, "labels"), (flow.V_HELPER, "helper"),
                         (flow.V_SECMARK, "secmark")]:
        assert v[index] == getattr(f, field), field


def test_protocol_names_come_from_proto() -> None:
    assert {n: proto_number(n) for n in flow.PROTO_BY_NAME} == {
        p.name.lower(): int(p) for p in Proto}
    assert proto_number("TCP") == proto_number("tcp") == 6
    assert proto_number("icmpv6") == 58
    assert proto_number("nope") is None
    assert proto_name(17) == "udp"
    assert proto_name(99) == "99"
    assert all(proto_name(n) == name for name, n in flow.PROTO_BY_NAME.items())
