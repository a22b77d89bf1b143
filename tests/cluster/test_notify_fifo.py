"""#14: the daemon follows keepalived itself through keepalived's notify FIFO, with no process
per transition: keepalived (`vrrp_notify_fifo`) writes `INSTANCE "FW" MASTER 100`, and the
daemon runs primary-backup.sh's steps. The notify scripts here run no conntrackd-py command;
a NAT'd TCP stream survives a hard kill of the master only if the backup commits by itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hapair import SERVICE, build_pair

from lab import DaemonProc, Lab, TcpStream, wait_until

pytestmark = pytest.mark.cluster


def runtime(d: DaemonProc) -> dict[str, object]:
    return dict(d.stats("runtime")["runtime"])


def test_the_backup_commits_on_its_own_when_keepalived_makes_it_master(
        lab: Lab, tmp_path: Path) -> None:
    pair = build_pair(lab, tmp_path, notify_fifo=True)
    topo, d1, d2 = pair.topo, pair.daemon(1), pair.daemon(2)
    wait_until(lambda: runtime(d1)["keepalived_state"] == "MASTER", 15,
               "fw1's daemon to hear MASTER from keepalived")
    wait_until(lambda: runtime(d2)["keepalived_state"] == "BACKUP", 15,
               "fw2's daemon to hear BACKUP from keepalived")

    stream = TcpStream(topo.client, topo.server, topo.server_ip, SERVICE)
    key_port = f"sport={stream.sport} "
    wait_until(lambda: any(key_port in line for line in d2.call("dump", cache="external")),
               10, "the stream's flow to reach fw2's external cache")
    time.sleep(0.5)
    before = stream.status()
    assert before["received"] > 50

    failed_at = pair.kill_master()
    wait_until(lambda: runtime(d2)["keepalived_state"] == "MASTER", 10,
               "fw2's daemon to hear MASTER from keepalived")
    took = time.time() - failed_at
    time.sleep(3)
    after = stream.status()
    assert after["received"] > before["received"] + 200, ("the stream stalled", after)
    rt = runtime(d2)
    assert rt["commits"] == 1  # by the daemon itself: the scripts run no command
    assert rt["keepalived_transitions"] == 2  # BACKUP, then MASTER
    assert not os.path.exists(tmp_path / "k2" / "notify.out")
    assert "keepalived: instance FW is MASTER; running commit, flush, resync, bulk_send" \
        in d2.read_log()
    print(f"\nfailover through the FIFO: MASTER heard {took:.3f} s after the failure, "
          f"stream stall {after['max_stall']:.3f} s")
    final = stream.stop()
    assert final["errors"] == [], final
