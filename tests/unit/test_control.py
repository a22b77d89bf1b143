"""The control socket against a fake daemon: good requests answered, every hostile one refused
with an error reply (and counted), the server unharmed and still answering the next client.

The server runs in the test's trio loop; the clients are blocking sockets in a thread, as the
CLI's are."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hostile_inputs import DEEP_NESTING, HOSTILE_REQUESTS, RawClient, req

from conntrackd_py.commands import COMMANDS
from conntrackd_py.control import (
    ControlError,
    ControlServer,
    decode_request_untrusted,
    encode_reply,
)
from conntrackd_py.ctlclient import ControlClient


@dataclass(frozen=True)
class Report:
    created: int
    seconds: float


class FakeOps:
    """Records what the server asked; a few results are deliberately odd."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.dump_result: list[object] = ["a flow"]
        self.fail_with: BaseException | None = None
        self.watch_lines = 3
        self.watch_closed = False

    async def commit(self) -> object:
        self.calls.append(("commit",))
        return Report(3, 0.5)

    def flush_caches(self, which: str) -> object:
        self.calls.append(("flush_caches", which))
        return {"internal": 1}

    async def flush_kernel(self) -> object:
        self.calls.append(("flush_kernel",))
        if self.fail_with is not None:
            raise self.fail_with
        return "flushed"

    async def resync_internal(self) -> object:
        self.calls.append(("resync_internal",))
        raise ControlError("no internal cache in this mode")

    def bulk_send(self) -> object:
        self.calls.append(("bulk_send",))
        return {(1, 2): {1, 2}, "b": b"\x01", "nan": math.nan}  # not JSON as it is

    def request_resync(self, node: int | None) -> object:
        self.calls.append(("request_resync", node))
        return "resync requested"

    async def purge(self, timeout: int | None) -> object:  # noqa: ASYNC109 (the interface)
        self.calls.append(("purge", timeout))
        return {"timeout": timeout}

    def stop(self) -> object:
        self.calls.append(("stop",))
        return "stopping"

    def stats(self, kind: str | None) -> object:
        self.calls.append(("stats", kind))
        return {"kind": kind}

    def dump(self, which: str, proto: int | None, nat: str | None,
             origin: int | None, raw: bool) -> list[object]:
        self.calls.append(("dump", which, proto, nat, origin, raw))
        return self.dump_result

    def in_sync(self) -> bool:
        self.calls.append(("in_sync",))
        return True

    async def watch(self) -> AsyncIterator[str]:
        try:
            for i in range(self.watch_lines):
                yield f"line {i}"
                await trio.sleep(0.01 if self.watch_lines > 3 else 0)
        finally:
            self.watch_closed = True


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "ctl.sock")


async def serve(path: str, ops: FakeOps, body: Callable[[], Any],
                setup: Callable[[ControlServer], None] | None = None) -> tuple[ControlServer,
                                                                                Any]:
    """Run `body` (blocking, in a thread) against a server on `path`; its result."""
    server = ControlServer(path, ops)
    if setup is not None:
        setup(server)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            result = await trio.to_thread.run_sync(body)
            nursery.cancel_scope.cancel()
    return server, result


def test_decode_request_untrusted_refuses_everything_but_a_command_object() -> None:
    assert decode_request_untrusted(b'{"cmd": "stats", "args": {"kind": "cache"}}') == (
        "stats", {"kind": "cache"})
    assert decode_request_untrusted(b'{"cmd": "stats", "args": null}') == ("stats", {})
    for bad in (b"", b"nope", b"[1]", b'{"cmd": 3}', b'{"cmd": "x", "args": []}', b"\xff\xfe",
                b"[" * 100000):
        with pytest.raises(ControlError):
            decode_request_untrusted(bad)


