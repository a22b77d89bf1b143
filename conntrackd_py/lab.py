"""Network-namespace topologies for the tests, the benchmarks and `conntrackd-py demo`.

This module owns every namespace, veth pair, bridge, nftables table and process that a `Lab`
creates, and removes all of them in `Lab.close()`. It must not touch anything it did not
create: not the root namespace's firewall, conntrack table, routes or sysctls, and no
namespace of another run (names are `<prefix><pid>x<seq>-<role>`). Addresses stay inside
10.0.0.0/8 and fd00::/8 and no link leads out of the lab, so no packet can leave it.

Everything is synchronous and shells out to `ip`, `nft`, `sysctl` and `conntrack`, except the
UDP load generator, which sends hand-built packets on a raw socket opened inside the client
namespace: one datagram per flow, 55k-90k new conntrack entries/s through a firewall on this
2-vCPU VM (masquerade and the server's ICMP port-unreachable replies cost ~20% each).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from conntrackd_py.netns import socket_in

#: the firewall rulesets set ct mark MARK on new flows to udp/MARK_DPORT and ct label bit
#: LABEL on those to udp/LABEL_DPORT (the kernel keeps labels only where a rule uses them)
MARK = 0x2A
MARK_DPORT = 5001
LABEL = 5
LABEL_DPORT = 5002
#: conntrackd's default multicast group; the sync links route 225.0.0.0/8 to their interface
SYNC_GROUP = "225.0.0.50"

_seq = itertools.count(1)
_tags: set[str] = set()  # name prefixes of every Lab made by this process


class LabError(subprocess.CalledProcessError):
    """A lab command failed; unlike CalledProcessError its message includes stderr."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))!r} exited {self.returncode}: {self.stderr!s}".strip()


def _run(argv: list[str], *, check: bool = True, input: str | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(p.returncode, argv, p.stdout, p.stderr)
    return p


def lab_namespaces() -> list[str]:
    """Namespaces made by any Lab of this process that still exist (the leak check)."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if any(n.startswith(t) for t in _tags))


def _kill_and_delete(name: str) -> str | None:
    """Kill whatever runs in namespace `name`, delete it; the error text if that failed."""
    for pid in _run(["ip", "netns", "pids", name], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    p = _run(["ip", "netns", "del", name], check=False)
    return f"{name}: {p.stderr.strip()}" if p.returncode != 0 else None


def reap_namespaces() -> list[str]:
    """Delete the leaked namespaces of this process's Labs; returns their names."""
    leaked = lab_namespaces()
    for name in leaked:
        _kill_and_delete(name)
    return leaked


@dataclass(eq=False)
class Netns:
    """One network namespace of a Lab. Processes started with `popen` die with the lab."""

    name: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def run(self, *argv: str, check: bool = True, input: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "netns", "exec", self.name, *argv], check=check, input=input,
                    timeout=timeout)

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self.procs.append(p)
        return p

    def ip(self, *args: str) -> str:
        return _run(["ip", "-n", self.name, *args]).stdout

    def ip_batch(self, commands: list[str]) -> None:
        """Several `ip` commands in one process (topology setup is mostly this)."""
        _run(["ip", "-n", self.name, "-batch", "-"], input="\n".join(commands) + "\n")

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def sysctl_get(self, key: str) -> str:
        return self.run("sysctl", "-n", key).stdout.strip()

    def nft(self, ruleset: str) -> None:
        self.run("nft", "-f", "-", input=ruleset)

    def conntrack_list(self) -> list[str]:
        """Every entry of both families, one `conntrack -L -o extended` line each:
        `ipv4 2 udp 17 29 src=.. dst=.. sport=.. dport=.. [UNREPLIED] src=.. ... mark=0 use=1`."""
        return self.run("conntrack", "-L", "-o", "extended").stdout.splitlines()

    def conntrack_count(self) -> int:
        return int(self.sysctl_get("net.netfilter.nf_conntrack_count"))

    def conntrack_flush(self) -> None:
        self.run("conntrack", "-F")

    def ping(self, dst: str, timeout: float = 2.0) -> bool:
        """One ICMP echo on a ping socket (this machine has no `ping`): True if answered."""
        if ipaddress.ip_address(dst).version == 4:
            family, proto, echo = socket.AF_INET, socket.IPPROTO_ICMP, 8
        else:
            family, proto, echo = socket.AF_INET6, socket.IPPROTO_ICMPV6, 128
        with socket_in(self.name, family, socket.SOCK_DGRAM, proto) as sock:
            sock.settimeout(timeout)
            # the kernel sets the id and checksum and delivers only replies to this socket
            sock.sendto(struct.pack("!BBHHH", echo, 0, 0, 0, 1) + b"ctpy", (dst, 0))
            try:
                sock.recv(1024)
            except OSError:  # timeout, or an ICMP error
                return False
        return True

    def src_for(self, dst: str) -> str:
        """The source address this namespace uses to reach `dst`."""
        route = json.loads(self.ip("-j", "route", "get", dst))[0]
        return str(route["prefsrc"])


