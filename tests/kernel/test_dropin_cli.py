"""Our command line against the real conntrackd 1.4.7's (issue 14), in a lab namespace.

The same flows the fixtures were captured with (tests/data/conntrackd_outputs/capture.py:
TCP established, UDP, ICMP, a destination-NATed TCP) go into a namespace where our daemon
runs; `-i`, `-i -x` and every `-s KIND` are compared with conntrackd's outputs field by
field. `-d` is tried as primary-backup.sh uses it (`-d; -t; -n`, five times) and with its
lock held (exit 1, one line naming the lock).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import DaemonProc, Lab, Netns

pytestmark = pytest.mark.kernel

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "conntrackd_outputs"


def _capture() -> Any:
    """The fixtures' own script (its flows and addresses), loaded from its file."""
    spec = importlib.util.spec_from_file_location("capture", FIXTURES / "capture.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CAPTURE = _capture()
SYNC_IP: str = CAPTURE.SYNC_IP


def insert_flows(ns: Netns) -> None:
    CAPTURE.insert_flows(ns)


def lab_ns(lab: Lab) -> Netns:
    ns = lab.netns("dropin")
    ns.ip("link", "add", "sync0", "type", "veth", "peer", "name", "sync1")
    ns.ip("link", "set", "sync1", "up")
    ns.ip("addr", "add", f"{SYNC_IP}/24", "dev", "sync0")
    ns.ip("link", "set", "sync0", "up", "multicast", "on")
    ns.ip("link", "set", "lo", "up")
    ns.ip("route", "add", "224.0.0.0/4", "dev", "sync0")
    return ns


@pytest.fixture
def pair(lab: Lab, tmp_path: Path) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    """Our daemons where conntrackd's ran: the flows in the first one's namespace, the second
    one its peer (its external cache receives them)."""
    ns, peer = CAPTURE.pair(lab)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = DaemonProc(ns, str(tmp_path / "a"), 1, SYNC_IP)
    b = DaemonProc(peer, str(tmp_path / "b"), 2, CAPTURE.PEER_IP)
    insert_flows(ns)
    deadline = time.monotonic() + 15
    while (a.internal_count() < 4 or b.external_count() < 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def ours(pair: tuple[DaemonProc, DaemonProc]) -> DaemonProc:
    return pair[0]


def ctl(d: DaemonProc, *flags: str) -> subprocess.CompletedProcess[str]:
    p = d.cli(*flags)
    assert "Traceback" not in p.stderr
    return p


def fields(line: str) -> list[str]:
    """A line's fields, without conntrackd's [active since] (a time)."""
    return re.sub(r" \[active since \d+s\]$", "", line).split(" ")


def test_i_lines_match_conntrackds_field_by_field(ours: DaemonProc) -> None:
    want = sorted(fields(x) for x in (FIXTURES / "i.txt").read_text().splitlines())
    for flags in (("-i",), ("-i", "ct")):
        p = ctl(ours, *flags)
        assert p.returncode == 0
        got = sorted(fields(x) for x in p.stdout.splitlines())
        assert got == want
        # the layout: a protocol column 8 wide, its number, no timeout column, no use=
        assert all(re.match(r"(tcp|udp|icmp) +\d+ [A-Z]*[ s]", x) for x in p.stdout.split("\n")
                   if x)
    assert ctl(ours, "-i", "expect").stdout == (FIXTURES / "i_expect.txt").read_text() == ""
    assert ctl(ours, "-e").stdout == (FIXTURES / "e.txt").read_text() == ""


def test_a_peers_e_lines_and_xml_match_conntrackds(
        pair: tuple[DaemonProc, DaemonProc]) -> None:
    _, b = pair
    want = sorted(fields(x) for x in (FIXTURES / "peer_e.txt").read_text().splitlines())
    p = ctl(b, "-e")
    assert p.returncode == 0
    assert sorted(fields(x) for x in p.stdout.splitlines()) == want
    x = ctl(b, "-e", "-x")
    assert sorted(x.stdout.splitlines()) == \
        sorted((FIXTURES / "peer_e_x.xml").read_text().splitlines())
    # ours in full: the reply tuple (the NATed one's inside server) and the origin node
    full = ctl(b, "-e", "--verbose", "--dst-nat").stdout
    assert "dport=8080 src=10.99.0.7 dst=10.88.0.2 sport=80 dport=40002 [ASSURED]" in full
    assert "[node=1]" in full


def test_xml_matches_conntrackds_but_the_kernel_ids(ours: DaemonProc) -> None:
    def strip(text: str) -> list[str]:  # kernel ids are per host, never replicated
        return sorted(re.sub(r"<id>\d+</id>", "", x) for x in text.splitlines())
    p = ctl(ours, "-i", "-x")
    assert p.returncode == 0
    assert strip(p.stdout) == strip((FIXTURES / "i_x.xml").read_text())


def shape(text: str) -> list[str]:
    """A stats text with its numbers blanked, with their padding (a width depends on the
    number; tests/unit/test_ctformat.py holds the widths byte for byte): its layout."""
    return [re.sub(r" *\d+", " N", line) for line in text.splitlines()]


@pytest.mark.parametrize("kind", [None, "network", "cache", "runtime", "link", "queue",
                                  "process", "ct", "expect", "n", "c", "exp"])
def test_stats_layouts_are_conntrackds(ours: DaemonProc, kind: str | None) -> None:
    words = {"n": "network", "c": "cache", "exp": "expect"}
    name = "s.txt" if kind is None else f"s_{words.get(kind, kind)}.txt"
    p = ctl(ours, *(("-s",) if kind is None else ("-s", kind)))
    assert p.returncode == 0
    assert shape(p.stdout) == shape((FIXTURES / name).read_text())


def test_stats_values_are_ours_in_conntrackds_places(ours: DaemonProc) -> None:
    out = ctl(ours, "-s").stdout
    assert re.search(r"cache internal:\ncurrent active connections:\t +4\n", out)
    assert "multicast traffic (active device=sync0):" in out
    assert "current active connections:\t           4" in ctl(ours, "-s", "ct").stdout


def test_rsqueue_is_conntrackds_header(ours: DaemonProc) -> None:
    # conntrackd lists each queued object's sequence number after it; ours are not per object
    p = ctl(ours, "-s", "rs")
    assert re.fullmatch(r"resent queue \(len=\d+\)\n", p.stdout)


def test_control_commands_are_silent_and_exit_0(ours: DaemonProc) -> None:
    for flags in (("-c",), ("-c", "ct"), ("-c", "expect"), ("-f",), ("-f", "i"), ("-F", "e"),
                  ("-R",), ("-R", "ct"), ("-B",), ("-n",), ("-t",)):
        p = ctl(ours, *flags)
        assert (p.returncode, p.stdout, p.stderr) == (0, "", ""), flags
    p = ctl(ours, "-t", "--verbose")  # conntrackd's -t: one flush, scheduled
    assert re.fullmatch(r"the kernel conntrack table is flushed in \d+ s \(-c, or -f of the "
                        r"internal cache, cancels it\)\n", p.stdout)


def test_usage_errors_exit_1_in_one_line(ours: DaemonProc) -> None:
    for flags in (("-s", "foo"), ("-f", "foo"), ("-x",), ("-d", "-c"), ("-c", "foo")):
        p = ctl(ours, *flags)
        assert p.returncode == 1, flags
        assert p.stderr.count("\n") == 1
    assert ctl(ours, "-s").returncode == 0  # the daemon is still there


def cli(ns: Netns, conf: str, *flags: str, timeout: float = 90
        ) -> subprocess.CompletedProcess[str]:
    return ns.run(sys.executable, "-m", "conntrackd_py.cli", "-C", conf, *flags, check=False,
                  timeout=timeout)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_d_returns_once_the_daemon_answers_and_fails_with_the_reason(
        lab: Lab, tmp_path: Path) -> None:
    ns = lab_ns(lab)
    d = DaemonProc(ns, str(tmp_path), 1, SYNC_IP)
    d.stop()
    conf = d.conf
    for _ in range(5):  # primary-backup.sh: backup after a restart
        t0 = time.monotonic()
        p = cli(ns, conf, "-d")
        took = time.monotonic() - t0
        assert (p.returncode, p.stderr) == (0, ""), p.stderr
        pid = int(d.call("stats", kind="runtime")["runtime"]["pid"])
        for flags in (("-t",), ("-n",)):  # at once: no "cannot reach the daemon"
            q = cli(ns, conf, *flags)
            assert (q.returncode, q.stderr) == (0, ""), (flags, q.stderr, took)
        # a second -d while this one runs: the lock is held, exit 1 with the reason
        q = cli(ns, conf, "-d")
        assert q.returncode == 1
        assert q.stderr.count("\n") == 1
        assert "conntrackd-py.lock" in q.stderr
        assert "Traceback" not in q.stderr
        assert cli(ns, conf, "-k").returncode == 0
        deadline = time.monotonic() + 15
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gone(pid)


def test_d_with_a_missing_sync_interface_exits_1_with_one_line(
        lab: Lab, tmp_path: Path) -> None:
    ns = lab_ns(lab)
    d = DaemonProc(ns, str(tmp_path), 1, SYNC_IP)
    d.stop()
    text = Path(d.conf).read_text().replace("sync0", "nope0")
    Path(d.conf).write_text(text)
    for flags in (("-d",), ()):  # detached, and in the foreground (its log is a file)
        p = cli(ns, d.conf, *flags)
        assert p.returncode == 1
        assert p.stderr.count("\n") == 1
        assert "nope0" in p.stderr
        assert "Traceback" not in p.stderr
