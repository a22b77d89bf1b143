"""The product's reason to exist: a NAT'd TCP stream survives the loss of its firewall.

client -- LAN -- fw1 / fw2 -- WAN -- server, real keepalived (VRRPv3, 0.2 s adverts) moving
both VIPs, both firewalls SNAT to the server-side VIP, forward/input policy drop, only
established/related plus new SYNs forwarded, nf_conntrack_tcp_loose=0 and be_liberal=0: only a
committed entry can carry the stream on the new master.
"""

from __future__ import annotations

import os
import time

import pytest

from lab import (
    ClusterTopology,
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


def build(lab: Lab, tmp: str, replicate: bool) -> tuple[ClusterTopology, list[DaemonProc | None],
                                                        list[Keepalived]]:
    topo = cluster_topology(lab, n_fw=2, nat=True, vip_on=None)
    daemons: list[DaemonProc | None] = []
    kas = []
    for k, fw in enumerate(topo.fws, 1):
        harden_for_failover(fw, SERVICE)
        d = DaemonProc(fw, os.path.join(tmp, f"d{k}"), k, topo.sync_ip(k),
                       key=bytes(range(32))) if replicate else None
        daemons.append(d)
    for k, fw in enumerate(topo.fws, 1):
        kas.append(Keepalived(fw, os.path.join(tmp, f"k{k}"), topo, 150 if k == 1 else 100,
                              daemons[k - 1]))
        if k == 1:
            wait_until(kas[0].is_master, 15, "fw1 to become VRRP master")
    wait_until(lambda: any(x[2] == "backup" for x in kas[1].notifications()), 15,
               "fw2 to settle as backup")
    return topo, daemons, kas


def fail_fw1(topo: ClusterTopology, daemons: list[DaemonProc | None],
             kas: list[Keepalived]) -> float:
    """Links down first (a dead box answers nothing), then kill keepalived and the daemon."""
    fw1 = topo.fws[0]
    t = time.time()
    fw1.ip("link", "set", "lan0", "down")
    fw1.ip("link", "set", "wan0", "down")
    kas[0].kill()
    if daemons[0] is not None:
        daemons[0].kill()
    return t


def test_natted_tcp_stream_survives_the_loss_of_its_firewall_and_fails_back(
        lab: Lab, tmp_path: object) -> None:
    topo, daemons, kas = build(lab, str(tmp_path), replicate=True)
    stream = TcpStream(topo.client, topo.server, topo.server_ip, SERVICE)
    d2 = daemons[1]
    assert d2 is not None
    key_port = f"sport={stream.sport} "
    wait_until(lambda: any(key_port in line for line in d2.call("dump", cache="external")),
               10, "the stream's flow to reach fw2's external cache")
    time.sleep(0.5)
    before = stream.status()
    assert before["received"] > 50
    assert before["max_stall"] < 0.5

    failed_at = fail_fw1(topo, daemons, kas)
    wait_until(kas[1].is_master, 10, "fw2 to become master and finish its notify script")
    time.sleep(3)
    after = stream.status()
    assert after["received"] > before["received"] + 200, ("the stream stalled", after)
    notes = kas[1].notifications()
    start = next(t for t, w, s in notes if w == "start" and s == "primary")
    done = next(t for t, w, s in notes if w == "done" and s == "primary")
    print(f"\nfailover: VRRP takeover {start - failed_at:.3f} s after the failure, notify "
          f"(commit, resync, bulk) {done - start:.3f} s, stream stall {after['max_stall']:.3f} s")
    assert d2.stats("runtime")["runtime"]["commits"] == 1

    # failback: fw1 comes back, gets the state from fw2, and takes the VIPs back
    fw1 = topo.fws[0]
    fw1.ip("link", "set", "lan0", "up")
    fw1.ip("link", "set", "wan0", "up")
    d1 = daemons[0]
    assert d1 is not None
    d1.start()
    wait_until(lambda: any(key_port in line for line in d1.call("dump", cache="external")),
               15, "fw1 to learn the stream's flow from fw2")
    kas[0].start()
    wait_until(kas[0].is_master, 15, "fw1 to take the VIPs back")
    time.sleep(3)
    print("fw1 commit on failback:", d1.stats("runtime")["runtime"]["last_commit"])
    print("\n".join(line for line in fw1.conntrack_list() if "9000" in line))
    final = stream.stop()
    assert final["errors"] == [], final
    assert final["received"] == final["sent"] or final["sent"] - final["received"] < 20
    assert final["received"] > after["received"] + 200, ("stalled after failback", final)


def test_without_replication_the_same_failure_breaks_the_stream(
        lab: Lab, tmp_path: object) -> None:
    topo, daemons, kas = build(lab, str(tmp_path), replicate=False)
    stream = TcpStream(topo.client, topo.server, topo.server_ip, SERVICE)
    time.sleep(1)
    before = stream.status()
    assert before["received"] > 50
    fail_fw1(topo, daemons, kas)
    wait_until(kas[1].is_master, 10, "fw2 to become master")
    time.sleep(3)
    after = stream.status()
    # 3 s at 200 lines/s would be 600 more lines; without state the stream is stuck for good
    assert after["received"] - before["received"] < 60, ("no state, yet the stream went on", after)
    stream.stop()