@dataclass(eq=False)
class Switch:
    """A Linux bridge `br0` alone in its own namespace; `attach` plugs a namespace into it."""

    lab: Lab
    ns: Netns
    members: list[tuple[Netns, str]] = field(default_factory=list)

    def attach(self, ns: Netns, ifname: str) -> None:
        port = f"p{len(self.members)}"
        self.lab.link(self.ns, port, ns, ifname)
        self.ns.ip("link", "set", port, "master", "br0")
        self.members.append((ns, ifname))


class Lab:
    """Owns every namespace and process it makes; `close()` (or leaving `with`) removes them."""

    def __init__(self, prefix: str = "ctpy") -> None:
        self.tag = f"{prefix}{os.getpid()}x"
        _tags.add(self.tag)
        self.namespaces: list[Netns] = []
        self._sites = itertools.count(1)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def site(self) -> int:
        """A fresh number `a` for a topology's 10.a.x.y / fd00:a:x:: addresses."""
        return next(self._sites)

    def netns(self, role: str) -> Netns:
        ns = Netns(f"{self.tag}{next(_seq)}-{role}")
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        # DAD would keep IPv6 addresses "tentative" (unusable) for a second or more
        # ping_group_range: ping sockets for root too (Netns.ping)
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
               "net.ipv6.conf.default.accept_dad=0", "net.ipv4.ping_group_range=0 2147483647")
        return ns

    def link(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        """A veth pair created directly inside both namespaces (never in the root one)."""
        _run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth",
              "peer", "name", b_if, "netns", b.name])
        a.ip("link", "set", a_if, "up")
        b.ip("link", "set", b_if, "up")

    def bridge(self, role: str, members: tuple[tuple[Netns, str], ...] = ()) -> Switch:
        """A switch for a LAN with more than two members."""
        sw = Switch(self, self.netns(role))
        sw.ns.ip_batch([
            "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            "link set br0 up",
        ])
        # bridged frames must not visit netfilter hooks in the switch (it is only wire)
        sw.ns.run("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0",
                  "net.bridge.bridge-nf-call-ip6tables=0", "net.bridge.bridge-nf-call-arptables=0")
        for ns, ifname in members:
            sw.attach(ns, ifname)
        return sw

    def close(self) -> None:
        """Stop every process, then delete every namespace; keeps going past failures."""
        errors: list[str] = []
        for ns in self.namespaces:
            for p in ns.procs:
                if p.poll() is None:
                    p.terminate()
        for ns in self.namespaces:
            for p in ns.procs:
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                for stream in (p.stdin, p.stdout, p.stderr):
                    if stream is not None:
                        stream.close()
            ns.procs.clear()
        for ns in reversed(self.namespaces):
            if (err := _kill_and_delete(ns.name)) is not None:
                errors.append(err)
        self.namespaces.clear()
        if errors:
            raise RuntimeError("lab cleanup failed: " + "; ".join(errors))


# --- topologies ------------------------------------------------------------------------------

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


# --- load generation -------------------------------------------------------------------------

FIRST_SPORT = 1024
_PAYLOAD = b"ctpy"


@dataclass(frozen=True)
class Burst:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


def _words(b: bytes) -> int:
    return sum(struct.unpack(f"!{len(b) // 2}H", b))


