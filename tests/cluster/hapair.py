"""The cluster tests' shared scenario: a VRRP pair of hardened firewalls with real keepalived,
the daemons their tests choose, and the hard kill of the master. `build_pair(lab, tmp_path,
...)` builds it from the `lab` and `tmp_path` fixtures (`from hapair import ...`).

Owns only the scenario's wiring (who starts first, what "settled" means, how fw1 dies); each
test keeps its own traffic and assertions. Must not hide a wait without a message saying what
it waited for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab import (
    ClusterTopology,
    DaemonProc,
    Keepalived,
    Lab,
    Netns,
    cluster_topology,
    harden_for_failover,
    wait_until,
)

#: the server's port the failover scenario's TCP stream goes to
SERVICE = 9000

#: builds fwK's daemon (or None: no replication): (topology, K, its workdir, the keepalived
#: notify FIFO it must follow or None)
DaemonFactory = Callable[[ClusterTopology, int, str, str | None], DaemonProc | None]


def replicating_daemon(topo: ClusterTopology, k: int, workdir: str,
                       fifo: str | None) -> DaemonProc:
    """The default: conntrackd-py in FTFW with the lab's fixed key; following keepalived's
    notify FIFO (instance FW) when there is one."""
    extra = f"keepalived: {{notify_fifo: {fifo}, instances: [FW]}}" if fifo else ""
    return DaemonProc(topo.fws[k - 1], workdir, k, topo.sync_ip(k), key=bytes(range(32)),
                      extra=extra)


@dataclass
class HaPair:
    """fw1 (priority 150, master) and fw2 (100, backup) with their daemons and keepalived."""

    topo: ClusterTopology
    daemons: list[DaemonProc | None]
    kas: list[Keepalived]

    def daemon(self, k: int) -> DaemonProc:
        d = self.daemons[k - 1]
        assert d is not None, f"fw{k} runs no daemon"
        return d

    def kill_master(self) -> float:
        """fw1 dies hard: links down first (a dead box answers nothing), then keepalived and
        its daemon SIGKILLed. Returns when it happened."""
        fw1 = self.topo.fws[0]
        t = time.time()
        fw1.ip("link", "set", "lan0", "down")
        fw1.ip("link", "set", "wan0", "down")
        self.kas[0].kill()
        if self.daemons[0] is not None:
            self.daemons[0].kill()
        return t

    def revive_links(self) -> None:
        """fw1's links up again (after kill_master); its processes are the test's to start."""
        fw1 = self.topo.fws[0]
        fw1.ip("link", "set", "lan0", "up")
        fw1.ip("link", "set", "wan0", "up")

    def wait_external(self, k: int, needle: str, timeout: float, what: str) -> None:
        """Until a line of fwK's external cache dump holds `needle`."""
        d = self.daemon(k)
        wait_until(lambda: any(needle in line for line in d.call("dump", cache="external")),
                   timeout, what)


def build_pair(lab: Lab, tmp_path: Path, *, nat: bool = True,
               daemon: DaemonFactory | None = replicating_daemon,
               prepare: Callable[[ClusterTopology, Netns], None] | None = None,
               notify_fifo: bool = False) -> HaPair:
    """Topology, `harden_for_failover` (plus `prepare(topo, fw)`) on both firewalls, both daemons
    (`daemon=None`: none, no replication), then keepalived on fw1 until it is master and on fw2
    until it settled as backup. With `notify_fifo` keepalived also writes its transitions to
    `<daemon workdir>/keepalived.fifo`, which is passed to the daemon factory."""
    topo = cluster_topology(lab, n_fw=2, nat=nat, vip_on=None)
    daemons: list[DaemonProc | None] = []
    fifos: list[str | None] = []
    for k, fw in enumerate(topo.fws, 1):
        harden_for_failover(fw, SERVICE)
        if prepare is not None:
            prepare(topo, fw)
        workdir = str(tmp_path / f"d{k}")
        fifo = os.path.join(workdir, "keepalived.fifo") if notify_fifo else None
        if fifo is not None:
            os.makedirs(workdir, exist_ok=True)
        fifos.append(fifo)
        daemons.append(daemon(topo, k, workdir, fifo) if daemon is not None else None)
    kas: list[Keepalived] = []
    for k, fw in enumerate(topo.fws, 1):
        kas.append(Keepalived(fw, str(tmp_path / f"k{k}"), topo, 150 if k == 1 else 100,
                              daemons[k - 1], notify_fifo=fifos[k - 1]))
        if k == 1:
            wait_until(kas[0].is_master, 15, "fw1 to become VRRP master")
    wait_until(lambda: any(x[2] == "backup" for x in kas[1].notifications()), 15,
               "fw2 to settle as backup")
    return HaPair(topo, daemons, kas)
