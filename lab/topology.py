"""Firewall and cluster topologies built from a `Lab`: addresses, routes, the nftables rulesets,
moving the VIPs, and the sync-link loss rule.

This module owns the `ctpy` and `ctpy_loss` nftables tables and the addresses it puts inside
the namespaces it is given. It must not create namespaces itself (the `Lab` does, and deletes
them) nor touch the root namespace. Addresses stay inside 10.0.0.0/8 and fd00::/8.
"""

from __future__ import annotations

from dataclasses import dataclass

from .netns import Lab, Netns, Switch

#: the firewall rulesets set ct mark MARK on new flows to udp/MARK_DPORT and ct label bit
#: LABEL on those to udp/LABEL_DPORT (the kernel keeps labels only where a rule uses them)
MARK = 0x2A
MARK_DPORT = 5001
LABEL = 5
LABEL_DPORT = 5002
#: conntrackd's default multicast group; the sync links route 225.0.0.0/8 to their interface
SYNC_GROUP = "225.0.0.50"

_FW_RULES = """
table inet ctpy {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ct state new udp dport {mark_dport} ct mark set {mark:#x}
        ct state new udp dport {label_dport} ct label set {label}
        iifname "lan0" ct state new accept
    }}{nat}
}}
"""
_MARKS = {"mark_dport": MARK_DPORT, "mark": MARK, "label_dport": LABEL_DPORT, "label": LABEL}

_NAT_CHAIN = """
    chain postrouting {{
        type nat hook postrouting priority 100;
        {rules}
    }}"""

_CLUSTER_INPUT = """
table inet ctpy {
    chain input {
        type filter hook input priority 0; policy drop;
        iif lo accept
        iifname "sync*" accept
        ct state established,related accept
        meta l4proto { icmp, ipv6-icmp } accept
        ip protocol vrrp accept
    }
}
"""


@dataclass(frozen=True)
class FirewallTopology:
    """client (eth0) -- (lan0) fw (wan0) -- (eth0) server, on 10.a.1.0/24 and 10.a.2.0/24."""

    client: Netns
    fw: Netns
    server: Netns
    client_ip: str
    fw_lan_ip: str
    fw_wan_ip: str
    server_ip: str
    client_ip6: str
    fw_lan_ip6: str
    fw_wan_ip6: str
    server_ip6: str


def _host_setup(ns: Netns, ifname: str, a: int, net: int, host: int, gw: int) -> None:
    ns.ip_batch([
        f"addr add 10.{a}.{net}.{host}/24 dev {ifname}",
        f"addr add fd00:{a}:{net}::{host}/64 dev {ifname}",
        f"route add default via 10.{a}.{net}.{gw}",
        f"route add default via fd00:{a}:{net}::{gw}",
    ])


def _firewall_sysctls(fw: Netns) -> None:
    fw.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    # the ruleset loads conntrack into the namespace; only then does this key exist
    fw.sysctl("net.netfilter.nf_conntrack_events", 1)


def firewall_topology(lab: Lab, masquerade: bool = True) -> FirewallTopology:
    """One stateful firewall between a client and a server, masquerading out of wan0."""
    a = lab.site()
    client, fw, server = lab.netns("client"), lab.netns("fw"), lab.netns("server")
    lab.link(client, "eth0", fw, "lan0")
    lab.link(fw, "wan0", server, "eth0")
    fw.ip_batch([
        f"addr add 10.{a}.1.1/24 dev lan0", f"addr add fd00:{a}:1::1/64 dev lan0",
        f"addr add 10.{a}.2.1/24 dev wan0", f"addr add fd00:{a}:2::1/64 dev wan0",
    ])
    _host_setup(client, "eth0", a, 1, 2, 1)
    _host_setup(server, "eth0", a, 2, 2, 1)
    nat = _NAT_CHAIN.format(rules='oifname "wan0" masquerade') if masquerade else ""
    fw.nft(_FW_RULES.format(**_MARKS, nat=nat))
    _firewall_sysctls(fw)
    return FirewallTopology(
        client, fw, server, f"10.{a}.1.2", f"10.{a}.1.1", f"10.{a}.2.1", f"10.{a}.2.2",
        f"fd00:{a}:1::2", f"fd00:{a}:1::1", f"fd00:{a}:2::1", f"fd00:{a}:2::2",
    )