def test_odd_results_are_encoded_whatever_they_hold() -> None:
    odd = {"ok": True, "result": {(1, 2): {3}, "b": b"\x01\x02", "f": math.inf,
                                  "r": Report(1, 2.0), "o": object(), "n": [Report(2, 0.0)]}}
    line = encode_reply(odd)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    got = json.loads(line)["result"]
    assert got["(1, 2)"] == [3]
    assert got["b"] == "0102"
    assert got["f"] == "inf"
    assert got["r"] == {"created": 1, "seconds": 2.0}
    assert got["n"] == [{"created": 2, "seconds": 0.0}]
    # the fast path keeps a dataclass's fields
    assert json.loads(encode_reply({"result": Report(5, 1.0)}))["result"] == {
        "created": 5, "seconds": 1.0}

    class Shaped:
        def as_dict(self) -> dict[str, Any]:
            return {"peers": {"2": "up"}}

    assert json.loads(encode_reply({"result": Shaped()}))["result"] == {"peers": {"2": "up"}}


async def test_every_command_reaches_its_ops_method_with_parsed_arguments(
        sock_path: str) -> None:
    ops = FakeOps()

    def body() -> list[Any]:
        with ControlClient(sock_path, timeout=20) as c:
            return [
                c.call("commit"), c.call("flush", cache="internal"), c.call("flush_kernel"),
                c.call("bulk_send"), c.call("request_resync", node="7"),
                c.call("request_resync"), c.call("purge"), c.call("purge", timeout=0),
                c.call("stats", kind="all"), c.call("stats", kind="cache"),
                c.call("dump", cache="external", proto="TCP", nat="any", origin=2**32 - 1,
                       raw=True),
                c.call("dump"), c.call("in_sync"), list(c.stream("watch")), c.call("stop"),
            ]

    server, replies = await serve(sock_path, ops, body)
    assert replies[0] == {"created": 3, "seconds": 0.5}
    assert replies[3] == {"(1, 2)": [1, 2], "b": "01", "nan": "nan"}
    assert replies[12] == {"in_sync": True}
    assert replies[13] == ["line 0", "line 1", "line 2"]
    assert ops.calls == [
        ("commit",), ("flush_caches", "internal"), ("flush_kernel",), ("bulk_send",),
        ("request_resync", 7), ("request_resync", None), ("purge", None), ("purge", 0),
        ("stats", None), ("stats", "cache"),
        ("dump", "external", 6, "any", 2**32 - 1, True),
        ("dump", "internal", None, None, None, False), ("in_sync",), ("stop",)]
    assert (server.requests, server.bad_requests, server.errors) == (15, 0, 0)
    names = {c.name for c in COMMANDS}
    assert names == {"commit", "flush", "flush_kernel", "resync_internal", "bulk_send",
                     "request_resync", "purge", "stop", "stats", "in_sync", "dump", "watch"}


async def test_every_hostile_request_gets_an_error_and_the_server_answers_the_next(
        sock_path: str) -> None:
    ops = FakeOps()

    def body() -> list[dict[str, Any]]:
        out = []
        c = RawClient(sock_path)
        for line in HOSTILE_REQUESTS:
            out.append(c.ask(line))
            out.append(c.ask(req("in_sync")))  # the same connection still works
        c.close()
        return out

    server, replies = await serve(sock_path, ops, body)
    for line, bad, good in zip(HOSTILE_REQUESTS, replies[::2], replies[1::2], strict=True):
        assert bad["ok"] is False, line[:80]
        assert 0 < len(bad["error"]) < 1000, line[:80]
        assert good == {"ok": True, "result": {"in_sync": True}}
    assert "nested too deeply" in replies[2 * HOSTILE_REQUESTS.index(DEEP_NESTING)]["error"]
    assert server.bad_requests == len(HOSTILE_REQUESTS)
    assert server.errors == 0
    # no Ops method saw a hostile request
    assert {c[0] for c in ops.calls} == {"in_sync"}


