"""A peer's packed flows checked at the edge (`flow.filter_untrusted`): the fast path against the
plain reference (`flow.untrusted_refusal`), and what it accepts always encodes for the kernel."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conntrackd_py import flow as flowmod
from conntrackd_py.flow import (
    K_ZONE,
    REFUSAL_REASONS,
    V_HELPER,
    V_LABELS,
    V_MASTER,
    V_REPLY,
    V_STATE,
    V_STATUS,
    V_TCP_FLAGS_ORIG,
    V_TIMEOUT,
    V_WSCALE_REPLY,
    Flow,
    Status,
    TcpState,
    Tuple,
    filter_untrusted,
    pack_flow,
    pack_key,
    unpack_flow,
    untrusted_refusal,
)
from conntrackd_py.kernel import codec

U32 = 2**32 - 1


def _pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


# --- strategies ------------------------------------------------------------------------------

_protos = st.sampled_from([0, 1, 6, 17, 33, 47, 58, 99, 132, 136, 255])


@st.composite
def _tuples(draw: st.DrawFn, alen: int, proto: int | None = None) -> Tuple:
    addr = st.binary(min_size=alen, max_size=alen)
    return Tuple(draw(addr), draw(addr), draw(_protos) if proto is None else proto,
                 draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)),
                 draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 255)),
                 draw(st.integers(0, 255)),
                 draw(st.sampled_from([b"", b"\x08\x00\x63\x00\x01\x02\x03\x04"])))


@st.composite
def valid_flows(draw: st.DrawFn) -> Flow:
    """Flows whose every field is in the kernel's range, in every shape the packer makes."""
    alen = draw(st.sampled_from([4, 16]))
    orig = draw(_tuples(alen))
    inv = orig.invert()
    other = draw(_tuples(alen, orig.proto))
    reply = draw(st.sampled_from([
        inv, inv._replace(dst=other.dst, dport=other.dport),
        inv._replace(src=other.src, sport=other.sport, dst=other.dst, dport=other.dport),
        other]))
    if orig.proto == 6:
        state = draw(st.none() | st.sampled_from(list(TcpState)).map(int))
    else:
        state = draw(st.none() | st.integers(0, 255))
    return Flow(
        orig, reply,
        status=draw(st.integers(0, 0xFFFF)) & ~int(Status.TEMPLATE),
        timeout=draw(st.integers(0, U32)), mark=draw(st.integers(0, U32)),
        zone=draw(st.integers(0, 0xFFFF)), state=state,
        tcp_flags_orig=draw(st.integers(0, 255)), tcp_flags_reply=draw(st.integers(0, 255)),
        tcp_wscale_orig=draw(st.integers(0, 14)), tcp_wscale_reply=draw(st.integers(0, 14)),
        labels=draw(st.sampled_from([0, 4, 8, 12, 16]).flatmap(
            lambda n: st.binary(min_size=n, max_size=n))),
        helper=draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=15)),
        master=draw(st.none() | _tuples(alen)),
        secmark=draw(st.integers(0, U32)),
    )


def _common(f: Flow) -> Flow:
    """`f` in the shapes the kernel usually gives (tier 1's): no opaque, labels of 0 or 16
    bytes, no master, a state up to 9, a reply that is the inverse or a NAT of it."""
    f = f._replace(orig=f.orig._replace(opaque=b""), master=None,
                   labels=f.labels if len(f.labels) in (0, 16) else b"",
                   state=None if f.state is None or f.state > 9 else f.state)
    if len(flowmod._pack_value_list(f)[V_REPLY] or ()) == 9:
        f = f._replace(reply=f.orig.invert())
    return f


# numbers at and around every limit a field has (most refusals are one past a limit)
_bounds = st.sampled_from(sorted({b + d for b in (0, 9, 14, 127, 255, 0x7FF, 0x800, 0xF7FF,
                                                   0xFFFF, 0x10000, U32)
                                  for d in (-1, 0, 1)} | {2**64 - 1, -2**63}))
_bytes = st.sampled_from([0, 1, 3, 4, 5, 15, 16, 17, 255, 256, 257]).flatmap(
    lambda n: st.binary(min_size=n, max_size=n))
