"""The control socket: good requests answered, bad ones refused with an error, server unharmed."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from conntrackd_py.control import ControlError, ControlServer, decode_request_untrusted
from conntrackd_py.ctlclient import ControlClient


def test_decode_request_untrusted_refuses_everything_but_a_command_object() -> None:
    assert decode_request_untrusted(b'{"cmd": "stats", "args": {"kind": "cache"}}') == (
        "stats", {"kind": "cache"})
    for bad in (b"", b"nope", b"[1]", b'{"cmd": 3}', b'{"cmd": "x", "args": []}', b"\xff\xfe"):
        try:
            decode_request_untrusted(bad)
        except ControlError:
            continue
        raise AssertionError(f"accepted {bad!r}")


async def test_bad_requests_get_errors_and_the_server_keeps_answering(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")

    async def echo(args: dict[str, Any]) -> Any:
        return {"echo": args}

    async def fail(args: dict[str, Any]) -> Any:
        raise ControlError("refused on purpose")

    server = ControlServer(path, {"echo": echo, "fail": fail})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)

        def client_side() -> list[Any]:
            out: list[Any] = []
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(path)
            f = raw.makefile("rb")
            for line in (b"garbage\n", b'{"cmd": "nope"}\n', b'{"cmd": "fail"}\n'):
                raw.sendall(line)
                out.append(json.loads(f.readline()))
            f.close()
            raw.close()
            with ControlClient(path) as c:
                out.append(c.call("echo", x=1))
            return out

        replies = await trio.to_thread.run_sync(client_side)
        nursery.cancel_scope.cancel()
    assert [r["ok"] for r in replies[:3]] == [False, False, False]
    assert "not JSON" in replies[0]["error"]
    assert "unknown command 'nope'" in replies[1]["error"]
    assert replies[2]["error"] == "refused on purpose"
    assert replies[3] == {"echo": {"x": 1}}
    assert server.bad_requests == 3


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
