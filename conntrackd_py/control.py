"""The control channel: a UNIX stream socket carrying JSON lines, server and client.

A request is one line `{"cmd": NAME, "args": {...}}`; the answer is one line
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. Streaming commands (watch)
answer with many result lines until the client goes away. The server owns parsing and
dispatch; what each command does is the daemon's handler table. A malformed request gets an
error reply and the connection (and the daemon) carries on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from .ctlclient import ControlClient, ControlError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10
__all__ = ["BadRequest", "ControlClient", "ControlError", "ControlServer"]

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
StreamHandler = Callable[[dict[str, Any]], AsyncIterator[Any]]


class BadRequest(ControlError):
    pass


def decode_request_untrusted(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request is not JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise BadRequest('request must be an object with a string "cmd"')
    args = req.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest('"args" must be an object')
    return req["cmd"], args


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler],
                 streams: dict[str, StreamHandler] | None = None) -> None:
        self.path = path
        self.handlers = handlers
        self.streams = streams or {}
        self.requests = 0
        self.bad_requests = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # the lock file proved no other daemon owns a socket left here
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # bind and listen with no checkpoint between: trio's async bind yields, and while the
        # path existed but nothing listened, a client (a keepalived notify script at start)
        # was refused whenever a busy task (a full resync arriving) held the loop
        std = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            std.bind(self.path)
            os.chmod(self.path, 0o600)
            std.listen(128)
        except BaseException:
            std.close()
            raise
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(std))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle, [listener],
                                           handler_nursery=nursery)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _reply(self, stream: trio.abc.Stream, obj: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(obj, default=str).encode() + b"\n")

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async with stream:
                while True:
                    while b"\n" not in buf:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buf += chunk
                        if len(buf) > MAX_REQUEST:
                            self.bad_requests += 1
                            await self._reply(stream, {"ok": False, "error": "request too large"})
                            return
                    line, buf = buf.split(b"\n", 1)
                    await self._dispatch(stream, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _dispatch(self, stream: trio.SocketStream, line: bytes) -> None:
        self.requests += 1
        try:
            cmd, args = decode_request_untrusted(line)
            if cmd in self.streams:
                async for item in self.streams[cmd](args):
                    await self._reply(stream, {"ok": True, "result": item, "more": True})
                await self._reply(stream, {"ok": True, "result": None})
                return
            handler = self.handlers.get(cmd)
            if handler is None:
                raise BadRequest(f"unknown command {cmd!r}; known: "
                                 + ", ".join(sorted([*self.handlers, *self.streams])))
            result = await handler(args)
        except ControlError as e:
            self.bad_requests += 1
            log.info("control request refused: %s", e)
            await self._reply(stream, {"ok": False, "error": str(e)})
            return
        await self._reply(stream, {"ok": True, "result": result})
