"""Regenerate vectors.json, the golden datagrams of proto/PROTOCOL.md (version 1).

    .venv/bin/python proto/vectors/generate.py

Only needed when the protocol changes (then bump the version): tests/unit/test_wire.py checks
the stored bytes against the codec, byte for byte, both ways. Every vector is built from
explicit values below, so a reader can follow each byte with the spec in hand.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from conntrackd_py.flow import Flow, Status, Tuple, pack_flow, unpack_flow
from conntrackd_py.sync import wire
from conntrackd_py.sync.wire import Ack, Kind, Message, Nack, ResyncRequest

OUT = Path(__file__).with_name("vectors.json")
KEYS = {
    "k1": bytes(range(32)),
    "k2": bytes(range(0xA0, 0xC0)),
}
EPOCH = 1_764_000_000  # whole seconds of the wall clock at start, as the daemon picks it


def ip(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


ST = Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED

UDP_DNS = Flow(orig=Tuple(ip("10.0.0.1"), ip("192.168.1.2"), 17, 40000, 53),
               reply=Tuple(ip("192.168.1.2"), ip("10.0.0.1"), 17, 53, 40000),
               status=int(ST | Status.SRC_NAT_DONE | Status.DST_NAT_DONE), timeout=30)
TCP_NAT = Flow(orig=Tuple(ip("10.0.0.7"), ip("93.184.216.34"), 6, 51000, 443),
               reply=Tuple(ip("93.184.216.34"), ip("203.0.113.5"), 6, 443, 51000),
               status=int(ST | Status.SRC_NAT | Status.SRC_NAT_DONE | Status.DST_NAT_DONE),
               timeout=431999, mark=7, state=3, tcp_flags_orig=0x2B, tcp_flags_reply=0x23,
               tcp_wscale_orig=7, tcp_wscale_reply=7)
UDP6 = Flow(orig=Tuple(ip("2001:db8::1"), ip("2001:db8:1::53"), 17, 5353, 53),
            reply=Tuple(ip("2001:db8:1::53"), ip("2001:db8::1"), 17, 53, 5353),
            status=int(ST), timeout=120, zone=3)


def flow_msg(f: Flow, destroy: bool = False) -> tuple[bytes, bytes | None]:
    k, v = pack_flow(f)
    return (k, None) if destroy else (k, v)


def flat(msgs: list[Any]) -> list[Message]:
    """Messages as decoded: a FLOW_BATCH (a list of updates here) arrives as its updates."""
    return [x for m in msgs for x in (m if type(m) is list else [m])]


def describe(m: Any) -> dict[str, Any]:
    if type(m) is list:
        return {"kind": "FLOW_BATCH", "flows": [describe(x) for x in m]}
    if type(m) is tuple:
        k, v = m
        d: dict[str, Any] = {"kind": "FLOW_DESTROY" if v is None else "FLOW_UPDATE",
                             "key": k.hex()}
        if v is not None:
            d["value"] = v.hex()
            f = unpack_flow(k, v)
            d["flow"] = {"zone": f.zone, "proto": f.orig.proto,
                         "src": str(ipaddress.ip_address(f.orig.src)),
                         "dst": str(ipaddress.ip_address(f.orig.dst)),
                         "sport": f.orig.sport, "dport": f.orig.dport,
                         "reply_dst": str(ipaddress.ip_address(f.reply.dst)),
                         "status": f.status, "timeout": f.timeout, "mark": f.mark,
                         "state": f.state}
        return d
    if isinstance(m, Kind):
        return {"kind": m.name}
    if isinstance(m, Ack):
        return {"kind": "ACK", "target": m.target, "epoch": m.epoch, "seq": m.seq}
    if isinstance(m, Nack):
        return {"kind": "NACK", "target": m.target, "epoch": m.epoch,
                "ranges": [list(r) for r in m.ranges]}
    assert isinstance(m, ResyncRequest)
    return {"kind": "RESYNC_REQUEST", "target": m.target, "epoch": m.epoch,
            "from_seq": m.from_seq}


def vector(name: str, text: str, node: int, seq: int, msgs: list[Any], *,
           sequenced: bool, first_lap: bool = True, key: str | None = None,
           pad_to: int = 0) -> dict[str, Any]:
    keys = [KEYS[key]] if key else []
    data = wire.encode_datagram(node, EPOCH, seq, msgs, sequenced=sequenced,
                                first_lap=first_lap, keys=keys)
    if pad_to:  # padding goes before the tag: seal the padded body again
        ring = wire.KeyRing(keys)
        end = len(data) - (wire.TAG_SIZE if keys else 0)
        body = data[wire.HEADER_SIZE:end]
        body += wire.PAD * (pad_to - len(data))
        flags = data[3]
        data = wire.seal(flags, node, EPOCH, seq, len(msgs), body, ring)
        assert len(data) == pad_to
    dg = wire.decode_untrusted(data, keys)
    assert dg.messages == flat(msgs)
    return {
        "name": name, "description": text, "hex": data.hex(), "keys": [key] if key else [],
        "header": {"magic": wire.MAGIC.hex(), "version": wire.VERSION, "flags": dg.flags,
                   "key_id": dg.key_id, "node": node, "epoch": EPOCH, "seq": seq,
                   "count": len(msgs)},
        "tag": data[-wire.TAG_SIZE:].hex() if key else None,
        "messages": [describe(m) for m in msgs], "unknown": 0, "reencode": not pad_to,
    }


def raw(flags: int, count: int, body: bytes, seq: int = 1, key_id: int = 0) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, flags, key_id, 1, EPOCH, seq,
                            count) + body


def main() -> None:
    u, t, v6 = flow_msg(UDP_DNS), flow_msg(TCP_NAT), flow_msg(UDP6)
    d = flow_msg(UDP_DNS, destroy=True)
    vectors = [
        vector("flow-updates", "stream datagram 7 of node 1: an IPv4 UDP flow and a NAT'd TCP "
               "flow, no authentication", 1, 7, [u, t], sequenced=True),
        vector("flow-updates-tagged", "the same with a BLAKE2b-128 tag under key k1", 1, 7,
               [u, t], sequenced=True, key="k1"),
        vector("flow-destroy-and-ipv6", "a destroy and an IPv6 flow in zone 3, tagged with k2",
               1, 8, [d, v6], sequenced=True, key="k2"),
        vector("resync-bracket", "a whole full resync in one datagram: RESYNC_BEGIN, the only "
               "flow, RESYNC_END", 2, 1, [Kind.RESYNC_BEGIN, u, Kind.RESYNC_END],
               sequenced=True),
        vector("flow-batch", "a full resync's datagram: RESYNC_BEGIN, then one FLOW_BATCH of "
               "three flows (keys and values as bin), tagged with k1", 1, 9,
               [Kind.RESYNC_BEGIN, [u, t, v6]], sequenced=True, key="k1"),
        vector("flow-batch-padded", "a FLOW_BATCH and RESYNC_END in a datagram padded with "
               "0xC1 bytes to 200 bytes (full resync datagrams are padded to one length)", 1,
               10, [[u, t], Kind.RESYNC_END], sequenced=True, pad_to=200),
        vector("alive-wrapped", "an ALIVE after the sequence wrapped (no FIRST_LAP flag)", 2,
               5, [Kind.ALIVE], sequenced=True, first_lap=False),
        vector("ack-and-nack", "control datagram of node 2 (its newest seq is 9): ACK of node "
               "1's stream up to 41, NACK of 43 and 45-47", 2, 9,
               [Ack(1, EPOCH, 41), Nack(1, EPOCH, ((43, 43), (45, 47)))], sequenced=False),
        vector("resync-request-all", "a starting node asks every node for a full resync (it "
               "has sent nothing yet: header seq 0)", 3, 0,
               [ResyncRequest(wire.ALL_NODES, 0, 0)], sequenced=False),
        vector("resync-request-targeted", "node 3 asks node 1 (epoch, position known)", 3, 12,
               [ResyncRequest(1, EPOCH, 300)], sequenced=False, key="k1"),
    ]
    sf = wire.Flag.SEQUENCED | wire.Flag.FIRST_LAP
    k, val = u
    assert val is not None
    newer = raw(sf, 3, b"\x93\x28\x01\xa1x"  # kind 40 (unknown), two fields: skipped
                + b"\x94\x00" + k + val + b"\xc3"  # FLOW_UPDATE with a 4th field: ignored
                + b"\x91\x04")  # ALIVE
    vectors.append({
        "name": "newer-version-extras", "description": "from a newer implementation: an "
        "unknown message kind (40) and a FLOW_UPDATE with an extra field; both skipped and "
        "counted, the rest applies", "hex": newer.hex(), "keys": [],
        "header": {"magic": wire.MAGIC.hex(), "version": 1, "flags": int(sf), "key_id": 0,
                   "node": 1, "epoch": EPOCH, "seq": 1, "count": 3},
        "tag": None, "messages": [describe(u), {"kind": "ALIVE"}], "unknown": 2,
        "reencode": False,
    })
    good = bytes.fromhex(vectors[1]["hex"])
    flipped = bytearray(good)
    flipped[30] ^= 0x01
    invalid = [
        ("short", b"CT\x01", [], "short"),
        ("bad-magic", b"XX" + good[2:], [], "magic"),
        ("version-2", good[:2] + b"\x02" + good[3:], ["k1"], "version"),
        ("untagged-to-keyed", bytes.fromhex(vectors[0]["hex"]), ["k1"], "untagged"),
        ("tagged-to-open", good, [], "unexpected_tag"),
        ("unknown-key-id", good, ["k2"], "unknown_key"),
        ("bit-flip", bytes(flipped), ["k1"], "bad_tag"),
        ("count-too-high", raw(sf, 2, b"\x91\x04"), [], "malformed"),
        ("trailing-bytes", raw(sf, 1, b"\x91\x04\x00"), [], "trailing"),
        ("flow-in-control-datagram", raw(0, 1, b"\x92\x01" + k), [], "misplaced"),
        ("ack-in-stream-datagram", raw(sf, 1, b"\x94\x10\x01\x01\x01"), [], "misplaced"),
        ("key-not-an-array", raw(sf, 1, b"\x93\x00\x01" + val), [], "malformed"),
        ("batch-in-control-datagram", raw(0, 1, wire.encode_batch([k, val])), [],
         "misplaced"),
        ("batch-odd-length", raw(sf, 1, wire.encode_batch([k, val, k])), [], "malformed"),
        ("batch-of-integers", raw(sf, 1, b"\x92\x05\x92\x01\x02"), [], "malformed"),
        ("batch-value-not-an-array", raw(sf, 1, wire.encode_batch([k, b"\x01"])), [],
         "malformed"),
        ("padding-not-0xc1", raw(sf, 1, b"\x91\x04\xc1\xc1\x00"), [], "trailing"),
        ("node-zero", wire.HEADER.pack(wire.MAGIC, 1, sf, 0, 0, EPOCH, 1, 1) + b"\x91\x04",
         [], "malformed"),
    ]
    doc = {
        "protocol": "conntrackd-py sync", "version": wire.VERSION,
        "keys": {name: key.hex() for name, key in KEYS.items()},
        "key_ids": {name: wire.key_id(key) for name, key in KEYS.items()},
        "vectors": vectors,
        "invalid": [{"name": n, "hex": b.hex(), "keys": ks, "reason": r}
                    for n, b, ks, r in invalid],
    }
    for item in doc["invalid"]:
        keys = [KEYS[x] for x in item["keys"]]
        try:
            wire.decode_untrusted(bytes.fromhex(item["hex"]), keys)
        except wire.BadDatagram as e:
            if e.reason.value != item["reason"]:
                raise AssertionError(f"{item['name']}: {e}") from None
        else:
            raise AssertionError(f"{item['name']} decoded")
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT} ({len(vectors)} vectors, {len(invalid)} invalid)")


if __name__ == "__main__":
    main()
