"""The control socket and the command line of a real daemon under hostile input (issue 13).

A pair of daemons in lab namespaces; node 1 receives every hostile control request and CLI
invocation that stopped the daemon on main, a client that resets mid-request, one that never
reads its reply, and more clients at once than the cap. It ends still running, `-s sync` still
exits 0, replication still works, and the bad requests are counted in `-s`.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from hostile_inputs import HOSTILE_REQUESTS, RawClient, req

from lab import DaemonProc, Lab, cluster_topology, udp_flows, wait_until

pytestmark = pytest.mark.kernel


#: the command lines that printed tracebacks on main
BAD_COMMAND_LINES = [
    ("-n", "99999999999999999999999"),
    ("-n", "notanode"),
    ("-s", "{}"),
    ("-e", "--node", "x"),
    ("-i", "-p", "nope"),
    # conntrackd's forms, mistyped
    ("-c", "foo"),
    ("-s", "\x01"),
    ("-f", "x" * 5000),
    ("-e", "expectx"),
    ("-x",),
    ("-d", "-k"),
]


def counters(d: DaemonProc) -> dict[str, int]:
    return dict(d.stats("runtime")["control"])


def test_hostile_control_input_is_refused_counted_and_the_daemon_stays_in_sync(
        lab: Lab, tmp_path: Path) -> None:
    topo = cluster_topology(lab, n_fw=2)
    a = DaemonProc(topo.fws[0], str(tmp_path / "a"), 1, topo.sync_ip(1))
    b = DaemonProc(topo.fws[1], str(tmp_path / "b"), 2, topo.sync_ip(2))
    wait_until(lambda: a.ready() and b.ready(), 30, "both nodes see each other in sync")
    assert stat.S_IMODE(os.stat(a.socket).st_mode) == 0o600
    before = counters(a)

    # every hostile request: an error reply, and the same connection answers the next one
    c = RawClient(a.socket, timeout=30)
    for line in HOSTILE_REQUESTS:
        bad = c.ask(line)
        assert bad["ok"] is False, line[:60]
        assert c.ask(req("in_sync"))["ok"] is True, line[:60]
    c.close()

    # a line without end, and a reset in the middle of a request
    c = RawClient(a.socket, timeout=30)
    c.sock.sendall(b"{" * (200 << 10))
    assert c.read() == {"ok": False, "error": "request too large"}
    c.close()
    for partial in (b'{"cmd": "dump", "args": {"ca', b'{"cmd": "stats"}\n'):
        c = RawClient(a.socket, timeout=30)
        c.sock.sendall(partial)
        c.close(reset=True)

    # the command lines that printed tracebacks: one line, status 1
    for flags in BAD_COMMAND_LINES:
        p = a.cli(*flags)
        assert p.returncode == 1, flags
        assert "Traceback" not in p.stderr, flags
        assert p.stderr.count("\n") == 1, (flags, p.stderr)

    # more clients at once than the cap: the extra one is refused with an error line
    idle = [RawClient(a.socket, timeout=30) for _ in range(64)]
    for i in idle:  # each is being served (the server answered it)
        assert i.ask(req("in_sync"))["ok"] is True
    extra = RawClient(a.socket, timeout=30)
    assert extra.read() == {"ok": False, "error": "too many control clients"}
    extra.close()
    for i in idle:
        i.close()

    # still running, still answering, still replicating, still in sync
    assert a.alive()
    wait_until(lambda: a.cli("-s", "sync").returncode == 0, 30, "-s sync exits 0 on node 1")
    assert a.cli("-s").returncode == 0
    udp_flows(topo.client, topo.server_ip, 20, dport=6100)
    wait_until(lambda: sum("dport=6100" in x for x in b.external_keys(1)) >= 20, 30,
               "new flows of node 1 reach node 2")
    after = counters(a)
    assert after["bad_requests"] - before["bad_requests"] >= len(HOSTILE_REQUESTS) + 1
    assert after["refused_clients"] - before["refused_clients"] >= 1
    assert after["errors"] == before["errors"] == 0


def test_a_control_client_that_never_reads_its_reply_is_dropped(
        lab: Lab, tmp_path: Path) -> None:
    """A dump far larger than the socket's buffers, requested by a client that never reads:
    the daemon drops it after its send timeout and serves everyone else meanwhile."""
    topo = cluster_topology(lab, n_fw=2)
    a = DaemonProc(topo.fws[0], str(tmp_path / "a"), 1, topo.sync_ip(1))
    udp_flows(topo.client, topo.server_ip, 3000, dport=6200)
    wait_until(lambda: a.internal_count() >= 3000, 30, "the flows in node 1's internal cache")
    stuck = RawClient(a.socket, timeout=30)
    stuck.sock.sendall(req("dump", cache="internal", raw=True))  # ~1 MB, never read
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2:  # the daemon is blocked on this client's reply
        assert a.call("in_sync")["in_sync"] in (True, False)
        time.sleep(0.2)
    wait_until(lambda: counters(a)["dropped_clients"] >= 1, 60, "the stuck client dropped")
    stuck.close()
    assert a.alive()
    assert a.cli("-s", "cache").returncode == 0
    assert counters(a)["errors"] == 0
