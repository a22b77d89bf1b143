"""Hostile input shared by the unit and the kernel tests of one edge, so that both feed the
same list: the control socket's requests (tests/unit/test_control.py against a fake daemon,
tests/kernel/test_control_hostile.py against a real one) and a raw client to send them.

Owns test data and a blocking test client only; must not assert anything (the tests do).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any


def req(cmd: str, **args: Any) -> bytes:
    """One control request line, as the CLI would send it."""
    return json.dumps({"cmd": cmd, "args": args}).encode() + b"\n"


#: 30000 nested arrays: a RecursionError in json.loads stopped the daemon on main (b27c7c2)
DEEP_NESTING = b"[" * 30000 + b"]" * 30000 + b"\n"

#: control requests that stopped the daemon on main (b27c7c2, issue 13), and more of the same
#: kind; each must get an error reply, be counted in `bad_requests`, and reach no Ops method
HOSTILE_REQUESTS = [
    req("request_resync", node="x"),
    req("request_resync", node=2**70),
    req("request_resync", node=0),
    req("request_resync", node=-1),
    req("request_resync", node=True),
    req("request_resync", node=1.5),
    req("dump", cache="external", origin="x"),
    req("dump", proto="nope"),
    req("dump", proto="tcpx"),
    req("dump", proto=256),
    req("dump", proto=300),
    req("dump", cache="both"),
    req("dump", cache="internal", origin=3),
    req("dump", raw="yes"),
    req("dump", nat="sideways"),
    req("purge", timeout="x"),
    req("purge", timeout=-5),
    req("purge", timeout=2**31 + 1),
    req("stats", kind={}),
    req("stats", kind="everything"),
    req("flush", cache=7),
    req("flush", cache=["internal"]),
    req("commit", now=True),  # unknown arguments are refused, not ignored
    req("commit", force=True),
    req("nope"),
    DEEP_NESTING,
    b'{"cmd": "stats", "args": {"kind": ' + b"[" * 30000 + b"\n",
    b"\xff\xfe\xfd\n",
    b"\xff\xfe\x00garbage\n",
    b'{"cmd": "stats", "args": [1]}\n',
    b'{"cmd": "stats", "args": "kind"}\n',
    b'{"cmd": 7}\n',
    b'{"cmd": "stats", "args": {}, "kind": "cache"}\n',  # a misplaced argument
    b"\n",
    b'{"cmd": "stats", "args": {"kind": "\\ud800"}}\n',
    b'{"cmd": "request_resync", "args": {"node": ' + b"9" * 5000 + b"}}\n",
]


class RawClient:
    """A blocking control client speaking raw bytes (the CLI's sockets are blocking too)."""

    def __init__(self, path: str, timeout: float = 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def ask(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line)
        return self.read()

    def read(self) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(self.file.readline())
        return reply

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), as a killed client's kernel may."""
        self.close(reset=True)

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.file.close()
        self.sock.close()