def send_udp_flows(sock: socket.socket, src: str, dst: str, n: int, dport: int,
                   max_seconds: float) -> Burst:
    """Send one UDP datagram per flow on a raw IPPROTO_RAW socket (we write the IP header).

    Flow i has source port FIRST_SPORT + i % 64512 and destination port dport + i // 64512:
    varying the destination port (not the source address) past 64512 flows keeps every flow
    NAT-able, since a masquerading firewall has only 64k ports per server address and port.
    """
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    ulen = 8 + len(_PAYLOAD)
    if d.version == 4:  # the kernel fills in the IPv4 total length, id and header checksum
        iphdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 17, 0, s.packed, d.packed)
    else:
        iphdr = struct.pack("!IHBB16s16s", 0x6 << 28, ulen, 17, 64, s.packed, d.packed)
    # UDP checksum without the ports: pseudo header + length field + payload
    base = _words(s.packed) + _words(d.packed) + 17 + ulen + ulen + _words(_PAYLOAD)
    pack, sendto, addr = struct.Struct("!HHHH").pack, sock.sendto, (dst, 0)
    nports = 65536 - FIRST_SPORT
    sent, t0 = 0, time.monotonic()
    deadline = t0 + max_seconds
    while sent < n and time.monotonic() < deadline:
        dp = dport + sent // nports
        first = FIRST_SPORT + sent % nports
        # at most 4096 datagrams between clock reads, never past the end of a port block
        last = min(65536, first + n - sent, first + 4096)
        for sp in range(first, last):
            c = base + sp + dp
            c = (c & 0xFFFF) + (c >> 16)
            c = ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF
            sendto(iphdr + pack(sp, dp, ulen, c or 0xFFFF) + _PAYLOAD, addr)
        sent += last - first
    return Burst(sent, time.monotonic() - t0)


