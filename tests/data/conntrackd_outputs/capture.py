"""Capture the real conntrackd 1.4.7's client outputs into this directory (run as root).

The same flows are inserted with `conntrack -I` (so both daemons see the same kernel entries
and events) in a lab namespace: an established TCP flow, a UDP flow, an ICMP echo and a
destination-NATed TCP flow. A second namespace, linked by a veth (sync0 on both), runs a peer
whose external cache receives them (`-e` outputs). tests/kernel/test_dropin_cli.py replays
FLOWS through our daemons and compares field by field.
Run (root): `.venv/bin/python tests/data/conntrackd_outputs/capture.py`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from lab import Conntrackd, Lab, Netns

HERE = os.path.dirname(os.path.abspath(__file__))
SYNC_IP = "10.77.0.1"
PEER_IP = "10.77.0.2"

#: `conntrack -I` arguments of each flow (addresses on no interface: entries only)
FLOWS = (
    "-p tcp -s 10.88.0.2 -d 10.88.0.3 --sport 40000 --dport 80 --state ESTABLISHED "
    "-u SEEN_REPLY,ASSURED -t 600",
    "-p udp -s 10.88.0.2 -d 10.88.0.4 --sport 40001 --dport 53 -u SEEN_REPLY -t 120",
    "-p icmp -s 10.88.0.2 -d 10.88.0.5 --icmp-type 8 --icmp-code 0 --icmp-id 77 -t 30",
    "-p tcp -s 10.88.0.2 -d 10.88.0.9 --sport 40002 --dport 8080 --state ESTABLISHED "
    "-u SEEN_REPLY,ASSURED,DST_NAT -t 600 --dst-nat 10.99.0.7:80",
)

#: the peer's file name -> conntrackd client flags
PEER_OUTPUTS = {"peer_e.txt": ("-e",), "peer_e_x.xml": ("-e", "-x")}

#: file name -> conntrackd client flags
OUTPUTS = {
    "i.txt": ("-i",), "i_ct.txt": ("-i", "ct"), "i_x.xml": ("-i", "-x"), "e.txt": ("-e",),
    "e_x.xml": ("-e", "-x"), "s.txt": ("-s",), "i_expect.txt": ("-i", "expect"),
    **{f"s_{k}.txt": ("-s", k) for k in ("network", "cache", "runtime", "link", "rsqueue",
                                          "process", "queue", "ct", "expect")},
}


def insert_flows(ns: Netns) -> None:
    for f in FLOWS:
        ns.run("conntrack", "-I", *f.split())


def pair(lab: Lab) -> tuple[Netns, Netns]:
    """Two namespaces linked by sync0, multicast routed on it."""
    ns, peer = lab.netns("ref"), lab.netns("peer")
    lab.link(ns, "sync0", peer, "sync0")
    for n, addr in ((ns, SYNC_IP), (peer, PEER_IP)):
        n.ip("addr", "add", f"{addr}/24", "dev", "sync0")
        n.ip("link", "set", "sync0", "multicast", "on")
        n.ip("link", "set", "lo", "up")
        n.ip("route", "add", "224.0.0.0/4", "dev", "sync0")
        n.sysctl("net.netfilter.nf_conntrack_timestamp", 1)
    return ns, peer


def main() -> int:
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        ns, peer = pair(lab)
        os.mkdir(os.path.join(tmp, "a"))
        os.mkdir(os.path.join(tmp, "b"))
        ctd = Conntrackd(ns, os.path.join(tmp, "a"), SYNC_IP)
        other = Conntrackd(peer, os.path.join(tmp, "b"), PEER_IP)
        insert_flows(ns)
        time.sleep(1.5)
        for d, outputs in ((ctd, OUTPUTS), (other, PEER_OUTPUTS)):
            for name, flags in outputs.items():
                with open(os.path.join(HERE, name), "w") as f:
                    f.write(d.ctl(*flags))
        with open(os.path.join(HERE, "kernel.txt"), "w") as f:
            f.write("\n".join(ns.conntrack_list()) + "\n")
        ctd.stop()
        other.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