@dataclass
class ClusterTopology:
    """client -- lan switch -- fw1..fwN -- wan switch -- server, plus a sync switch.

    fwK has lan0 10.a.1.(10+K), wan0 10.a.2.(10+K), sync0 10.a.3.K (fd00:a:N:: alike). The
    gateways are the VIPs 10.a.1.1 (client side) and 10.a.2.1 (server side), held together by
    one firewall at a time (`vip_holder`, None when keepalived is to manage them).
    """

    client: Netns
    server: Netns
    fws: list[Netns]
    lan: Switch
    wan: Switch
    sync: Switch
    site: int
    vip_holder: Netns | None

    @property
    def client_ip(self) -> str:
        return f"10.{self.site}.1.2"

    @property
    def server_ip(self) -> str:
        return f"10.{self.site}.2.2"

    @property
    def client_ip6(self) -> str:
        return f"fd00:{self.site}:1::2"

    @property
    def server_ip6(self) -> str:
        return f"fd00:{self.site}:2::2"

    @property
    def lan_vip(self) -> str:
        return f"10.{self.site}.1.1"

    @property
    def wan_vip(self) -> str:
        return f"10.{self.site}.2.1"

    def sync_ip(self, k: int) -> str:
        """fwK's address on the sync link (K counts from 1)."""
        return f"10.{self.site}.3.{k}"

    def _vip_cmds(self, op: str) -> list[str]:
        a = self.site
        return [f"addr {op} 10.{a}.1.1/24 dev lan0", f"addr {op} fd00:{a}:1::1/64 dev lan0",
                f"addr {op} 10.{a}.2.1/24 dev wan0", f"addr {op} fd00:{a}:2::1/64 dev wan0"]

    def move_vip(self, to: Netns | None) -> None:
        """Move both VIPs to firewall `to` (None: remove them), as a VRRP takeover would.

        Instead of gratuitous ARP/NA the client's and server's neighbour entries for the VIPs
        are flushed, so their next packet resolves the VIP to the new holder.
        """
        if self.vip_holder is not None:
            self.vip_holder.ip_batch(self._vip_cmds("del"))
        if to is not None:
            to.ip_batch(self._vip_cmds("add"))
        self.vip_holder = to
        for ns in (self.client, self.server):
            ns.ip("neigh", "flush", "dev", "eth0")


def cluster_topology(lab: Lab, n_fw: int = 2, nat: bool = True,
                     vip_on: int | None = 1) -> ClusterTopology:
    """N firewalls in parallel; the VIPs start on fw`vip_on`. With `nat` every firewall SNATs
    to the server-side VIP (not masquerade: a taken-over mapping must stay valid)."""
    a = lab.site()
    client, server = lab.netns("client"), lab.netns("server")
    fws = [lab.netns(f"fw{k}") for k in range(1, n_fw + 1)]
    lan = lab.bridge("lan", ((client, "eth0"),))
    wan = lab.bridge("wan", ((server, "eth0"),))
    sync = lab.bridge("sync")
    _host_setup(client, "eth0", a, 1, 2, 1)
    _host_setup(server, "eth0", a, 2, 2, 1)
    snat = _NAT_CHAIN.format(rules=f'oifname "wan0" snat ip to 10.{a}.2.1\n'
                                   f'        oifname "wan0" snat ip6 to fd00:{a}:2::1'
                             ) if nat else ""
    for k, fw in enumerate(fws, 1):
        lan.attach(fw, "lan0")
        wan.attach(fw, "wan0")
        sync.attach(fw, "sync0")
        fw.ip_batch([
            f"addr add 10.{a}.1.{10 + k}/24 dev lan0", f"addr add fd00:{a}:1::{10 + k}/64 dev lan0",
            f"addr add 10.{a}.2.{10 + k}/24 dev wan0", f"addr add fd00:{a}:2::{10 + k}/64 dev wan0",
            f"addr add 10.{a}.3.{k}/24 dev sync0", f"addr add fd00:{a}:3::{k}/64 dev sync0",
            "route add 225.0.0.0/8 dev sync0",
        ])
        fw.nft(_FW_RULES.format(**_MARKS, nat=snat) + _CLUSTER_INPUT)
        _firewall_sysctls(fw)
    topo = ClusterTopology(client, server, fws, lan, wan, sync, a, None)
    if vip_on is not None:
        topo.move_vip(fws[vip_on - 1])
    return topo


def add_sync_loss(fw: Netns, port: int, percent: int) -> None:
    """Drop `percent`% of the UDP datagrams to `port` arriving in `fw` (before conntrack).

    `tc netem` is not in this kernel, hence nftables. Calling it again replaces the rule.
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be 0..100, got {percent}")
    fw.nft(f"""
table inet ctpy_loss
delete table inet ctpy_loss
table inet ctpy_loss {{
    chain pre {{
        type filter hook prerouting priority -300;
        udp dport {port} numgen random mod 100 < {percent} counter drop
    }}
}}
""")


def remove_sync_loss(fw: Netns) -> None:
    fw.nft("table inet ctpy_loss\ndelete table inet ctpy_loss\n")



def harden_for_failover(fw: Netns, service_port: int, udp_port: int | None = None) -> None:
    """The firewall the failover scenario needs: only established/related traffic and new SYNs
    to the service are forwarded, and neither mid-stream pickup nor window leniency: only a
    committed conntrack entry can carry an existing connection across a takeover."""
    fw.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
    fw.sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 0)
    rules = [
        "flush chain inet ctpy forward",
        "add rule inet ctpy forward ct state established,related accept",
        f'add rule inet ctpy forward iifname "lan0" tcp dport {service_port} '
        "tcp flags & (syn|ack) == syn ct state new accept",
    ]
    if udp_port is not None:
        rules.append(f'add rule inet ctpy forward iifname "lan0" udp dport '
                     f"{udp_port}-{udp_port + 15} ct state new accept")
    fw.nft("\n".join(rules) + "\n")