async def test_a_refusal_from_the_daemon_and_an_unexpected_error_are_replies(
        sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    ops = FakeOps()
    ops.fail_with = RuntimeError("a bug in the daemon")

    def body() -> list[Any]:
        c = RawClient(sock_path)
        out = [c.ask(req("resync_internal")), c.ask(req("flush_kernel")),
               c.ask(req("flush_kernel")), c.ask(req("in_sync"))]
        c.close()
        return out

    with caplog.at_level(logging.INFO, logger="conntrackd_py.control"):
        server, replies = await serve(sock_path, ops, body)
    assert replies[0] == {"ok": False, "error": "no internal cache in this mode"}
    assert replies[1]["ok"] is False
    assert "RuntimeError" in replies[1]["error"]
    assert replies[2] == replies[1]
    assert replies[3]["ok"] is True
    assert server.errors == 2
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1  # once per kind; the count is in `errors`


async def test_a_request_too_long_is_refused_and_the_connection_closed(sock_path: str) -> None:
    def body() -> tuple[dict[str, Any], bytes, Any]:
        c = RawClient(sock_path)
        # no newline ever: the server must not buffer forever
        c.sock.sendall(b"x" * (200 << 10))
        first = c.read()
        try:
            rest = c.file.read()
        except ConnectionResetError:  # closed with our unread bytes in its buffer
            rest = b""
        c.close()
        with ControlClient(sock_path, timeout=20) as ok:
            return first, rest, ok.call("in_sync")

    server, (first, rest, after) = await serve(sock_path, FakeOps(), body)
    assert first == {"ok": False, "error": "request too large"}
    assert rest == b""  # closed
    assert after == {"in_sync": True}
    assert server.bad_requests == 1


async def test_a_line_past_the_limit_is_refused_even_when_its_newline_comes(
        sock_path: str) -> None:
    def body() -> dict[str, Any]:
        c = RawClient(sock_path)
        c.sock.sendall(b'{"cmd": "stats", "args": {"kind": "' + b"x" * (64 << 10) + b'"}}\n')
        reply = c.read()
        c.close()
        return reply

    server, reply = await serve(sock_path, FakeOps(), body)
    assert reply == {"ok": False, "error": "request too large"}
    assert server.bad_requests == 1


async def test_a_watcher_that_goes_away_is_unregistered(sock_path: str) -> None:
    ops = FakeOps()
    ops.watch_lines = 10**9

    def body() -> str:
        c = RawClient(sock_path)
        first = c.ask(req("watch"))
        c.close(reset=True)
        return str(first["result"])

    server = ControlServer(sock_path, ops)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            first = await trio.to_thread.run_sync(body)
            while not ops.watch_closed:  # noqa: ASYNC110 (a flag of the fake)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert first == "line 0"
    assert server.errors == 0


async def test_clients_that_reset_mid_request_or_mid_reply_do_not_harm_the_server(
        sock_path: str) -> None:
    ops = FakeOps()
    ops.dump_result = ["x" * 100] * 200_000  # ~20 MB: the reset lands mid-reply

    def body() -> Any:
        for partial in (b'{"cmd": "dump", "ar', b"", req("dump")):
            c = RawClient(sock_path)
            if partial:
                c.sock.sendall(partial)
            c.reset()
        c = RawClient(sock_path)
        c.sock.sendall(req("dump"))
        c.sock.recv(1000)  # the reply has started
        c.reset()
        with ControlClient(sock_path, timeout=20) as ok:
            return ok.call("stats", kind="cache")

    server, after = await serve(sock_path, ops, body)
    assert after == {"kind": "cache"}
    assert server.errors == 0


async def test_a_client_that_never_reads_its_reply_is_dropped(sock_path: str) -> None:
    ops = FakeOps()
    ops.dump_result = ["x" * 100] * 200_000
    stuck: list[RawClient] = []

    def body() -> Any:
        c = RawClient(sock_path)
        c.sock.sendall(req("dump"))  # and never reads
        stuck.append(c)
        with ControlClient(sock_path, timeout=20) as ok:
            answered = ok.call("in_sync")  # served meanwhile
        return answered

    server = ControlServer(sock_path, ops)
    server.send_timeout = 0.5
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            answered = await trio.to_thread.run_sync(body)
            while server.dropped_clients == 0:  # noqa: ASYNC110 (a counter, no event)
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    stuck[0].close()
    assert answered == {"in_sync": True}
    assert server.dropped_clients == 1
    assert server.errors == 0


async def test_clients_beyond_the_cap_are_refused_with_an_error_line(sock_path: str) -> None:
    def setup(server: ControlServer) -> None:
        server.max_clients = 3

    def body() -> tuple[dict[str, Any], Any]:
        idle = [RawClient(sock_path) for _ in range(3)]
        for c in idle:  # all three are being served (answered once)
            assert c.ask(req("in_sync"))["ok"]
        extra = RawClient(sock_path)
        refused = extra.read()
        extra.close()
        idle.pop().close()
        # the freed slot serves a new client (the server notices the close first)
        for _ in range(100):
            try:
                with ControlClient(sock_path, timeout=20) as ok:
                    after = ok.call("in_sync")
                break
            except ControlError:
                threading.Event().wait(0.05)
        for c in idle:
            c.close()
        return refused, after

    server, (refused, after) = await serve(sock_path, FakeOps(), body, setup)
    assert refused == {"ok": False, "error": "too many control clients"}
    assert after == {"in_sync": True}
    assert server.refused_clients >= 1


async def test_the_socket_is_for_its_owner_only(sock_path: str) -> None:
    def body() -> int:
        return os.stat(sock_path).st_mode

    _, mode = await serve(sock_path, FakeOps(), body)
    assert stat.S_IMODE(mode) == 0o600


def fake_daemon(path: str, replies: list[bytes]) -> Iterator[None]:
    """A server that answers each connection with the next canned bytes, then closes."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def run() -> None:
        for data in replies:
            conn, _ = srv.accept()
            conn.recv(65536)
            if data:
                conn.sendall(data)
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    srv.close()
    t.join(5)


def test_the_client_turns_a_misbehaving_daemon_into_control_errors(sock_path: str) -> None:
    replies = [b"garbage\n", b'{"ok": true, "res', b"", b"[1, 2]\n", b"[" * 100000 + b"\n",
               b'{"ok": false}\n', b'{"ok": true, "result": 5}\n']
    gen = fake_daemon(sock_path, replies)
    next(gen)
    errors = []
    for _ in replies[:-1]:
        with ControlClient(sock_path, timeout=20) as c, pytest.raises(ControlError) as e:
            c.call("in_sync")
        errors.append(str(e.value))
    with ControlClient(sock_path, timeout=20) as c:
        assert c.call("in_sync") == 5
    assert errors == ["the daemon's reply is not JSON",
                      "the daemon closed the connection in the middle of a reply",
                      "the daemon closed the connection",
                      "the daemon's reply is not a JSON object",
                      "the daemon's reply is not JSON",
                      "unknown error"]
    next(gen, None)


def test_the_client_times_out_with_a_control_error(sock_path: str) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)  # accepts (in the kernel) and never answers
    try:
        with ControlClient(sock_path, timeout=0.2) as c, pytest.raises(ControlError,
                                                                       match="no reply"):
            c.call("in_sync")
    finally:
        srv.close()


def test_control_commands_find_the_socket_without_the_full_config_load(tmp_path: Path) -> None:
    from conntrackd_py import cli
    from conntrackd_py.config import default_config
    assert default_config().general.control_socket == cli.DEFAULT_CONTROL_SOCKET
    assert cli._control_socket(None) == cli.DEFAULT_CONTROL_SOCKET
    conf = tmp_path / "c.yaml"
    conf.write_text("node: {id: 3}\ngeneral: {control_socket: /tmp/x.sock}\n")
    assert cli._control_socket(str(conf)) == "/tmp/x.sock"
    conf.write_text("node: {id: 3}\n")
    assert cli._control_socket(str(conf)) == cli.DEFAULT_CONTROL_SOCKET
    conf.write_text("node: {id: 3}\ngeneral: {control_socket: 7}\n")  # not a path: full load
    with pytest.raises(SystemExit):
        cli._control_socket(str(conf))
    with pytest.raises(SystemExit):
        cli._control_socket(str(tmp_path / "missing.yaml"))
