"""A port forward to the VIP survives the loss of its firewall, with the VIP in the ignore list.

client -- LAN -- fw1 / fw2 -- WAN -- server, real keepalived moving both VIPs. Both firewalls
DNAT the LAN VIP's port 8080 to the server's port 9000 (a port forward), forward only
established/related traffic and new SYNs to the service, with no mid-stream pickup
(`harden_for_failover`). The daemons' address filter ignores the VIPs and the firewalls' own
addresses, as conntrackd's example configs tell operators to do (and `import-conf` copies).

conntrackd matches an address filter against a flow's original source and reply source
(src/filter.c, ct_filter_check): the forwarded flow's original destination is the ignored VIP,
but its endpoints are the client and the server, so it is replicated and the backup can carry
it after a hard kill of the master.

The same runs a second time with both daemons (and keepalived's notify script) on Debian's own
FTFW conntrackd.conf, read natively with -C: swapping the binary needs no config rewrite.

Teeth: run once against the old rule (original source and original *destination*, in a copy of
the tree with filters.py's `f.reply.src` put back to `f.orig.dst`, run with PYTHONPATH on the
copy), this test failed with
    AssertionError: timed out after 10 s waiting for the forwarded flow to reach fw2's
    external cache
(the flow was never replicated: fw2 would have dropped the stream after the takeover).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from hapair import SERVICE, HaPair, build_pair

from lab import ClusterTopology, DaemonProc, Lab, Netns, TcpStream, wait_until

pytestmark = pytest.mark.cluster

FORWARDED = 8080  # the VIP's port, DNAT'd to SERVICE

_PORT_FORWARD = """
table ip ctpy_pf {{
    chain prerouting {{
        type nat hook prerouting priority -100;
        iifname "lan0" ip daddr {vip} tcp dport {port} dnat to {server}:{service}
    }}
}}
"""


def ignored_addresses(topo: ClusterTopology) -> list[str]:
    """What conntrackd's example configs list under `Address Ignore`: loopback, the VIPs, the
    firewalls' own addresses, the sync link's."""
    a = topo.site
    own = [f"10.{a}.{net}.{10 + k}" for net in (1, 2) for k in (1, 2)]
    return ["127.0.0.1", "::1", topo.lan_vip, topo.wan_vip, *own, topo.sync_ip(1),
            topo.sync_ip(2)]


#: Debian's conntrackd 1.4.7 FTFW example, unchanged (tests/data/conntrackd/README.md)
DEBIAN_FTFW = Path(__file__).parent.parent / "data" / "conntrackd" / "sync-ftfw.conf"


def conntrackd_conf(topo: ClusterTopology, k: int, workdir: str) -> str:
    """Debian's FTFW example for fwK: only what names this machine is changed (the sync
    address and interface, the Address Ignore list, and the files put in `workdir`)."""
    text = DEBIAN_FTFW.read_text()
    for old, new in (("IPv4_interface 192.168.100.100", f"IPv4_interface {topo.sync_ip(k)}"),
                     ("Interface eth2", "Interface sync0"),
                     ("LogFile on", f"LogFile {workdir}/daemon.log"),
                     ("LockFile /var/lock/conntrack.lock", f"LockFile {workdir}/lock"),
                     ("Path /var/run/conntrackd.ctl", f"Path {workdir}/ctl.sock")):
        assert text.count(f"\t{old}\n") == 1, old
        text = text.replace(f"\t{old}\n", f"\t{new}\n")
    ignore = "".join(f"\t\t\t{'IPv6' if ':' in a else 'IPv4'}_address {a}\n"
                     for a in ignored_addresses(topo))
    text, n = re.subn(r"(\t\tAddress Ignore \{\n)(?:\t\t\tIPv4_address [^\n]*\n)+",
                      lambda m: m.group(1) + ignore, text)
    assert n == 1
    return text


def build(lab: Lab, tmp_path: Path, conntrackd: bool = False) -> HaPair:
    """The pair with the port forward; with `conntrackd` each daemon runs on its own
    conntrackd.conf (`-C`, read natively), and keepalived's notify script calls the CLI with
    that file too."""
    def daemon(topo: ClusterTopology, k: int, workdir: str, fifo: str | None) -> DaemonProc:
        d = DaemonProc(topo.fws[k - 1], workdir, k, topo.sync_ip(k),
                       ignore_addresses=ignored_addresses(topo))
        if conntrackd:
            d.stop()
            d.conf = os.path.join(workdir, "conntrackd.conf")
            with open(d.conf, "w") as fh:
                fh.write(conntrackd_conf(topo, k, workdir))
            d.start()
        return d

    def port_forward(topo: ClusterTopology, fw: Netns) -> None:
        fw.nft(_PORT_FORWARD.format(vip=topo.lan_vip, port=FORWARDED, server=topo.server_ip,
                                    service=SERVICE))

    return build_pair(lab, tmp_path, nat=False, daemon=daemon, prepare=port_forward)


@pytest.mark.parametrize("config", ["yaml", "conntrackd.conf"])
def test_port_forward_to_an_ignored_vip_survives_a_hard_kill_of_the_master(
        lab: Lab, tmp_path: Path, config: str) -> None:
    """With "conntrackd.conf" both daemons run on Debian's FTFW example (-C, no conversion):
    node ids derived from the sync addresses (1 and 2), no authentication, the example's
    protocol filter (TCP SCTP DCCP) and Address Ignore list (this cluster's addresses)."""
    pair = build(lab, tmp_path, conntrackd=config == "conntrackd.conf")
    topo, kas = pair.topo, pair.kas
    d1 = pair.daemon(1)
    if config == "conntrackd.conf":
        for k in (1, 2):
            d = pair.daemon(k)
            assert d.stats("runtime")  # the daemon answers on the file's UNIX Path
            assert "read as a conntrackd.conf" in d.read_log()  # the one warning line
            assert f"node.id {k} derived from the sync address" in d.read_log()
    stream = TcpStream(topo.client, topo.server, topo.server_ip, SERVICE,
                       connect=(topo.lan_vip, FORWARDED))
    mine = f"sport={stream.sport} "
    fw1 = topo.fws[0]
    entry = [line for line in fw1.conntrack_list() if mine in line]
    assert entry, "the stream has no conntrack entry on fw1"
    assert f"dport={FORWARDED} " in entry[0], entry
    assert f"src={topo.server_ip} " in entry[0], ("the stream is not DNAT'd on fw1", entry)
    pair.wait_external(2, mine, 10, "the forwarded flow to reach fw2's external cache")
    # the firewall's own traffic is still ignored: fw1's flows to its peer stay out of its cache
    assert not any(f"src={topo.sync_ip(1)} " in line
                   for line in d1.call("dump", cache="internal"))
    time.sleep(0.5)
    before = stream.status()
    assert before["received"] > 50, before
    assert before["max_stall"] < 0.5, before

    # hard kill of the master: links down (a dead box answers nothing), keepalived and the
    # daemon SIGKILLed
    pair.kill_master()
    wait_until(kas[1].is_master, 10, "fw2 to become master and finish its notify script")
    time.sleep(3)
    after = stream.status()
    assert after["received"] > before["received"] + 200, ("the forwarded stream stalled", after)
    committed = [line for line in topo.fws[1].conntrack_list() if mine in line]
    assert committed, "no entry for the stream on fw2"
    assert f"dport={FORWARDED} " in committed[0], committed
    final = stream.stop()
    assert final["errors"] == [], final
    print(f"\nport forward across the takeover: stall {after['max_stall']:.3f} s, "
          f"{after['received'] - before['received']} lines after the kill")