# anything msgpack can carry, where a field goes; limits and lengths most often
_junk = st.one_of(_bounds, _bounds, _bounds, _bytes, st.recursive(
    st.one_of(st.integers(-2**63, 2**64 - 1), st.booleans(), st.floats(allow_nan=False),
              st.binary(max_size=40), st.text(max_size=20), st.none()),
    lambda inner: st.lists(inner, max_size=10), max_leaves=12))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """A valid packed flow with one field (of the key, the value, or a tuple inside the value)
    replaced by anything, the value sometimes cut, lengthened or absent (a destroy)."""
    k, v = pack_flow(draw(valid_flows() | valid_flows().map(_common)))
    kl = msgpack.unpackb(k)
    vl = msgpack.unpackb(v)
    where = draw(st.sampled_from(["key", "value", "nested", "length", "none", "raw"]))
    if where == "key":
        kl[draw(st.integers(0, len(kl) - 1))] = draw(_junk)
    elif where == "value":
        vl[draw(st.integers(0, len(vl) - 1))] = draw(_junk)
    elif where == "nested":
        i = draw(st.sampled_from([V_REPLY, V_MASTER]))
        if type(vl[i]) is list:
            vl[i][draw(st.integers(0, len(vl[i]) - 1))] = draw(_junk)
        else:
            vl[i] = draw(_junk)
    elif where == "length":
        vl = vl[:draw(st.integers(0, len(vl)))] + draw(st.lists(_junk, max_size=60))
    elif where == "raw":
        return draw(st.binary(max_size=30)), draw(st.none() | st.binary(max_size=30))
    return _pack(kl), None if where == "none" else _pack(vl)


# --- the properties --------------------------------------------------------------------------

def _by_reference(pairs: list[tuple[bytes, bytes | None]]
                  ) -> tuple[list[tuple[bytes, bytes | None]], Counter[str]]:
    reasons = [untrusted_refusal(k, v) for k, v in pairs]
    return ([kv for kv, why in zip(pairs, reasons, strict=True) if why is None],
            Counter(why for why in reasons if why is not None))


@settings(max_examples=200, deadline=None)
@given(st.lists(mutated() | valid_flows().map(pack_flow), max_size=6))
def test_the_fast_path_keeps_and_refuses_exactly_what_the_reference_does(
        pairs: list[tuple[bytes, bytes | None]]) -> None:
    ok, refused = filter_untrusted(pairs)
    want_ok, want_refused = _by_reference(pairs)
    assert ok == want_ok
    assert refused == dict(want_refused)
    assert set(refused) <= set(REFUSAL_REASONS)
    assert all(n > 0 for n in refused.values())


def _no_reference(key: Any, value: Any) -> str | None:
    raise AssertionError("the fast path fell back to the reference for a valid flow")


@settings(max_examples=100, deadline=None)
@given(st.lists(valid_flows(), min_size=1, max_size=8), st.booleans())
def test_valid_flows_pass_the_fast_path_alone(flows: list[Flow], destroy: bool) -> None:
    """Every valid shape is accepted without the reference (it is only for refusals)."""
    pairs = [(k, None if destroy else v) for k, v in map(pack_flow, flows)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flowmod, "untrusted_refusal", _no_reference)
        ok, refused = filter_untrusted(pairs)
    assert (ok, refused) == (pairs, {})


@settings(max_examples=1000, deadline=None)
@given(mutated() | valid_flows().map(pack_flow))
def test_what_the_byte_patterns_accept_the_reference_accepts(
        pair: tuple[bytes, bytes | None]) -> None:
    k, v = pair
    for key_re, value_re in ((flowmod._KEY4, flowmod._VALUE4), (flowmod._KEY6, flowmod._VALUE6)):
        if key_re(k) and (v is None or value_re(v)):
            assert untrusted_refusal(k, v) is None


def _no_tier2(key: Any, value: Any) -> str | None:
    raise AssertionError("a common shape missed the byte patterns (tier 1)")


@settings(max_examples=100, deadline=None)
@given(st.lists(valid_flows(), min_size=1, max_size=8), st.booleans())
def test_common_shapes_pass_on_their_bytes_alone(flows: list[Flow], destroy: bool) -> None:
    """Tier 1 (no unpacking) takes every flow of the shapes the kernel usually gives."""
    pairs = [(k, None if destroy else v) for k, v in map(pack_flow, map(_common, flows))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flowmod, "_tier2", _no_tier2)
        ok, refused = filter_untrusted(pairs)
    assert (ok, refused) == (pairs, {})


