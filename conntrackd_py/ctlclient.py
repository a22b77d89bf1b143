"""The control client: blocking, and light to import (no trio), since keepalived's failover
waits for every `conntrackd-py -c` it runs. The protocol is described in control.py.

Whatever the daemon does (garbage, a reply cut short, a reset, silence past the timeout),
a call ends in a reply or in ControlError, never another exception: the CLI prints one line."""

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
        try:
            self.sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        except OSError as e:
            raise ControlError(f"cannot send to the daemon: {e.strerror or e}") from None

    def _read(self) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except OSError as e:  # a reset, or the timeout
            raise ControlError(f"no reply from the daemon: {e.strerror or e}") from None
        if not line:
            raise ControlError("the daemon closed the connection")
        if not line.endswith(b"\n"):
            raise ControlError("the daemon closed the connection in the middle of a reply")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            raise ControlError("the daemon's reply is not JSON") from None
        if not isinstance(reply, dict):
            raise ControlError("the daemon's reply is not a JSON object")
        return reply

    def call(self, cmd: str, **args: Any) -> Any:
        self._send(cmd, args)
        reply = self._read()
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "unknown error")))
        return reply.get("result")

    def stream(self, cmd: str, **args: Any) -> Iterator[Any]:
        self._send(cmd, args)
        while True:
            reply = self._read()
            if not reply.get("ok"):
                raise ControlError(str(reply.get("error", "unknown error")))
            if not reply.get("more"):
                return
            yield reply.get("result")
