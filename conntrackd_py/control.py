"""The control channel's server: a UNIX stream socket carrying JSON lines.

A request is one line `{"cmd": NAME, "args": {...}}`; the answer is one line
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. Streaming commands (watch)
answer with many result lines (`"more": true`) until the client goes away. The client is
ctlclient.py.

This module owns the socket, the framing and the containment of every client: what a command
means, and the parsing and range checks of its arguments, are the table in commands.py; what
it does is the daemon's `Ops`. Nothing that one client sends or fails to read may reach the
daemon's nursery: a bad request is an error reply (counted in `bad_requests`), an unexpected
exception is logged once per kind and counted in `errors`, a client that stops reading is
dropped after `send_timeout`, and clients beyond `max_clients` are refused with an error line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import socket
from typing import Any

import trio

from .commands import Command, Ops, by_name, parse_request
from .ctlclient import ControlClient, ControlError

log = logging.getLogger(__name__)

__all__ = ["BadRequest", "ControlClient", "ControlError", "ControlServer",
           "decode_request_untrusted", "encode_reply"]

#: a request line longer than this is refused (the longest real one is ~100 bytes)
MAX_REQUEST = 64 << 10
#: simultaneous clients; more are refused with an error line (keepalived runs a few at once)
MAX_CLIENTS = 64
#: a client that accepts none of a reply's bytes for this long is dropped
SEND_TIMEOUT = 10.0
#: a connection with no complete request for this long is closed (between requests too)
IDLE_TIMEOUT = 60.0
_CHUNK = 64 << 10


class BadRequest(ControlError):
    pass


def decode_request_untrusted(line: bytes) -> tuple[str, dict[str, Any]]:
    """The command name and arguments of one request line; raises only BadRequest."""
    try:
        req = json.loads(line)
    except RecursionError:  # the C scanner's own depth guard: [[[[...
        raise BadRequest("request is not JSON: nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        raise BadRequest(f"request is not JSON: {str(e)[:200]}") from None
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise BadRequest('request must be an object with a string "cmd"')
    if len(req) > 2 or not req.keys() <= {"cmd", "args"}:
        raise BadRequest('a request has "cmd" and "args" only')
    args = req.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest('"args" must be an object')
    return req["cmd"], args


def _plain(obj: object, depth: int = 0) -> object:
    """A JSON-ready copy of an odd result: dataclasses as dicts, keys as text, sets and
    tuples as lists, bytes as hex, non-finite floats as text; anything else as its str."""
    if depth > 64:
        return "..."
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if not isinstance(obj, (dict, list, tuple)):
        try:
            d = _as_dict(obj)
        except Exception:  # an odd result's own method: its text will do
            d = None
        if d is not None:
            obj = d
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): _plain(v, depth + 1)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    return str(obj)


def _as_dict(obj: object) -> object | None:
    """A result's own JSON shape (`as_dict()`: stats.Snapshot keeps peers keyed by node id),
    else a dataclass's fields; None when it is neither."""
    as_dict = getattr(obj, "as_dict", None)
    if callable(as_dict) and not isinstance(obj, type):
        return as_dict()  # type: ignore[no-any-return]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return None


def _default(obj: object) -> object:
    d = _as_dict(obj)
    if d is None:
        raise TypeError(f"{type(obj).__name__} is not JSON")
    return d


def encode_reply(obj: dict[str, Any]) -> bytes:
    """One reply line. The fast path is json.dumps with dataclasses as dicts; a result it
    cannot encode (a tuple key, a set, an object) takes the slow, total `_plain` copy."""
    try:
        return json.dumps(obj, default=_default, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError, RecursionError):
        return json.dumps(_plain(obj)).encode() + b"\n"


