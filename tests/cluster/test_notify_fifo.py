"""#14: the daemon follows keepalived itself through keepalived's notify FIFO, with no process
per transition: keepalived (`vrrp_notify_fifo`) writes `INSTANCE "FW" MASTER 100`, and the
daemon runs primary-backup.sh's steps. The notify scripts here run no conntrackd-py command;
a NAT'd TCP stream survives a hard kill of the master only if the backup commits by itself.
"""

from __future__ import annotations

import os
import time

import pytest

from lab import (
    DaemonProc,
    Keepalived,
    Lab,
    TcpStream,
    cluster_topology,
    harden_for_failover,
    wait_until,
)

pytestmark = pytest.mark.cluster

SERVICE = 9000


def runtime(d: DaemonProc) -> dict[str, object]:
    return dict(d.stats("runtime")["runtime"])


def test_the_backup_commits_on_its_own_when_keepalived_makes_it_master(
        lab: Lab, tmp_path: object) -> None:
    tmp = str(tmp_path)
    topo = cluster_topology(lab, n_fw=2, nat=True, vip_on=None)
    daemons, kas = [], []
    for k, fw in enumerate(topo.fws, 1):
        harden_for_failover(fw, SERVICE)
        fifo = os.path.join(tmp, f"d{k}", "keepalived.fifo")
        os.makedirs(os.path.dirname(fifo), exist_ok=True)
        daemons.append(DaemonProc(
            fw, os.path.join(tmp, f"d{k}"), k, topo.sync_ip(k), key=bytes(range(32)),
            extra=f"keepalived: {{notify_fifo: {fifo}, instances: [FW]}}"))
        kas.append(Keepalived(fw, os.path.join(tmp, f"k{k}"), topo, 150 if k == 1 else 100,
                              daemons[-1], notify_fifo=fifo))
        if k == 1:
            wait_until(lambda: runtime(daemons[0])["keepalived_state"] == "MASTER", 15,
                       "fw1's daemon to hear MASTER from keepalived")
    d1, d2 = daemons
    wait_until(lambda: runtime(d2)["keepalived_state"] == "BACKUP", 15,
               "fw2's daemon to hear BACKUP from keepalived")

    stream = TcpStream(topo.client, topo.server, topo.server_ip, SERVICE)
    key_port = f"sport={stream.sport} "
    wait_until(lambda: any(key_port in line for line in d2.call("dump", cache="external")),
               10, "the stream's flow to reach fw2's external cache")
    time.sleep(0.5)
    before = stream.status()
    assert before["received"] > 50

    fw1 = topo.fws[0]
    failed_at = time.time()
    fw1.ip("link", "set", "lan0", "down")
    fw1.ip("link", "set", "wan0", "down")
    kas[0].kill()
    d1.kill()
    wait_until(lambda: runtime(d2)["keepalived_state"] == "MASTER", 10,
               "fw2's daemon to hear MASTER from keepalived")
    took = time.time() - failed_at
    time.sleep(3)
    after = stream.status()
    assert after["received"] > before["received"] + 200, ("the stream stalled", after)
    rt = runtime(d2)
    assert rt["commits"] == 1  # by the daemon itself: the scripts run no command
    assert rt["keepalived_transitions"] == 2  # BACKUP, then MASTER
    assert not os.path.exists(os.path.join(tmp, "k2", "notify.out"))
    assert "keepalived: instance FW is MASTER; running commit, flush, resync, bulk_send" \
        in d2.read_log()
    print(f"\nfailover through the FIFO: MASTER heard {took:.3f} s after the failure, "
          f"stream stall {after['max_stall']:.3f} s")
    final = stream.stop()
    assert final["errors"] == [], final
