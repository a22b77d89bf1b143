"""The namespace lab for the tests, the benchmarks and `conntrackd-py demo`: installed beside
`conntrackd_py` but no part of the daemon (the daemon never imports it).

Modules by job: `netns` (Lab, Netns, Switch, reaping leaked namespaces), `topology` (firewall
and cluster topologies, VIPs, sync-link loss), `traffic` (UDP flows, echo servers, the TCP
stream probe), `programs` (the processes those run inside namespaces, `python -m
lab.programs`; never imported by the package), `daemons` (conntrackd-py, conntrackd and
keepalived behind one interface), `wait` (polling helpers), and `bench` and `measure` (what
the benchmark suites share: daemon pairs, CPU probes, kernel load, replication measurements).
This package re-exports the names tests and benchmarks use, so `from lab import X` works. The
namespace safety contract (see `lab.netns`) holds for all of it: nothing outside a lab's own
namespaces is touched.
"""

from __future__ import annotations

from .daemons import (
    Conntrackd,
    DaemonProc,
    Keepalived,
    LabDaemon,
    SyncDaemon,
    notify_script,
)
from .netns import (
    Lab,
    LabError,
    Netns,
    Switch,
    lab_namespaces,
    reap_namespaces,
    terminate,
)
from .topology import (
    LABEL,
    LABEL_DPORT,
    MARK,
    MARK_DPORT,
    SYNC_GROUP,
    ClusterTopology,
    FirewallTopology,
    add_sync_loss,
    cluster_topology,
    firewall_topology,
    harden_for_failover,
    remove_sync_loss,
)
from .traffic import (
    FIRST_SPORT,
    PAYLOAD,
    Burst,
    TcpStream,
    send_udp_flows,
    tcp_echo_server,
    udp_echo_server,
    udp_flows,
    udp_flows_popen,
)
from .wait import poll_until, time_until, wait_until

__all__ = [
    "FIRST_SPORT",
    "LABEL",
    "LABEL_DPORT",
    "MARK",
    "MARK_DPORT",
    "PAYLOAD",
    "SYNC_GROUP",
    "Burst",
    "ClusterTopology",
    "Conntrackd",
    "DaemonProc",
    "FirewallTopology",
    "Keepalived",
    "Lab",
    "LabDaemon",
    "LabError",
    "Netns",
    "Switch",
    "SyncDaemon",
    "TcpStream",
    "add_sync_loss",
    "cluster_topology",
    "firewall_topology",
    "harden_for_failover",
    "lab_namespaces",
    "notify_script",
    "poll_until",
    "reap_namespaces",
    "remove_sync_loss",
    "send_udp_flows",
    "tcp_echo_server",
    "terminate",
    "time_until",
    "udp_echo_server",
    "udp_flows",
    "udp_flows_popen",
    "wait_until",
]
