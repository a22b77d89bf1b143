"""Capture golden ctnetlink bytes from the real kernel (run as root; writes netlink_golden.json).

    .venv/bin/python tests/data/capture_netlink.py

In a throw-away namespace with conntrack, NAT, marks and accounting on, it records the raw
datagrams of the event socket (NEW, UPDATE, DESTROY) and of a table dump, together with what
`conntrack -L` printed for the same table at the same moment. tests/unit/test_codec.py replays
the bytes and checks the decoder against conntrack's own text, so the expectation does not come
from our decoder. Re-run it after a kernel upgrade to refresh the data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

NETLINK_NETFILTER = 12
OUT = Path(__file__).with_name("netlink_golden.json")

RULES = """
table inet t {
  chain out { type filter hook output priority 0; policy accept;
    udp dport 5001 ct mark set 0x2a
    ct state new accept
  }
  chain post { type nat hook postrouting priority 100;
    ip daddr 127.0.0.2 udp dport 5002 snat ip to 127.0.0.3:6000
  }
  chain pre { type nat hook output priority -100;
    ip daddr 127.0.0.4 tcp dport 8080 dnat ip to 127.0.0.1:7070
  }
}
"""


def sh(ns: str, *argv: str, input: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, text=True,
                          capture_output=True, input=input).stdout


def main() -> None:
    ns = f"ctcap{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        sh(ns, "ip", "link", "set", "lo", "up")
        for k in ("nf_conntrack_events=1", "nf_conntrack_acct=1", "nf_conntrack_timestamp=1"):
            sh(ns, "sysctl", "-qw", f"net.netfilter.{k}")
        sh(ns, "nft", "-f", "-", input=RULES)
        gen = r"""
import socket, time
srv = socket.socket(); srv.bind(('127.0.0.1', 7070)); srv.listen()
c = socket.create_connection(('127.0.0.4', 8080)); a, _ = srv.accept()
c.sendall(b'hello'); a.recv(5); a.sendall(b'world'); c.recv(5)
for port in (5001, 5002, 5003):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b'x', ('127.0.0.2', port))
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u6.sendto(b'x', ('::1', 5004))
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
body = bytes((8, 0, 0, 0, 0x12, 0x34, 0, 1)) + b'ping'
s = sum(int.from_bytes(body[i:i + 2], 'big') for i in range(0, len(body), 2))
s = (s & 0xffff) + (s >> 16); s = ~((s & 0xffff) + (s >> 16)) & 0xffff
icmp.sendto(body[:2] + s.to_bytes(2, 'big') + body[4:], ('127.0.0.1', 0))
time.sleep(0.2)
print(c.getsockname()[1], flush=True)
time.sleep(3)
"""
        # subscribe in the namespace before the traffic starts
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        libc.setns(fd, 0x40000000)
        ev = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        ev.bind((0, 0b111))
        dump = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        dump.bind((0, 0))
        libc.setns(own, 0x40000000)
        os.close(fd)
        os.close(own)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", gen],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()
        listing = sh(ns, "conntrack", "-L", "-o", "id")
        # dump: nlmsghdr + nfgenmsg, NLM_F_REQUEST|NLM_F_DUMP, family AF_UNSPEC
        import struct
        dump.send(struct.pack("=IHHII", 20, 0x101, 0x301, 1, 0) + struct.pack("=BBH", 0, 0, 0))
        dump_chunks = []
        while True:
            data = dump.recv(1 << 20)
            dump_chunks.append(data.hex())
            if struct.unpack_from("=H", data, len(data) - 20 + 4)[0] == 3 or len(data) == 20:
                break
        sh(ns, "conntrack", "-D", "-p", "udp", "--dport", "5001")
        proc.wait()
        time.sleep(0.3)
        ev.setblocking(False)
        events = []
        while True:
            try:
                events.append(ev.recv(1 << 16).hex())
            except BlockingIOError:
                break
        OUT.write_text(json.dumps({
            "kernel": os.uname().release,
            "conntrack_L": listing.splitlines(),
            "dump": dump_chunks,
            "events": events,
        }, indent=1) + "\n")
        print(f"wrote {OUT}: {len(events)} event datagrams, {len(dump_chunks)} dump datagrams")
    finally:
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