@settings(max_examples=200, deadline=None)
@given(mutated() | valid_flows().map(pack_flow), st.booleans())
def test_whatever_is_accepted_encodes_as_a_create_an_update_and_a_delete(
        pair: tuple[bytes, bytes | None], be_liberal: bool) -> None:
    """Nothing accepted can make the commit encoder fail (struct.error, ValueError...)."""
    ok, _ = filter_untrusted([pair])
    assume(ok)
    k, v = pair
    zone, orig = flowmod.unpack_key(k)
    codec.encode_delete(zone, orig, 1)
    if v is None:
        return
    f = unpack_flow(k, v)
    codec.encode_create(f, 1, be_liberal=be_liberal)
    codec.encode_create(f, 1, be_liberal=be_liberal, update=True)
    packed = codec.create_body_packed(msgpack.unpackb(k), msgpack.unpackb(v),
                                      be_liberal=be_liberal)
    assert packed is None or packed == (orig.family, codec.create_body(f, be_liberal=be_liberal))


# --- each reason, by example -----------------------------------------------------------------

_O4 = Tuple(b"\n\0\0\1", b"\n\0\0\2", 6, 40000, 443)
_GOOD = Flow(_O4, _O4.invert(), status=0xE, timeout=300, state=3, mark=1)


def _with(key: dict[int, Any] | None = None, value: dict[int, Any] | None = None,
          flow: Flow = _GOOD) -> tuple[bytes, bytes]:
    k, v = (msgpack.unpackb(b) for b in pack_flow(flow))
    for i, x in (key or {}).items():
        k[i] = x
    for i, x in (value or {}).items():
        v[i] = x
    return _pack(k), _pack(v)


_EXAMPLES = [
    (_with(key={K_ZONE: 70000}), "zone"),
    (_with(key={K_ZONE: -1}), "zone"),
    (_with(key={4: 70000}), "port"),
    (_with(key={5: -1}), "port"),
    (_with(key={3: 256}), "proto"),
    (_with(key={1: b"\n\0\0"}), "address"),
    (_with(key={2: bytes(16)}), "address"),
    (_with(key={6: 0x10000}), "icmp"),
    (_with(key={9: bytes(257)}), "opaque"),
    (_with(key={4: True}), "shape"),
    (_with(key={4: 80.0}), "shape"),
    (_with(key={1: "10.0.0.1"}), "shape"),
    (_with(value={V_STATUS: 1 << 16}), "status"),
    (_with(value={V_STATUS: int(Status.TEMPLATE)}), "status"),
    (_with(value={V_TIMEOUT: U32 + 1}), "timeout"),
    (_with(value={V_TIMEOUT: -5}), "timeout"),
    (_with(value={3: 2**40}), "mark"),
    (_with(value={12: 2**32}), "secmark"),
    (_with(value={V_STATE: 10}), "tcp_state"),
    (_with(value={V_STATE: 300}, flow=_GOOD._replace(
        orig=_O4._replace(proto=132), reply=_O4._replace(proto=132).invert())), "state"),
    (_with(value={V_TCP_FLAGS_ORIG: 300}), "tcp_flags"),
    (_with(value={V_WSCALE_REPLY: 15}), "wscale"),
    (_with(value={V_LABELS: bytes(17)}), "labels"),
    (_with(value={V_LABELS: b"\1\2\3"}), "labels"),
    (_with(value={V_HELPER: "x" * 16}), "helper"),
    (_with(value={V_HELPER: "ftp\0"}), "helper"),
    (_with(value={V_HELPER: "ftp\u00e9"}), "helper"),
    (_with(value={V_MASTER: [bytes(16), bytes(16), 6, 1, 21, 0, 0, 0, b""]}), "master"),
    (_with(value={V_MASTER: [b"\n\0\0\1", b"\n\0\0\2", 6, 1, 70000, 0, 0, 0, b""]}), "master"),
    (_with(value={V_REPLY: [b"\n\0\0\1\0", 61000]}), "address"),
    (_with(value={V_REPLY: [b"\n\0\0\1", 70000]}), "port"),
    (_with(value={V_REPLY: [b"\n\0\0\1", 1, 2]}), "shape"),
    (_with(value={V_REPLY: [b"\n\0\0\2", b"\n\0\0\1", 17, 443, 40000, 0, 0, 0, b""]}), "proto"),
    (_with(value={V_TIMEOUT: True}), "shape"),
    (_with(value={V_TIMEOUT: 1.5}), "shape"),
    (_with(value={V_LABELS: [[[]]]}), "shape"),
    ((pack_key(0, _O4), _pack([None, 2, 3])), "shape"),
    ((pack_key(0, _O4), _pack([None, 2, 3, *[0] * 70])), "shape"),
    ((pack_key(0, _O4), b"\xc1"), "shape"),
    ((b"\x91\x00", None), "shape"),
    ((_pack([0, *_O4, 1]), None), "shape"),
]


