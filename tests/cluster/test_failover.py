"""The product's reason to exist: a NAT'd TCP stream survives the loss of its firewall.

client -- LAN -- fw1 / fw2 -- WAN -- server, real keepalived (VRRPv3, 0.2 s adverts) moving
both VIPs, both firewalls SNAT to the server-side VIP, forward/input policy drop, only
established/related plus new SYNs forwarded, nf_conntrack_tcp_loose=0 and be_liberal=0: only a
committed entry can carry the stream on the new master.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hapair import SERVICE, build_pair

from lab import Lab, TcpStream, wait_until

pytestmark = pytest.mark.cluster


def test_natted_tcp_stream_survives_the_loss_of_its_firewall_and_fails_back(
        lab: Lab, tmp_path: Path) -> None:
    pair = build_pair(lab, tmp_path)
    topo, kas = pair.topo, pair.kas
    stream = TcpStream(topo.client, topo.server, topo.server_ip, SERVICE)
    d2 = pair.daemon(2)
    key_port = f"sport={stream.sport} "
    pair.wait_external(2, key_port, 10, "the stream's flow to reach fw2's external cache")
    time.sleep(0.5)
    before = stream.status()
    assert before["received"] > 50
    assert before["max_stall"] < 0.5

    failed_at = pair.kill_master()
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
    pair.revive_links()
    d1 = pair.daemon(1)
    d1.start()
    pair.wait_external(1, key_port, 15, "fw1 to learn the stream's flow from fw2")
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
        lab: Lab, tmp_path: Path) -> None:
    pair = build_pair(lab, tmp_path, daemon=None)
    topo, kas = pair.topo, pair.kas
    stream = TcpStream(topo.client, topo.server, topo.server_ip, SERVICE)
    time.sleep(1)
    before = stream.status()
    assert before["received"] > 50
    pair.kill_master()
    wait_until(kas[1].is_master, 10, "fw2 to become master")
    time.sleep(3)
    after = stream.status()
    # 3 s at 200 lines/s would be 600 more lines; without state the stream is stuck for good
    assert after["received"] - before["received"] < 60, ("no state, yet the stream went on", after)
    stream.stop()
