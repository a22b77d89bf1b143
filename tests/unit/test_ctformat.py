"""ctformat: conntrackd 1.4.7's outputs, byte for byte, from our records.

The expected texts are the real conntrackd's, captured for the flows below
(tests/data/conntrackd_outputs/capture.py); the kernel test runs the same flows through our
daemon."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from conntrackd_py import ctformat
from conntrackd_py.flow import Flow, Tuple, pack_flow

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "conntrackd_outputs"


def ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


C, S3, S4, S5, S9, INSIDE = (ip("10.88.0.2"), ip("10.88.0.3"), ip("10.88.0.4"),
                             ip("10.88.0.5"), ip("10.88.0.9"), ip("10.99.0.7"))
SEEN_ASSURED = 0x2 | 0x4 | 0x8

#: capture.py's flows, in the order conntrackd listed them, with the kernel ids it showed
FLOWS = [
    Flow(Tuple(C, S3, 6, 40000, 80), Tuple(S3, C, 6, 80, 40000), status=SEEN_ASSURED, state=3,
         ct_id=2015557754),
    Flow(Tuple(C, S5, 1, icmp_id=77, icmp_type=8), Tuple(S5, C, 1, icmp_id=77, icmp_type=0),
         status=0x8, ct_id=3882506798),
    Flow(Tuple(C, S9, 6, 40002, 8080), Tuple(INSIDE, C, 6, 80, 40002),
         status=SEEN_ASSURED | 0x20, state=3, ct_id=2505207460),
    Flow(Tuple(C, S4, 17, 40001, 53), Tuple(S4, C, 17, 53, 40001), status=0x2 | 0x8,
         ct_id=3350416844),
]


def test_lines_are_conntrackds_byte_for_byte() -> None:
    want = (FIXTURES / "i.txt").read_text().splitlines()
    assert [ctformat.flow_line(f, active=2) for f in FLOWS] == want
    # without a time, the bracket is left out (no trailing space)
    assert ctformat.flow_line(FLOWS[3]).endswith("dport=40001 mark=0")
    assert ctformat.flow_line(FLOWS[3], origin=2, active=5).endswith(
        "mark=0 [node=2] [active since 5s]")


def test_xml_is_conntrackds_byte_for_byte() -> None:
    assert [ctformat.flow_xml(f) for f in FLOWS] == \
        (FIXTURES / "i_x.xml").read_text().splitlines()


def test_external_lines_and_xml_are_conntrackds_without_a_reply_tuple() -> None:
    # conntrackd's external cache keeps no reply tuple (and no kernel id): a peer's -e
    peer = [f._replace(ct_id=0) for f in FLOWS]
    assert [ctformat.flow_line(f, active=2, reply=False) for f in peer] == \
        (FIXTURES / "peer_e.txt").read_text().splitlines()
    assert [ctformat.flow_xml(f, reply=False) for f in peer] == \
        (FIXTURES / "peer_e_x.xml").read_text().splitlines()


def test_other_protocols_and_fields() -> None:
    a6, b6 = bytes(15) + b"\x01", bytes(15) + b"\x02"
    sctp = Flow(Tuple(a6, b6, 132, 1, 2), Tuple(b6, a6, 132, 2, 1), status=0x2, state=4,
                zone=3, mark=9, helper="ftp")
    assert ctformat.flow_line(sctp) == (
        "sctp     132 ESTABLISHED src=::1 dst=::2 sport=1 dport=2 src=::2 dst=::1 sport=2 "
        "dport=1 mark=9 zone=3 helper=ftp")
    assert '<layer3 protonum="10" protoname="ipv6">' in ctformat.flow_xml(sctp)
    gre = Flow(Tuple(C, S3, 47, 0x10, 0x20), Tuple(S3, C, 47, 0x20, 0x10), status=0x2)
    assert "srckey=0x10 dstkey=0x20" in ctformat.flow_line(gre)
    odd = Flow(Tuple(C, S3, 6, 1, 2), Tuple(S3, C, 6, 2, 1), status=0x2, state=42)
    assert ctformat.flow_line(odd).startswith("tcp      6 42 src=")


def rows(flows: list[Flow], origin: int | None = None) -> list[list[Any]]:
    return [[origin, *(x.hex() for x in pack_flow(f))] for f in flows]


def test_dump_filters_and_counts_what_is_not_a_flow() -> None:
    raw = [*rows(FLOWS, 2), [2, "00", "00"], [2, "not hex", ""], ["x"]]
    lines, bad = ctformat.dump_text(raw)
    assert (len(lines), bad) == (4, 3)
    # conntrackd's external lines: no reply tuple, no origin; ours in full on request
    assert lines == [ctformat.flow_line(f, reply=False) for f in FLOWS]
    full = ctformat.dump_text(raw, full=True)[0]
    assert full == [ctformat.flow_line(f, origin=2) for f in FLOWS]
    assert ctformat.dump_text(rows(FLOWS))[0] == [ctformat.flow_line(f) for f in FLOWS]
    assert len(ctformat.dump_text(raw, proto=6)[0]) == 2
    assert ctformat.dump_text(raw, nat="dst")[0] == [ctformat.flow_line(FLOWS[2], reply=False)]
    assert ctformat.dump_text(raw, nat="src")[0] == []
    assert len(ctformat.dump_text(raw, nat="any")[0]) == 1
    xml, bad = ctformat.dump_xml(raw, proto=17)
    assert (len(xml), bad) == (1, 3)
    # the active time, when the daemon sends it
    timed = [[*r, 7] for r in rows(FLOWS[:1])]
    assert ctformat.dump_text(timed)[0][0].endswith("[active since 7s]")


def test_json_records_are_structured() -> None:
    recs, bad = ctformat.dump_json([[*r, 4] for r in rows(FLOWS, 5)])
    assert bad == 0
    nat = recs[2]
    assert nat["proto"] == "tcp"
    assert nat["state"] == "ESTABLISHED"
    assert nat["original"] == {"src": "10.88.0.2", "dst": "10.88.0.9", "sport": 40002,
                               "dport": 8080}
    assert nat["reply"]["src"] == "10.99.0.7"
    assert (nat["assured"], nat["unreplied"], nat["origin_node"], nat["active_since_s"]) == (
        True, False, 5, 4)
    assert recs[1]["original"] == {"src": "10.88.0.2", "dst": "10.88.0.5", "type": 8,
                                   "code": 0, "id": 77}
    assert recs[1]["unreplied"] is True


#: a snapshot with the numbers conntrackd showed when the fixtures were captured
CHANNEL = {"channel": "multicast 225.0.0.50:3780 on sync0", "up": True, "sent": 5,
           "received": 1, "send_errors": 0, "bytes_sent": 368, "bytes_received": 16}
SNAPSHOT = {
    "runtime": {"uptime_s": 3.0},
    "cache": {"internal": 4, "external": 0,
              "kernel_events": {"events": 4, "new": 4, "update": 0, "destroy": 0,
                                "overruns": 0, "malformed": 0, "rcvbuf": 67108864},
              "tracker": {"ignored": 0, "dumps": 0}},
    "sync": {"counters": {"resend_queue_depth": 1, "malformed": 0, "lost": 0}},
    "link": {"active": CHANNEL["channel"], "channels": [CHANNEL]},
    "control": {"errors": 0, "bad_requests": 0},
}


@pytest.mark.parametrize("word", ["ct", "network", "cache", "runtime", "link", "process",
                                  "expect"])
def test_stats_layouts_are_conntrackds_byte_for_byte(word: str) -> None:
    assert ctformat.stats_text(word, SNAPSHOT) == (FIXTURES / f"s_{word}.txt").read_text()


def test_stats_layouts_that_differ_say_where() -> None:
    # queue: conntrackd's "allocated queue nodes" (its control messages) has no equivalent
    got = ctformat.stats_text("queue", SNAPSHOT).splitlines()
    want = (FIXTURES / "s_queue.txt").read_text().splitlines()
    assert [(g, w) for g, w in zip(got, want, strict=True) if g != w] == [
        ("allocated queue nodes:\t\t           0", "allocated queue nodes:\t\t           1")]
    # rsqueue: conntrackd lists each queued object's sequence number; ours are not per object
    assert ctformat.stats_text("rsqueue", SNAPSHOT) == \
        (FIXTURES / "s_rsqueue.txt").read_text().splitlines()[0] + "\n"
    # a snapshot missing sections (stats mode, an older daemon) still prints the layout
    assert ctformat.stats_text("ct", {}).startswith("cache internal:\n")
    assert "multicast traffic" not in ctformat.stats_text("ct", {})


class _Reads(Mapping[str, Any]):
    """A stats JSON section that records each key a layout asked for and did not find."""

    def __init__(self, d: Mapping[str, Any], path: str, missing: list[str]) -> None:
        self._d, self._path, self._missing = d, path, missing

    def _wrap(self, key: str, v: Any) -> Any:
        p = f"{self._path}.{key}"
        if isinstance(v, Mapping):
            return _Reads(v, p, self._missing)
        if isinstance(v, list):
            return [_Reads(x, f"{p}[]", self._missing) if isinstance(x, Mapping) else x
                    for x in v]
        return v

    def __contains__(self, key: object) -> bool:
        if key not in self._d:
            self._missing.append(f"{self._path}.{key}")
            return False
        return True

    def __getitem__(self, key: str) -> Any:
        if key not in self._d:
            self._missing.append(f"{self._path}.{key}")
            raise KeyError(key)
        return self._wrap(key, self._d[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


def test_every_layout_reads_only_fields_a_real_daemon_snapshot_has(tmp_path: Path) -> None:
    # a renamed stats field would otherwise print 0 (the layouts' default) and no test fail
    from test_daemon_shell import daemon_snapshot

    from conntrackd_py import stats

    js = daemon_snapshot(tmp_path).as_dict()
    assert js["sync"] is not None
    assert js["link"]["channels"]
    for word, (kind, _) in ctformat.STATS_LAYOUTS.items():
        shown = {k: v for k, v in js.items() if k in stats.sections(kind)}  # what -s asks
        missing: list[str] = []
        text = ctformat.stats_text(word, _Reads(shown, word, missing))
        assert missing == [], (word, missing)
        if word not in ("process", "expect"):
            assert text


def test_network_counts_what_the_daemon_counts() -> None:
    snap = {"sync": {"counters": {"malformed": 3, "bad_mac": 4, "unknown_kind": 0,
                                  "lost": 0, "replayed": 0}},
            "link": {"active": "x", "channels": [{"channel": "x", "oversize": 2},
                                                 {"channel": "y", "oversize": 5}]}}
    text = ctformat.stats_text("network", snap)
    assert f"Malformed messages:\t{14:>20}\n" in text
    assert f"Malformed header:\t{3:>20}\n" in text
    assert f"Bad message size:\t{7:>20}\n" in text


def test_every_conntrackd_word_has_a_layout() -> None:
    from conntrackd_py import cli
    assert set(ctformat.STATS_LAYOUTS) == set(cli.STATS_WORDS) - {"multicast"}


def test_watch_lines_are_conntrack_E_lines() -> None:
    # conntrack 1.4.7 -E for a conntrack -I then -U (its [USERSPACE] portid= suffix, which
    # says a program made the change, is left out of the fixture)
    a, b = ip("10.1.0.1"), ip("10.1.0.2")
    new = Flow(Tuple(a, b, 6, 1000, 80), Tuple(b, a, 6, 80, 1000), status=0x2, timeout=100,
               state=1)
    upd = new._replace(status=0x2 | 0x4, timeout=200, state=3)
    got = [ctformat.watch_text([ev, "internal", None, *(x.hex() for x in pack_flow(f))])
           for ev, f in (("new", new), ("update", upd))]
    assert got == (FIXTURES / "conntrack_E.txt").read_text().splitlines()
    key = pack_flow(new)[0].hex()
    assert ctformat.watch_text(["destroy", "external", 3, key, None]) == (
        "[DESTROY] tcp      6 src=10.1.0.1 dst=10.1.0.2 sport=1000 dport=80 [node=3]")
    assert ctformat.watch_text(["update", "internal", None, "zz", None]).startswith(
        "[UPDATE] undecodable")
    assert ctformat.watch_text("[UPDATE] internal: text") == "[UPDATE] internal: text"