@pytest.mark.parametrize(("pair", "why"), _EXAMPLES)
def test_each_refusal_names_its_reason(pair: tuple[bytes, bytes | None], why: str) -> None:
    assert untrusted_refusal(*pair) == why
    assert filter_untrusted([pair]) == ([], {why: 1})


def test_every_reason_is_one_the_examples_produce() -> None:
    """The reasons listed for metrics are exactly the ones the checks give."""
    assert {why for _, why in _EXAMPLES} == set(REFUSAL_REASONS)


def test_a_destroy_is_checked_by_its_key_only() -> None:
    k, _ = _with(value={V_STATUS: 1 << 20})
    assert filter_untrusted([(k, None)]) == ([(k, None)], {})
    bad, _ = _with(key={K_ZONE: 70000})
    assert filter_untrusted([(bad, None)]) == ([], {"zone": 1})


def test_later_fields_of_a_value_are_kept_whatever_they_are() -> None:
    """PROTOCOL.md: values may grow trailing fields; receivers keep them."""
    k, v = pack_flow(_GOOD)
    longer = _pack([*msgpack.unpackb(v), {"future": [1, 2.5]}, None])
    assert filter_untrusted([(k, longer)]) == ([(k, longer)], {})


def test_refusals_are_counted_and_the_rest_kept_in_order() -> None:
    good = [pack_flow(_GOOD._replace(orig=_O4._replace(sport=p),
                                     reply=_O4._replace(sport=p).invert())) for p in range(5)]
    bad = [_with(key={K_ZONE: 70000}), _with(value={V_TCP_FLAGS_ORIG: 300}),
           _with(key={K_ZONE: 65536})]
    pairs: list[tuple[bytes, bytes | None]] = [good[0], bad[0], good[1], good[2], bad[1],
                                               good[3], bad[2], good[4]]
    ok, refused = filter_untrusted(pairs)
    assert ok == good
    assert refused == {"zone": 2, "tcp_flags": 1}


_BOUNDS = sorted({b + d for b in (0, 9, 14, 127, 255, 0x7FF, 0x800, 0xF7FF, 0xFFFF, 0x10000, U32)
                  for d in (-1, 0, 1)} | {2**64 - 1, -2**63})
_OTHERS: list[Any] = [True, False, 1.0, None, "x", b"", bytes(4), bytes(16), bytes(17), [],
                      [0], [b"\1\2\3\4", 1], [bytes(16), 1]]
_O6 = Tuple(bytes(15) + b"\1", bytes(15) + b"\2", 17, 5353, 53)
_BASES = [
    _GOOD, _GOOD._replace(helper="ftp", labels=bytes(16), tcp_wscale_orig=14),
    Flow(_O6, _O6.invert()._replace(dst=bytes(16), dport=61000), status=0x1BE, timeout=30),
    Flow(_O4, _O4.invert()._replace(src=b"\1\2\3\4", sport=80, dst=b"\5\6\7\x08"),
         status=0x3E, timeout=U32, mark=U32, secmark=U32, zone=0xFFFF),
]


@pytest.mark.parametrize("base", _BASES)
def test_the_byte_patterns_accept_no_field_past_its_limit(base: Flow) -> None:
    """Every field of common shapes (both families, each reply form), one at a time, set to
    each number at and around a limit and to other types: what tier 1 accepts, the
    reference accepts (and tier 1 does take the bases)."""
    k0, v0 = (msgpack.unpackb(b) for b in pack_flow(base))
    key_re, value_re = ((flowmod._KEY4, flowmod._VALUE4) if len(k0[1]) == 4
                        else (flowmod._KEY6, flowmod._VALUE6))
    assert key_re(_pack(k0))
    assert value_re(_pack(v0))
    checked = 0
    for which, lst in (("key", k0), ("value", v0), ("reply", v0[V_REPLY])):
        for i in range(len(lst or ())):
            for x in [*_BOUNDS, *_OTHERS]:
                k, v = (msgpack.unpackb(b) for b in pack_flow(base))
                {"key": k, "value": v, "reply": v[V_REPLY]}[which][i] = x
                pk, pv = _pack(k), _pack(v)
                if key_re(pk) and value_re(pv):
                    assert untrusted_refusal(pk, pv) is None, (which, i, x)
                    checked += 1
    assert checked > 50