def udp_flows(client: Netns, dst: str, n: int, dport: int = 5000, src: str | None = None,
              max_seconds: float = 60) -> Burst:
    """Create `n` distinct UDP conntrack entries along the path client -> dst, from this process.

    Blocks until all are sent (bounded by `max_seconds`); see `send_udp_flows` for the ports.
    """
    src = src or client.src_for(dst)
    family = socket.AF_INET if ipaddress.ip_address(dst).version == 4 else socket.AF_INET6
    with socket_in(client.name, family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        return send_udp_flows(sock, src, dst, n, dport, max_seconds)


def udp_flows_popen(client: Netns, dst: str, n: int, dport: int = 5000,
                    src: str | None = None, max_seconds: float = 60) -> subprocess.Popen[str]:
    """Like `udp_flows` but in a child process (no GIL shared with a daemon under test); it
    prints `sent seconds` on stdout when done."""
    src = src or client.src_for(dst)
    return client.popen(sys.executable, "-m", "conntrackd_py.lab", "udpgen", src, dst, str(n),
                        str(dport), str(max_seconds), stdout=subprocess.PIPE, text=True)


def udp_echo_server(server: Netns, port: int) -> subprocess.Popen[str]:
    """A process in `server` echoing UDP on `port` (both families); returns once it is bound."""
    p = server.popen(sys.executable, "-m", "conntrackd_py.lab", "udpecho", str(port),
                     stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"udp echo server on port {port} did not start")
    return p


def _echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def main(argv: list[str]) -> None:
    """`python -m conntrackd_py.lab udpgen SRC DST N DPORT MAX_SECONDS | udpecho PORT`, run
    inside a namespace by `udp_flows_popen` and `udp_echo_server`."""
    if argv[:1] == ["udpgen"] and len(argv) == 6:
        src, dst, n, dport, max_s = argv[1:]
        family = socket.AF_INET if ipaddress.ip_address(dst).version == 4 else socket.AF_INET6
        with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            b = send_udp_flows(sock, src, dst, int(n), int(dport), float(max_s))
        print(b.sent, f"{b.seconds:.6f}", flush=True)
    elif argv[:1] == ["udpecho"] and len(argv) == 2:
        with contextlib.suppress(KeyboardInterrupt):
            _echo(int(argv[1]))
    else:
        sys.exit(main.__doc__)


def terminate(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the reference: the real conntrackd ------------------------------------------------------

_CONNTRACKD_CONF = """
Sync {{
    Mode {mode} {{ {mode_opts} }}
    Multicast {{
        IPv4_address {group}
        Group {port}
        IPv4_interface {sync_ip}
        Interface {iface}
        SndSocketBuffer 8388608
        RcvSocketBuffer 8388608
        Checksum on
    }}
    Options {{ TCPWindowTracking Off }}
}}
General {{
    HashSize 262144
    HashLimit 4194304
    LogFile {dir}/conntrackd.log
    LockFile {dir}/conntrackd.lock
    UNIX {{ Path {dir}/conntrackd.ctl }}
    NetlinkBufferSize 67108864
    NetlinkBufferSizeMaxGrowth 134217728
    Filter From Userspace {{
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address {sync_ip}
        }}
    }}
}}
"""


class Conntrackd:
    """The real conntrackd (Debian's 1.4.7) in a lab namespace: our reference for behaviour
    and speed. Its files live in `workdir`; it stops with the lab (or `stop()`)."""

    def __init__(self, ns: Netns, workdir: str, sync_ip: str, *, iface: str = "sync0",
                 mode: str = "FTFW", mode_opts: str = "", group: str = SYNC_GROUP,
                 port: int = 3780) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.ns = ns
        self.conf = os.path.join(workdir, "conntrackd.conf")
        with open(self.conf, "w") as f:
            f.write(_CONNTRACKD_CONF.format(mode=mode, mode_opts=mode_opts, group=group,
                                            port=port, sync_ip=sync_ip, iface=iface,
                                            dir=workdir))
        self.proc = ns.popen("conntrackd", "-C", self.conf, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(workdir, "conntrackd.ctl")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"conntrackd did not start in {ns.name}")
            time.sleep(0.005)

    def ctl(self, *flags: str, timeout: float = 120) -> str:
        return self.ns.run("conntrackd", "-C", self.conf, *flags, timeout=timeout).stdout

    def external_count(self) -> int:
        """Entries in the external cache, from `-s cache` (cheap, unlike a dump)."""
        out = self.ctl("-s", "cache")
        m = re.search(r"cache:external\s+active objects:\s+(\d+)", out)
        return int(m.group(1)) if m else 0

    def stop(self) -> None:
        terminate(self.proc, 5)



# --- a long-lived TCP stream that notices every lost, reordered or stalled byte ---------------

_ECHO_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print('ready', flush=True)
while True:
    c, _ = s.accept()
    try:
        while True:
            data = c.recv(65536)
            if not data:
                break
            c.sendall(data)
    except OSError:
        pass
    c.close()
"""

_STREAM_CLIENT = r"""
import json, select, socket, sys, time
host, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
c = socket.create_connection((host, port), timeout=5)
c.setblocking(False)
print('connected %d' % c.getsockname()[1], flush=True)
sent = recvd = 0; buf = b''; expect = 1; errors = []; last_rx = time.monotonic()
max_stall = 0.0; stall_at = 0.0; nxt = time.monotonic(); out = b''
while True:
    r, w, _ = select.select([c, sys.stdin], [c] if out else [], [], 0.005)
    now = time.monotonic()
    if sys.stdin in r:
        line = sys.stdin.readline()
        if not line or line.strip() == 'stop':
            break
        print(json.dumps({'sent': sent, 'received': expect - 1, 'max_stall': max_stall}),
              flush=True)
    if now >= nxt and len(out) < 65536:
        sent += 1
        out += b'%08d %s\n' % (sent, b'.' * 90)
        nxt += 1.0 / rate
    if out and (c in w or not r):
        try:
            n = c.send(out); out = out[n:]
        except BlockingIOError:
            pass
        except OSError as e:
            errors.append('send: %s' % e); break
    if c in r:
        try:
            data = c.recv(65536)
        except BlockingIOError:
            data = None
        except OSError as e:
            errors.append('recv: %s' % e); break
        if data == b'':
            errors.append('closed by peer'); break
        if data:
            buf += data
            while b'\n' in buf:
                line, buf = buf.split(b'\n', 1)
                if line != b'%08d %s' % (expect, b'.' * 90):
                    errors.append('out of order or corrupt at %d' % expect); break
                expect += 1
            if now - last_rx > max_stall:
                max_stall = now - last_rx; stall_at = last_rx
            last_rx = now
        if errors:
            break
print(json.dumps({'sent': sent, 'received': expect - 1, 'max_stall': round(max_stall, 3),
                  'errors': errors, 'final': True}), flush=True)
"""


def tcp_echo_server(server: Netns, ip: str, port: int) -> subprocess.Popen[str]:
    """A process in `server` echoing every TCP byte back; returns once it listens."""
    srv = server.popen(sys.executable, "-c", _ECHO_SERVER, ip, str(port),
                       stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None
    if srv.stdout.readline().strip() != "ready":
        raise RuntimeError("echo server did not start")
    return srv


def wait_until(pred: Callable[[], object], limit: float, what: str,
               interval: float = 0.05) -> None:
    """Poll `pred` until it is true; AssertionError naming `what` after `limit` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {limit} s waiting for {what}")


class TcpStream:
    """A TCP connection client -> server carrying numbered lines at `rate`/s, echoed back.

    `status()` and `stop()` report {sent, received, max_stall, errors}: `received` counts the
    echoes that came back complete and in order, `max_stall` the longest silence between two.
    """

    def __init__(self, client: Netns, server: Netns, server_ip: str, port: int,
                 rate: float = 200.0) -> None:
        tcp_echo_server(server, server_ip, port)
        self.proc = client.popen(sys.executable, "-c", _STREAM_CLIENT, server_ip, str(port),
                                 str(rate), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        if not first or first[0] != "connected":
            raise RuntimeError(f"stream client did not connect: {first}")
        self.sport = int(first[1])

    def _ask(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(what + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
        line = self.proc.stdout.readline()
        return dict(json.loads(line)) if line else {"errors": ["stream client died"]}

    def status(self) -> dict[str, Any]:
        return self._ask("status")

    def stop(self) -> dict[str, Any]:
        res = self._ask("stop")
        while not res.get("final") and "errors" not in res:
            res = self._ask("stop")
        self.proc.wait(5)
        res.setdefault("errors", [])
        return res



# --- conntrackd-py itself in a lab namespace -------------------------------------------------

_DAEMON_YAML = """
node: {{id: {node}, name: {name}}}
general:
  mode: {general_mode}
  lock_file: {dir}/conntrackd-py.lock
  control_socket: {dir}/ctl.sock
logging: {{level: {log_level}, target: file, file: {dir}/daemon.log}}
netlink: {{rcvbuf: {rcvbuf}}}
filters:
  addresses: {{ignore: [127.0.0.0/8, "::1"]}}
sync:
  mode: {mode}
  external_cache: {external_cache}
  peer_timeout: {peer_timeout}
  auth: {{key_files: [{key_files}]}}
  channels:
    - multicast: {{group: {group}, port: {port}, interface: {iface}, source: {sync_ip}}}
{extra}
"""


class DaemonProc:
    """conntrackd-py running in a lab namespace, with its files in `workdir`."""

    def __init__(self, ns: Netns, workdir: str, node: int, sync_ip: str, *,
                 iface: str = "sync0", group: str = SYNC_GROUP, port: int = 3780,
                 mode: str = "ftfw", key: bytes | None = None, external_cache: bool = True,
                 peer_timeout: float = 5.0, log_level: str = "info", rcvbuf: int = 64 << 20,
                 extra: str = "", general_mode: str = "sync") -> None:
        os.makedirs(workdir, exist_ok=True)
        self.ns, self.workdir, self.node = ns, workdir, node
        key_files = ""
        if key is not None:
            kf = os.path.join(workdir, "sync.key")
            with open(kf, "w") as f:
                f.write(key.hex() + "\n")
            os.chmod(kf, 0o600)
            key_files = kf
        self.conf = os.path.join(workdir, "conntrackd-py.yaml")
        with open(self.conf, "w") as f:
            f.write(_DAEMON_YAML.format(
                node=node, name=f"{ns.name}", dir=workdir, mode=mode, group=group, port=port,
                iface=iface, sync_ip=sync_ip, key_files=key_files, log_level=log_level,
                external_cache="true" if external_cache else "false",
                peer_timeout=peer_timeout, rcvbuf=rcvbuf, extra=extra,
                general_mode=general_mode))
        self.socket = os.path.join(workdir, "ctl.sock")
        self.log = os.path.join(workdir, "daemon.log")
        self.proc: subprocess.Popen[Any] | None = None
        self.start()

    def start(self, timeout: float = 15.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self.proc = self.ns.popen(sys.executable, "-m", "conntrackd_py.cli", "-C", self.conf,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"conntrackd-py in {self.ns.name} exited: {err}"
                                   f"{self.read_log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"conntrackd-py in {self.ns.name} did not start")
            time.sleep(0.005)

    def read_log(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def call(self, cmd: str, **args: Any) -> Any:
        from conntrackd_py.ctlclient import ControlClient
        with ControlClient(self.socket) as c:
            return c.call(cmd, **args)

    def cli(self, *flags: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """The command line, as keepalived's notify script would run it."""
        return self.ns.run(sys.executable, "-m", "conntrackd_py.cli", "-C", self.conf, *flags,
                           check=check, timeout=120)

    def stats(self, kind: str | None = None) -> dict[str, Any]:
        return dict(self.call("stats", kind=kind))

    def external_keys(self, origin: int | None = None) -> set[str]:
        return set(self.call("dump", cache="external", origin=origin))

    def kill(self) -> None:
        """SIGKILL: a crash, leaving its lock and socket files behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 10)




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

# --- keepalived in a lab namespace -------------------------------------------------------------

_KEEPALIVED_CONF = """
global_defs {{
    router_id {name}
    vrrp_version 3
    script_user root
    enable_script_security
    vrrp_garp_master_repeat 2
}}
vrrp_instance FW {{
    state BACKUP
    interface lan0
    virtual_router_id 51
    priority {priority}
    advert_int {advert}
    track_interface {{
        lan0
        wan0
    }}
    virtual_ipaddress {{
{vips}
    }}
    notify_master "{notify} primary"
    notify_backup "{notify} backup"
    notify_fault "{notify} fault"
}}
"""


class Keepalived:
    """keepalived (VRRPv3) in a firewall namespace, moving both VIPs of a ClusterTopology and
    calling config/keepalived/notify.sh against `daemon` (None: no replication)."""

    def __init__(self, ns: Netns, workdir: str, topo: ClusterTopology, priority: int,
                 daemon: DaemonProc | None, advert: float = 0.2) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.ns, self.workdir = ns, workdir
        notify = os.path.join(workdir, "notify.sh")
        repo_notify = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "config", "keepalived", "notify.sh")
        bindir = os.path.dirname(sys.executable)
        self.events = os.path.join(workdir, "notify.log")
        with open(notify, "w") as f:
            f.write("#!/bin/sh\n"
                    f'echo "$(date +%s.%N) start $1" >> {self.events}\n')
            if daemon is not None:
                f.write(f"CONNTRACKD_PY_CONFIG={daemon.conf} CONNTRACKD_PY={bindir}/conntrackd-py "
                        f"{repo_notify} \"$1\" >> {workdir}/notify.out 2>&1\n")
            f.write(f'echo "$(date +%s.%N) done $1" >> {self.events}\n')
        os.chmod(notify, 0o755)
        a = topo.site
        vips = "\n".join(f"        {v}" for v in (
            f"10.{a}.1.1/24 dev lan0", f"10.{a}.2.1/24 dev wan0"))
        self.conf = os.path.join(workdir, "keepalived.conf")
        with open(self.conf, "w") as f:
            f.write(_KEEPALIVED_CONF.format(name=ns.name, priority=priority, advert=advert,
                                            vips=vips, notify=notify))
        self.proc: subprocess.Popen[Any] | None = None
        self.start()

    def start(self) -> None:
        w = self.workdir
        self.started = time.time()
        with open(f"{w}/keepalived.log", "a") as log:
            self.proc = self.ns.popen(
                "keepalived", "-n", "-l", "-D", "-P", "-f", self.conf, "-p", f"{w}/k.pid",
                "-r", f"{w}/vrrp.pid", "-c", f"{w}/chk.pid", "--no-syslog",
                stdout=log, stderr=subprocess.STDOUT)

    def notifications(self) -> list[tuple[float, str, str]]:
        try:
            with open(self.events) as f:
                return [(float(t), what, state) for t, what, state in
                        (line.split() for line in f if line.strip())]
        except FileNotFoundError:
            return []

    def is_master(self) -> bool:
        """Master since the last start(), with the notify script's MASTER actions done."""
        n = [x for x in self.notifications() if x[1] == "done" and x[0] >= self.started]
        return bool(n) and n[-1][2] == "primary"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        # keepalived's VRRP child may outlive the parent for a moment
        with contextlib.suppress(OSError, ValueError), open(
                os.path.join(self.workdir, "vrrp.pid")) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1:])
