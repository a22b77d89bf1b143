"""#14: a commit is not echoed back. After `-c` on the backup, the flows it wrote are the
master's: the backup must not send them as its own (the master would file its own flows as
the backup's, and a failback would commit them again). A committed flow that later changes on
the new master is news, and reaches the peer. Real daemons in lab namespaces."""

from __future__ import annotations

import os
import time

import pytest
import trio

from conntrackd_py.flow import unpack_flow
from conntrackd_py.kernel.table import Table
from lab import DaemonProc, Lab, cluster_topology, udp_flows, wait_until

pytestmark = pytest.mark.cluster

KEY = bytes(range(32))
N = 300


def raw(d: DaemonProc, cache: str, origin: int | None = None) -> dict[str, str]:
    args: dict[str, object] = {"cache": cache, "raw": True}
    if origin is not None:
        args["origin"] = origin
    return {row[1]: row[2] for row in d.call("dump", **args)}


def test_a_commit_on_the_backup_is_not_sent_back_until_a_flow_changes_there(
        lab: Lab, tmp_path: object) -> None:
    topo = cluster_topology(lab, n_fw=2)
    a, b = (DaemonProc(fw, os.path.join(str(tmp_path), f"n{k}"), k, topo.sync_ip(k), key=KEY)
            for k, fw in enumerate(topo.fws, 1))
    wait_until(lambda: a.ready() and b.ready(), 20, "both daemons in sync")
    udp_flows(topo.client, topo.server_ip, N)  # through fw1, the VIP holder
    wait_until(lambda: len(raw(a, "internal")) >= N, 20, "fw1 to track the flows")
    wait_until(lambda: raw(b, "external", 1) == raw(a, "internal"), 30, "fw2 to hold them")
    theirs = raw(b, "external", 1)
    before = raw(a, "external", 2)
    assert not set(before) & set(theirs)

    b.call("commit")
    # the reconcile after the commit puts them in fw2's internal cache (a bulk send -B would
    # send them) ...
    wait_until(lambda: set(theirs) <= set(raw(b, "internal")), 20, "fw2's reconcile")
    time.sleep(2.0)  # what would be echoed has long reached fw1 by now (sub-ms link)
    # ... and fw1 does not get its own flows back as node 2's
    assert not set(raw(a, "external", 2)) & set(theirs)
    assert b.stats("runtime")["runtime"]["commit_echoes"] >= N
    # a second commit updates entries the kernel has: the kernel reports each update as an
    # event carrying the commit socket's port id, and fw2 drops them without decoding
    b.call("commit")
    wait_until(lambda: b.stats("cache")["cache"]["kernel_events"]["ignored_own"] >= N, 10,
               "the second commit's own events to be dropped")
    time.sleep(1.0)
    assert not set(raw(a, "external", 2)) & set(theirs)

    # one committed flow changes on fw2 (its mark, set by another netlink socket): news
    k, f = next((k, f) for k, f in ((k, unpack_flow(bytes.fromhex(k), bytes.fromhex(v)))
                                    for k, v in theirs.items()) if f.orig.dport == 5000)
    table = Table(topo.fws[1].name)
    try:
        res = trio.run(lambda: table.commit([f._replace(mark=7, timeout=100)]))
    finally:
        table.close()
    assert res.updated == 1
    wait_until(lambda: k in raw(a, "external", 2), 10, "the changed flow to reach fw1")
    assert len(set(raw(a, "external", 2)) & set(theirs)) == 1
