"""The control client: blocking, and light to import (no trio), since keepalived's failover
waits for every `conntrackd-py -c` it runs. The protocol is described in control.py."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any


class ControlError(Exception):
    """A request the daemon refused; the text goes back to the client."""


class ControlClient:
    """Blocking client (the CLI is a short-lived process; no event loop needed)."""

    def __init__(self, path: str, timeout: float | None = 300.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, cmd: str, args: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ControlError("the daemon closed the connection")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, cmd: str, **args: Any) -> Any:
        self._send(cmd, args)
        reply = self._read()
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"))
        return reply.get("result")

    def stream(self, cmd: str, **args: Any) -> Iterator[Any]:
        self._send(cmd, args)
        while True:
            reply = self._read()
            if not reply.get("ok"):
                raise ControlError(reply.get("error", "unknown error"))
            if not reply.get("more"):
                return
            yield reply["result"]
