"""A real, long-lived TCP connection between two lab namespaces, driven step by step.

The server echoes every line; the client (`lab.programs tcpsteps`) sends a numbered line per
`exchange()` and checks the echo, so a stalled, reset or corrupted stream shows up as a failed
exchange.
"""

from __future__ import annotations

import subprocess
import sys

from lab import Netns, tcp_echo_server


class TcpConn:
    def __init__(self, client: Netns, server: Netns, server_ip: str, port: int) -> None:
        tcp_echo_server(server, server_ip, port)
        self.client = client.popen(sys.executable, "-m", "lab.programs", "tcpsteps", server_ip,
                                   str(port),
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
        return str(self.client.stdout.readline()).strip()
