"""Traffic for the lab: UDP flows (in this process or a child), UDP and TCP echo servers, and a
long-lived TCP stream that notices every lost, reordered or stalled byte.

These functions start processes and open sockets inside a namespace; the programs that run as
their own process are in `lab.programs` (`python -m lab.programs ...`, started by
`Netns.popen`). The UDP generator sends hand-built packets on a raw socket: one datagram per
flow, 55k-90k new conntrack entries/s through a firewall on this 2-vCPU VM (masquerade and the
server's ICMP port-unreachable replies cost ~20% each). This module must not create or delete
namespaces (the `Lab` does) and writes no address or rule.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from conntrackd_py.netns import socket_in

from .netns import Netns

FIRST_SPORT = 1024
PAYLOAD = b"ctpy"


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
    ulen = 8 + len(PAYLOAD)
    if d.version == 4:  # the kernel fills in the IPv4 total length, id and header checksum
        iphdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 17, 0, s.packed, d.packed)
    else:
        iphdr = struct.pack("!IHBB16s16s", 0x6 << 28, ulen, 17, 64, s.packed, d.packed)
    # UDP checksum without the ports: pseudo header + length field + payload
    base = _words(s.packed) + _words(d.packed) + 17 + ulen + ulen + _words(PAYLOAD)
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
            sendto(iphdr + pack(sp, dp, ulen, c or 0xFFFF) + PAYLOAD, addr)
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
    return client.popen(sys.executable, "-m", "lab.programs", "udpgen", src, dst, str(n),
                        str(dport), str(max_seconds), stdout=subprocess.PIPE, text=True)


def udp_echo_server(server: Netns, port: int) -> subprocess.Popen[str]:
    """A process in `server` echoing UDP on `port` (both families); returns once it is bound."""
    p = server.popen(sys.executable, "-m", "lab.programs", "udpecho", str(port),
                     stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"udp echo server on port {port} did not start")
    return p


def tcp_echo_server(server: Netns, ip: str, port: int) -> subprocess.Popen[str]:
    """A process in `server` echoing every TCP byte back; returns once it listens."""
    srv = server.popen(sys.executable, "-m", "lab.programs", "tcpecho", ip, str(port),
                       stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None
    if srv.stdout.readline().strip() != "ready":
        raise RuntimeError("echo server did not start")
    return srv


def stream_line(n: int) -> bytes:
    """Line `n` of a TcpStream (without its newline): what the client sends and checks."""
    return b"%08d %s" % (n, b"." * 90)


class TcpStream:
    """A TCP connection client -> server carrying numbered lines at `rate`/s, echoed back.

    `status()` and `stop()` report {sent, received, max_stall, errors}: `received` counts the
    echoes that came back complete and in order, `max_stall` the longest silence between two.
    The client connects to `connect` (host, port) when given, e.g. a forwarded VIP and port.
    """

    def __init__(self, client: Netns, server: Netns, server_ip: str, port: int,
                 rate: float = 200.0, connect: tuple[str, int] | None = None) -> None:
        tcp_echo_server(server, server_ip, port)
        # `connect`: where the client connects when that is not where the server listens
        # (a VIP and port the firewalls forward to server_ip:port)
        host, dport = connect if connect is not None else (server_ip, port)
        self.proc = client.popen(sys.executable, "-m", "lab.programs", "tcpstream", host,
                                 str(dport), str(rate), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        if not first or first[0] != "connected":
            raise RuntimeError(f"stream client did not connect: {first}")
        self.sport = int(first[1])

    def _ask(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(what + "\n")
                self.proc.stdin.flush()
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
