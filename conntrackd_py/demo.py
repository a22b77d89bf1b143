"""`conntrackd-py demo`: the local failover demo (root; builds and removes its own namespaces).

client -- fw1 / fw2 -- server, keepalived moving the VIPs, conntrackd-py on both firewalls,
a NAT'd TCP stream through fw1 plus some UDP flows. fw1 dies; fw2 takes over, commits, and the
stream carries on. Prints what happened and cleans up, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

try:  # the lab ships beside the daemon but is no part of it: a trimmed install may lack it
    from lab import (
        DaemonProc,
        Keepalived,
        Lab,
        TcpStream,
        cluster_topology,
        harden_for_failover,
        poll_until,
        udp_flows,
    )
except ImportError as e:  # pragma: no cover - only on an install without the lab
    _LAB_MISSING: str | None = f"{e}"
else:
    _LAB_MISSING = None

SERVICE = 9000


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="conntrackd-py demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flows", type=int, default=5000, help="extra UDP flows to replicate")
    p.add_argument("--no-replication", action="store_true",
                   help="run without conntrackd-py: watch the stream die")
    args = p.parse_args(argv)
    if _LAB_MISSING is not None:
        print(f"conntrackd-py demo: needs the `lab` package installed beside conntrackd_py "
              f"({_LAB_MISSING})", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("conntrackd-py demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="ctpy-demo-")
    try:
        with Lab("ctdemo") as lab:
            return _run(lab, tmp, args.flows, not args.no_replication)
    except KeyboardInterrupt:
        _say("interrupted; cleaned up")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(lab: Lab, tmp: str, nflows: int, replicate: bool) -> int:
    _say("building namespaces: client, fw1, fw2, server, LAN/WAN/sync switches")
    topo = cluster_topology(lab, n_fw=2, nat=True, vip_on=None)
    daemons: list[DaemonProc | None] = []
    for k, fw in enumerate(topo.fws, 1):
        harden_for_failover(fw, SERVICE, udp_port=5000)
        daemons.append(DaemonProc(fw, os.path.join(tmp, f"d{k}"), k, topo.sync_ip(k))
                       if replicate else None)
    if replicate:
        # DaemonProc gives both nodes the lab's random 32-byte cluster key (mode 0600 files)
        _say("conntrackd-py running on fw1 and fw2 (FTFW over multicast, BLAKE2b-authenticated)")
    kas = [Keepalived(fw, os.path.join(tmp, f"k{k}"), topo, 150 if k == 1 else 100,
                      daemons[k - 1]) for k, fw in enumerate(topo.fws, 1)]
    if not poll_until(kas[0].is_master, 15):
        _say("fw1 did not become VRRP master")
        return 1
    _say(f"keepalived: fw1 is master, VIPs {topo.lan_vip} (client side) and {topo.wan_vip} "
         "(server side, SNAT target)")
    stream = TcpStream(topo.client, topo.server, topo.server_ip, SERVICE)
    _say(f"TCP stream client -> {topo.server_ip}:{SERVICE} through fw1 (NAT'd), 200 lines/s "
         "echoed back and checked")
    udp_flows(topo.client, topo.server_ip, nflows)
    time.sleep(2)
    if replicate:
        d2 = daemons[1]
        assert d2 is not None
        poll_until(lambda: d2.stats("cache")["cache"]["external"] >= nflows, 20)
        _say(f"fw2 holds {d2.stats('cache')['cache']['external']} flows replicated from fw1")
    before = stream.status()
    _say(f"before failure: {before['received']} lines echoed, longest stall "
         f"{before['max_stall']:.3f} s")
    _say("killing fw1: links down, keepalived and conntrackd-py killed")
    failed = time.time()
    fw1 = topo.fws[0]
    fw1.ip("link", "set", "lan0", "down")
    fw1.ip("link", "set", "wan0", "down")
    kas[0].kill()
    if daemons[0] is not None:
        daemons[0].kill()
    poll_until(kas[1].is_master, 15)
    time.sleep(3)
    result = stream.stop()
    notes = kas[1].notifications()
    start = next((t for t, w, s in notes if w == "start" and s == "primary"), None)
    done = next((t for t, w, s in notes if w == "done" and s == "primary"), None)
    if start is not None:
        _say(f"fw2 became master {start - failed:.3f} s after the failure")
    if replicate and daemons[1] is not None:
        c = daemons[1].stats("runtime")["runtime"]["last_commit"]
        if c:
            _say(f"fw2 committed {c['created']} flows (+{c['updated']} updated, "
                 f"{c['failed']} failed) in {c['seconds'] * 1000:.1f} ms"
                 + (f"; notify script done after {done - start:.3f} s" if done and start
                    else ""))
    lost = result["sent"] - result["received"]
    ok = not result["errors"] and result["received"] > before["received"] + 200
    _say(f"stream after failover: {result['received']} of {result['sent']} lines echoed, "
         f"longest stall {result['max_stall']:.3f} s, in flight at stop {lost}, errors "
         f"{result['errors'] or 'none'}")
    _say("bytes lost: 0 (every echoed line checked in order)" if ok
         else "the stream did NOT survive the failover")
    _say("cleaning up namespaces")
    return 0 if ok or not replicate else 1
