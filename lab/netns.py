"""Network namespaces for the tests, the benchmarks and `conntrackd-py demo`: `Lab`, `Netns`,
`Switch` and the reaping of leaked namespaces.

This module owns every namespace, veth pair and bridge that a `Lab` creates and every process
started in them with `Netns.popen`, and removes all of them in `Lab.close()`. It must not touch
anything it did not create: not the root namespace's firewall, conntrack table, routes or
sysctls, and no namespace of another run (names are `<prefix><pid>x<seq>-<role>`, and
`reap_namespaces` deletes only those with a prefix of this process). No link leads out of a
lab, so no packet can leave it.

Everything is synchronous and shells out to `ip`, `nft`, `sysctl` and `conntrack`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from conntrackd_py.netns import socket_in

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
    """One network namespace of a Lab. Processes started with `popen` die with the lab.

    `sync_key` is the lab's cluster key: the daemons started in its namespaces authenticate
    the sync link with it unless told otherwise (lab.daemons.DaemonProc).
    """

    name: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    sync_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

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
        #: 32 random bytes shared by every namespace of this lab (one cluster per lab)
        self.sync_key = os.urandom(32)
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
        ns = Netns(f"{self.tag}{next(_seq)}-{role}", sync_key=self.sync_key)
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



def terminate(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
