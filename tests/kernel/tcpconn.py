"""A real, long-lived TCP connection between two lab namespaces, driven step by step.

The server echoes every line; the client sends a numbered line per `exchange()` and checks the
echo, so a stalled, reset or corrupted stream shows up as a failed exchange.
"""

from __future__ import annotations

import subprocess
import sys

from lab import Netns, tcp_echo_server

CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print('connected %d' % c.getsockname()[1], flush=True)
f = c.makefile('rb')
n = 0
for cmd in sys.stdin:
    timeout = float(cmd.split()[1]) if len(cmd.split()) > 1 else 5.0
    c.settimeout(timeout)
    n += 1
    line = b'%d %s\n' % (n, b'x' * 1000)
    t0 = time.monotonic()
    try:
        c.sendall(line)
        back = f.readline()
        ok = back == line
        print(('ok %.3f' % (time.monotonic() - t0)) if ok else 'corrupt', flush=True)
    except (OSError, ValueError) as e:
        print('fail %s' % type(e).__name__, flush=True)
        break
"""


class TcpConn:
    def __init__(self, client: Netns, server: Netns, server_ip: str, port: int) -> None:
        tcp_echo_server(server, server_ip, port)
        self.client = client.popen(sys.executable, "-c", CLIENT, server_ip, str(port),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.client.stdout is not None
        first = self.client.stdout.readline().split()
        assert first, "client printed nothing"
        assert first[0] == "connected", first
        self.sport = int(first[1])

    def exchange(self, timeout: float = 5.0) -> str:
        """One request/echo round trip: 'ok <seconds>', 'corrupt' or 'fail <error>'."""
        assert self.client.stdin is not None
        assert self.client.stdout is not None
        self.client.stdin.write(f"x {timeout}\n")
        self.client.stdin.flush()
        return self.client.stdout.readline().strip()
