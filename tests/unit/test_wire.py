"""The sync datagram codec: golden vectors byte for byte, fuzzing, limits, compactness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sync_sim import tcp_flow, udp_flow

from conntrackd_py.flow import pack_flow, unpack_flow
from conntrackd_py.sync import wire
from conntrackd_py.sync.wire import (
    Ack,
    BadDatagram,
    KeyRing,
    Kind,
    Message,
    Nack,
    Reason,
    ResyncRequest,
    decode_untrusted,
    encode_datagram,
)

VECTORS = json.loads(
    (Path(__file__).parents[2] / "proto" / "vectors" / "vectors.json").read_text())
KEYS = {name: bytes.fromhex(k) for name, k in VECTORS["keys"].items()}


def _message(d: dict[str, Any]) -> Any:
    kind = d["kind"]
    if kind == "FLOW_BATCH":  # encoded from a list of updates, decoded as the updates
        return [_message(f) for f in d["flows"]]
    if kind == "FLOW_UPDATE":
        return (bytes.fromhex(d["key"]), bytes.fromhex(d["value"]))
    if kind == "FLOW_DESTROY":
        return (bytes.fromhex(d["key"]), None)
    if kind == "ACK":
        return Ack(d["target"], d["epoch"], d["seq"])
    if kind == "NACK":
        return Nack(d["target"], d["epoch"], tuple(tuple(r) for r in d["ranges"]))
    if kind == "RESYNC_REQUEST":
        return ResyncRequest(d["target"], d["epoch"], d["from_seq"])
    return Kind[kind]


# --- golden vectors ---------------------------------------------------------------------------


def test_key_ids_match_the_vectors() -> None:
    assert {n: wire.key_id(k) for n, k in KEYS.items()} == VECTORS["key_ids"]


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["name"])
def test_golden_vector_decodes_to_its_meaning_and_reencodes_byte_for_byte(
        v: dict[str, Any]) -> None:
    data = bytes.fromhex(v["hex"])
    keys = [KEYS[k] for k in v["keys"]]
    dg = decode_untrusted(data, keys)
    h = v["header"]
    assert data[:2].hex() == h["magic"]
    assert data[2] == h["version"]
    assert (dg.flags, dg.key_id, dg.node, dg.epoch, dg.seq) == (
        h["flags"], h["key_id"], h["node"], h["epoch"], h["seq"])
    assert int.from_bytes(data[17:19], "big") == h["count"]
    msgs = [_message(m) for m in v["messages"]]
    flat = [x for m in msgs for x in (m if type(m) is list else [m])]
    assert dg.messages == flat
    assert dg.n_flows == sum(type(m) is tuple for m in flat)
    assert dg.unknown == v["unknown"]
    if v["tag"] is not None:
        assert data[-16:].hex() == v["tag"]
    meanings = [f for m in v["messages"] for f in m.get("flows", [m])]
    for m, meaning in zip(flat, meanings, strict=True):
        if "flow" in meaning:  # the packed flow forms are part of the wire format too
            k, val = m
            f = unpack_flow(k, val)
            want = meaning["flow"]
            assert (f.zone, f.orig.proto, f.orig.sport, f.orig.dport, f.status, f.timeout,
                    f.mark, f.state) == (want["zone"], want["proto"], want["sport"],
                                         want["dport"], want["status"], want["timeout"],
                                         want["mark"], want["state"])
    if v["reencode"]:
        again = encode_datagram(dg.node, dg.epoch, dg.seq, msgs, sequenced=dg.sequenced,
                                first_lap=dg.first_lap, keys=keys)
        assert again == data


@pytest.mark.parametrize("v", VECTORS["invalid"], ids=lambda v: v["name"])
def test_golden_invalid_datagram_is_refused_with_its_reason(v: dict[str, Any]) -> None:
    with pytest.raises(BadDatagram) as exc:
        decode_untrusted(bytes.fromhex(v["hex"]), [KEYS[k] for k in v["keys"]])
    assert exc.value.reason == Reason(v["reason"])


def test_golden_vectors_cover_every_message_kind_and_reason() -> None:
    kinds = {m["kind"] for v in VECTORS["vectors"] for m in v["messages"]}
    assert kinds == {k.name for k in Kind}
    reasons = {v["reason"] for v in VECTORS["invalid"]}
    assert reasons == {r.value for r in Reason} - {"too_long"}


# --- untrusted input --------------------------------------------------------------------------


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([(), (KEYS["k1"],)]))
def test_random_bytes_raise_only_bad_datagram(data: bytes, keys: tuple[bytes, ...]) -> None:
    reason = None
    try:
        decode_untrusted(data, keys)
    except BadDatagram as e:
        reason = e.reason
    assert reason is None or isinstance(reason, Reason)


_VALID = [bytes.fromhex(v["hex"]) for v in VECTORS["vectors"] if not v["keys"]]


@settings(max_examples=600)
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                         max_size=4), st.integers(0, 400))
def test_mutated_datagrams_raise_only_bad_datagram(base: bytes, edits: list[tuple[int, int]],
                                                   cut: int) -> None:
    data = bytearray(base)
    for pos, val in edits:
        if pos < len(data):
            data[pos] = val
    data = data[: max(cut, 19)] if cut < len(data) else data
    try:
        dg = decode_untrusted(bytes(data))
    except BadDatagram:
        return
    for m in dg.messages:  # whatever decodes is well-formed
        if type(m) is tuple:
            assert wire.is_packed_array(m[0])
            assert m[1] is None or wire.is_packed_array(m[1])


_u32 = st.integers(0, 0xFFFFFFFF)
_flow = st.builds(lambda i, tcp: pack_flow(tcp_flow(2, i) if tcp else udp_flow(1, i)),
                  st.integers(0, 65535), st.booleans())
_stream_msg = st.one_of(_flow, _flow.map(lambda kv: (kv[0], None)),
                        st.sampled_from([Kind.RESYNC_BEGIN, Kind.RESYNC_END, Kind.ALIVE]))
_control_msg = st.one_of(
    st.builds(Ack, _u32, _u32, _u32),
    st.builds(Nack, _u32, _u32, st.lists(st.tuples(_u32, _u32), max_size=wire.MAX_NACK_RANGES)
              .map(tuple)),
    st.builds(ResyncRequest, _u32, _u32, _u32))


@settings(max_examples=300)
@given(st.integers(1, 0xFFFFFFFF), st.integers(1, 0xFFFFFFFF), _u32, st.booleans(),
       st.data(), st.sampled_from([(), (KEYS["k1"],), (KEYS["k2"], KEYS["k1"])]))
def test_any_datagram_round_trips(node: int, epoch: int, seq: int, sequenced: bool,
                                  data: st.DataObject, keys: tuple[bytes, ...]) -> None:
    msgs: list[Message] = data.draw(st.lists(_stream_msg if sequenced else _control_msg,
                                             max_size=20))
    raw = encode_datagram(node, epoch, seq, msgs, sequenced=sequenced, first_lap=True,
                          keys=keys)
    dg = decode_untrusted(raw, tuple(reversed(keys)))  # any configured key verifies
    assert (dg.node, dg.epoch, dg.seq, dg.sequenced, dg.messages) == (
        node, epoch, seq, sequenced, msgs)
    assert dg.n_flows == sum(1 for m in msgs if type(m) is tuple)


def test_two_keys_signed_with_primary_verified_with_either() -> None:
    k1, k2 = KEYS["k1"], KEYS["k2"]
    raw = encode_datagram(1, 2, 3, [Kind.ALIVE], sequenced=True, first_lap=True, keys=[k1, k2])
    assert raw[4] == wire.key_id(k1)
    assert decode_untrusted(raw, [k2, k1]).messages == [Kind.ALIVE]
    with pytest.raises(BadDatagram) as exc:
        decode_untrusted(raw, [k2])
    assert exc.value.reason is Reason.UNKNOWN_KEY


def test_keyring_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="16-64"):
        KeyRing([b"short"])
    with pytest.raises(ValueError, match="distinct"):
        KeyRing([KEYS["k1"], KEYS["k1"]])


def test_too_long_and_nack_range_limit() -> None:
    with pytest.raises(BadDatagram) as exc:
        decode_untrusted(b"CT" + bytes(wire.MAX_DATAGRAM))
    assert exc.value.reason is Reason.TOO_LONG
    many = Nack(1, 1, tuple((i, i) for i in range(wire.MAX_NACK_RANGES + 1)))
    raw = encode_datagram(1, 1, 0, [many], sequenced=False, first_lap=True)
    with pytest.raises(BadDatagram) as exc:
        decode_untrusted(raw)
    assert exc.value.reason is Reason.MALFORMED


# --- compactness ------------------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "limit"), [((), 44.0), ((KEYS["k1"],), 44.5)])
def test_typical_ipv4_udp_flow_costs_about_44_wire_bytes(keys: tuple[bytes, ...],
                                                         limit: float) -> None:
    ring = KeyRing(keys)
    budget = 1400 - wire.HEADER_SIZE - (wire.TAG_SIZE if keys else 0)
    flows = [pack_flow(udp_flow(1, i)) for i in range(64)]
    per = len(wire.UPDATE_PREFIX) + len(flows[0][0]) + len(flows[0][1])
    n = budget // per
    raw = wire.seal(wire.Flag.SEQUENCED, 1, 1, 1, n,
                    b"".join(wire.encode_message(f) for f in flows[:n]), ring)
    assert len(raw) <= 1400
    assert decode_untrusted(raw, keys).n_flows == n
    assert len(raw) / n <= limit