class ControlServer:
    """Serves the control socket at `path` for `ops` (the daemon): `await nursery.start(
    server.serve)`. Its counters (`stats()`) are read into the daemon's `-s` and metrics;
    the limits are attributes so that tests can shorten them."""

    def __init__(self, path: str, ops: Ops) -> None:
        self.path = path
        self.ops = ops
        self.max_clients = MAX_CLIENTS
        self.send_timeout = SEND_TIMEOUT
        self.idle_timeout = IDLE_TIMEOUT
        self.requests = 0
        self.bad_requests = 0
        self.errors = 0
        self.refused_clients = 0   # beyond max_clients
        self.dropped_clients = 0   # stopped reading their replies, or idle
        self.clients = 0
        self._error_kinds: set[str] = set()

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
            # no window in which another user could connect before the chmod (the umask is
            # the process's: a file another thread made meanwhile would only be stricter)
            old = os.umask(0o177)
            try:
                std.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            std.listen(128)
        except BaseException:
            std.close()
            raise
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(std))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                # trio's accept loop outlives EMFILE (it logs and backs off)
                await trio.serve_listeners(self._handle, [listener],
                                           handler_nursery=nursery)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # --- one client -------------------------------------------------------------------------
    async def _handle(self, stream: trio.SocketStream) -> None:
        """Serve one client; nothing escapes (the accept loop's nursery is the daemon's)."""
        try:
            async with stream:
                if self.clients >= self.max_clients:
                    self.refused_clients += 1
                    self._note("refused", f"more than {self.max_clients} control clients at "
                               "once; refusing the new ones (refusals so far: %d)",
                               self.refused_clients)
                    with trio.move_on_after(0.1):  # no waiting on a client we refuse
                        await stream.send_all(encode_reply(
                            {"ok": False, "error": "too many control clients"}))
                    return
                self.clients += 1
                try:
                    await self._serve_client(stream)
                finally:
                    self.clients -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (a reset mid-request included)
        except _Dropped:
            self.dropped_clients += 1
        except Exception as e:  # a bug or a resource error: contained, logged, counted
            self._unexpected(e)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        while True:
            end = buf.find(b"\n")
            while end < 0:
                if len(buf) > MAX_REQUEST:
                    self.requests += 1
                    self._bad(f"request longer than {MAX_REQUEST} bytes")
                    await self._send(stream, {"ok": False, "error": "request too large"})
                    return
                with trio.move_on_after(self.idle_timeout) as idle:
                    chunk = await stream.receive_some(_CHUNK)
                if idle.cancelled_caught:
                    raise _Dropped
                if not chunk:
                    return
                start = len(buf)
                buf += chunk
                end = buf.find(b"\n", start)
            if end > MAX_REQUEST:  # the newline came in the chunk after the limit
                self.requests += 1
                self._bad(f"request longer than {MAX_REQUEST} bytes")
                await self._send(stream, {"ok": False, "error": "request too large"})
                return
            line = bytes(buf[:end])
            del buf[:end + 1]
            await self._dispatch(stream, line)

    async def _dispatch(self, stream: trio.SocketStream, line: bytes) -> None:
        self.requests += 1
        try:
            name, args = decode_request_untrusted(line)
            cmd = by_name(name)
            req = parse_request(cmd, args)
        except ControlError as e:
            self._bad(str(e))
            await self._send(stream, {"ok": False, "error": str(e)})
            return
        await self._run(stream, cmd, req)

    async def _run(self, stream: trio.SocketStream, cmd: Command, req: object) -> None:
        try:
            if cmd.stream is not None:
                items = cmd.stream(self.ops, req)
                try:
                    async for item in items:
                        await self._send(stream, {"ok": True, "result": item, "more": True})
                finally:  # a watcher that went away unregisters now, not at garbage collection
                    aclose = getattr(items, "aclose", None)
                    if aclose is not None:
                        await aclose()
                await self._send(stream, {"ok": True, "result": None})
                return
            assert cmd.run is not None
            result = await cmd.run(self.ops, req)
        except ControlError as e:  # the daemon refused (no engine in stats mode, ...)
            log.info("control: %s refused: %s", cmd.name, e)
            await self._send(stream, {"ok": False, "error": str(e)})
            return
        except (_Dropped, trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client's doing, not the command's
        except Exception as e:
            self._unexpected(e, cmd.name)
            await self._send(stream, {"ok": False, "error": f"{cmd.name} failed: "
                                      f"{type(e).__name__}: {str(e)[:200]}"})
            return
        await self._send(stream, {"ok": True, "result": result})

    async def _send(self, stream: trio.SocketStream, obj: dict[str, Any]) -> None:
        """Send one reply line; a client that takes none of it for `send_timeout` is dropped
        (a dump of a million flows to a client that never reads must not hold its memory and
        its slot forever)."""
        data = memoryview(encode_reply(obj))
        for i in range(0, len(data), _CHUNK):
            with trio.move_on_after(self.send_timeout) as stalled:
                await stream.send_all(data[i:i + _CHUNK])
            if stalled.cancelled_caught:
                raise _Dropped

    # --- accounting -------------------------------------------------------------------------
    def _bad(self, why: str) -> None:
        self.bad_requests += 1
        n = self.bad_requests
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood cannot flood the log
            log.info("control request refused (%d so far): %s", n, why)

    def _note(self, kind: str, msg: str, *args: object) -> None:
        if kind not in self._error_kinds:
            self._error_kinds.add(kind)
            log.warning(msg, *args)

    def _unexpected(self, e: Exception, where: str = "serving a client") -> None:
        self.errors += 1
        kind = f"{where}:{type(e).__name__}"
        if kind not in self._error_kinds:  # once per kind; the count is in `errors`
            self._error_kinds.add(kind)
            log.error("control: unexpected error %s (%d so far; this kind is logged once)",
                      where, self.errors, exc_info=e)


class _Dropped(Exception):
    """The client stopped reading (or sending): close it."""
