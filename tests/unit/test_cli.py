"""The command line generated from the command table: every conntrackd flag form accepted with
its meaning, bad values a one-line usage error with status 1 (never a traceback), results and
exit statuses as scripts read them, and start-up failures as one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrackd_py import cli, commands
from conntrackd_py.commands import NODE_MAX


def resolve(*argv: str) -> tuple[str, Any] | None:
    got = cli.resolve(cli._parser().parse_args(list(argv)))
    return None if got is None else (got.cmd.name, got.req)


def shown(*argv: str) -> tuple[str | None, bool, str | None]:
    """(conntrackd's -s word, expect, warning) of a command line."""
    got = cli.resolve(cli._parser().parse_args(list(argv)))
    assert got is not None
    return got.stats_word, got.expect, got.warning


@pytest.mark.parametrize(("argv", "name", "expected"), [
    (["-c"], "commit", commands.Commit()),
    (["-f"], "flush", commands.Flush("both")),
    (["-f", "internal"], "flush", commands.Flush("internal")),
    (["-f", "external"], "flush", commands.Flush("external")),
    (["-f", "both"], "flush", commands.Flush("both")),
    (["-F"], "flush_kernel", commands.FlushKernel()),
    (["-R"], "resync_internal", commands.ResyncInternal()),
    (["-B"], "bulk_send", commands.BulkSend()),
    (["-n"], "request_resync", commands.RequestResync(None)),
    (["-n", "3"], "request_resync", commands.RequestResync(3)),
    (["-n3"], "request_resync", commands.RequestResync(3)),
    (["-n", str(NODE_MAX)], "request_resync", commands.RequestResync(NODE_MAX)),
    (["-t"], "purge", commands.Purge(None)),
    (["-k"], "stop", commands.Stop()),
    (["-s"], "stats", commands.Stats(None)),
    (["-s", "all"], "stats", commands.Stats(None)),
    (["-s", "cache"], "stats", commands.Stats("cache")),
    (["-s", "network"], "stats", commands.Stats("network")),
    (["-s", "sync"], "in_sync", commands.InSync()),
    (["-i"], "dump", commands.Dump("internal")),
    (["-e"], "dump", commands.Dump("external")),
    (["-i", "-p", "tcp"], "dump", commands.Dump("internal", proto=6)),
    (["-e", "--proto", "17", "--src-nat"], "dump", commands.Dump("external", 17, "src")),
    (["-e", "--dst-nat"], "dump", commands.Dump("external", nat="dst")),
    (["-i", "--any-nat"], "dump", commands.Dump("internal", nat="any")),
    (["-e", "--node", "2"], "dump", commands.Dump("external", origin=2)),
    (["-e", "-o", "json"], "dump", commands.Dump("external")),
    (["-C", "x.yaml", "-c"], "commit", commands.Commit()),
    (["-E"], "watch", commands.Watch()),
    # conntrackd 1.4.7's forms: [ct|expect] and its words, by any prefix, in its order
    (["-c", "ct"], "commit", commands.Commit()),
    (["-c", "expect"], "commit", commands.Commit()),
    (["-F", "c"], "flush_kernel", commands.FlushKernel()),
    (["-R", "exp"], "resync_internal", commands.ResyncInternal()),
    (["-i", "ct"], "dump", commands.Dump("internal")),
    (["-e", "e"], "dump", commands.Dump("external")),
    (["-i", "ct", "-x"], "dump", commands.Dump("internal")),
    (["-f", "i"], "flush", commands.Flush("internal")),
    (["-f", "ext"], "flush", commands.Flush("external")),
    (["-s", "n"], "stats", commands.Stats("network")),
    (["-s", "net"], "stats", commands.Stats("network")),
    (["-s", "c"], "stats", commands.Stats("cache")),
    (["-s", "ct"], "stats", commands.Stats(None)),
    (["-s", "r"], "stats", commands.Stats("runtime")),
    (["-s", "l"], "stats", commands.Stats("link")),
    (["-s", "m"], "stats", commands.Stats("link")),
    (["-s", "rs"], "stats", commands.Stats(None)),
    (["-s", "q"], "stats", commands.Stats("queue")),
    (["-s", "p"], "stats", commands.Stats(None)),
    (["-s", "exp"], "stats", commands.Stats(None)),
    (["-s", "general"], "stats", commands.Stats("general")),
])
def test_every_conntrackd_flag_form_selects_its_command(argv: list[str], name: str,
                                                        expected: Any) -> None:
    assert resolve(*argv) == (name, expected)


@pytest.mark.parametrize(("argv", "expected"), [
    (["-s"], ("ct", False, None)),
    (["-s", "ct"], ("ct", False, None)),
    (["-s", "n"], ("network", False, None)),
    (["-s", "c"], ("cache", False, None)),
    (["-s", "r"], ("runtime", False, None)),
    (["-s", "rs"], ("rsqueue", False, None)),
    (["-s", ""], ("network", False, None)),  # strncmp over 0 characters: the first word
    (["-s", "p"], ("process", False, None)),
    (["-s", "q"], ("queue", False, None)),
    (["-s", "e"], ("expect", True, None)),
    (["-s", "multicast"], ("link", False,
                           "warning: use `link' instead of `multicast' as parameter.")),
    (["-s", "all"], (None, False, None)),  # ours: the tree
    (["-s", "control"], (None, False, None)),
    (["-c"], (None, False, None)),
    (["-c", "e"], (None, True, None)),
    (["-i", "expect"], (None, True, None)),
    (["-F", "ct"], (None, False, None)),
])
def test_conntrackd_words_select_its_layout_and_table(
        argv: list[str], expected: tuple[str | None, bool, str | None]) -> None:
    assert shown(*argv) == expected


def test_no_action_flag_runs_the_daemon() -> None:
    assert resolve() is None
    assert resolve("-C", "x.yaml", "-d") is None
    assert resolve("--check", "-C", "x.yaml") is None


@pytest.mark.parametrize(("argv", "message"), [
    (["-n", "99999999999999999999999"], "-n: a node id must be an integer 1..4294967295"),
    (["-n", "notanode"], "-n: a node id must be an integer"),
    (["-n", "0"], "-n: a node id"),
    (["-s", "bogus"], "-s: unknown parameter 'bogus': one of network, cache"),
    (["-s", "cx"], "-s: unknown parameter 'cx'"),
    (["-f", "bogus"], "-f: must be one of internal, external, both"),
    (["-c", "foo"], "-c: unknown parameter 'foo': ct or expect"),
    (["-i", "cte"], "-i: unknown parameter 'cte'"),
    (["-F", ""], "-F: unknown parameter ''"),
    (["-x"], "-x needs -i or -e"),
    (["-c", "-x"], "-x needs -i or -e, not -c"),
    (["-d", "-c"], "-d and -c together"),
    (["-i", "-p", "nope"], "--proto: a protocol is a name"),
    (["-e", "--node", "x"], "--node: a node id"),
    (["-i", "--node", "3"], "--node: applies to the external cache only"),
    (["-s", "-p", "tcp"], "--proto does not apply to -s"),
    (["-p", "tcp"], "--proto needs -e or -i"),
    (["-e", "--src-nat", "--dst-nat"], "--dst-nat conflicts with --src-nat"),
    (["-c", "-k"], "not allowed with"),
    (["-z"], "unrecognized arguments: -z"),
])
def test_bad_command_lines_are_one_line_usage_errors_with_status_1(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 1  # conntrackd's status for "unknown parameter"
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
    assert err.startswith("conntrackd-py: ")


def test_the_installed_command_prints_no_traceback() -> None:
    for argv in (["-n", "99999999999999999999999"], ["-n", "notanode"], ["-s", "{}"]):
        p = subprocess.run([sys.executable, "-m", "conntrackd_py.cli", *argv],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1
        assert "Traceback" not in p.stderr
        assert p.stderr.count("\n") == 1
        assert p.stdout == ""


@pytest.fixture
def daemon_socket(tmp_path: Path) -> Iterator[tuple[str, Path, list[dict[str, Any]]]]:
    """A canned daemon: answers each request from `answers` (cmd -> reply line), records it."""
    path = str(tmp_path / "ctl.sock")
    conf = tmp_path / "c.yaml"
    conf.write_text(f"node: {{id: 1}}\ngeneral: {{control_socket: {path}}}\n")
    seen: list[dict[str, Any]] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    srv.settimeout(30)

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                request = json.loads(f.readline())
                seen.append(request)
                conn.sendall(ANSWERS[request["cmd"]])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield path, conf, seen
    srv.close()
    t.join(5)


def _raw_rows() -> list[list[Any]]:
    from conntrackd_py.flow import Flow, Tuple, pack_flow
    a, b, c = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), bytes([10, 9, 9, 9])
    tcp = Flow(Tuple(a, b, 6, 40000, 80), Tuple(c, a, 6, 80, 40000), status=0x2 | 0x4 | 0x20,
               timeout=300, state=3, mark=7)
    udp = Flow(Tuple(a, b, 17, 5000, 53), Tuple(b, a, 17, 53, 5000), status=0, timeout=30)
    return [[2, *(x.hex() for x in pack_flow(tcp)), 12], [2, *(x.hex() for x in pack_flow(udp))],
            [2, "00", "zz"]]


ANSWERS = {
    "in_sync": b'{"ok": true, "result": {"in_sync": false}}\n',
    "stats": b'{"ok": true, "result": {"cache": {"internal": 3}}}\n',
    "dump": json.dumps({"ok": True, "result": _raw_rows()}).encode() + b"\n",
    "commit": b'{"ok": true, "result": {"created": 2, "updated": 0, "failed": 1, '
              b'"errors": {"EEXIST": 1}, "seconds": 0.25}}\n',
    "bulk_send": b'{"ok": true, "result": "bulk send started"}\n',
    "request_resync": b'{"ok": false, "error": "replication is off (general.mode: stats)"}\n',
    "flush": b'{"ok": true, "res',  # a daemon that dies mid-reply
}


def test_results_and_exit_statuses_as_scripts_read_them(
        daemon_socket: tuple[str, Path, list[dict[str, Any]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    _, conf, seen = daemon_socket
    c = str(conf)
    assert cli.main(["-C", c, "-s", "sync"]) == 1  # keepalived's gate: not in sync
    assert capsys.readouterr().out == "in_sync: False\n"
    assert cli.main(["-C", c, "-o", "json", "-s", "cache"]) == 0
    assert json.loads(capsys.readouterr().out) == {"cache": {"internal": 3}}
    assert cli.main(["-C", c, "-e", "-p", "tcp", "--node", "2"]) == 0
    io = capsys.readouterr()
    # conntrackd's external line (no reply tuple), from the structured record
    assert io.out == ("tcp      6 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 "
                      "[ASSURED] mark=7 [active since 12s]\n")
    assert io.err == "conntrackd-py: 1 entries do not describe a flow (a peer's bytes); " \
                     "not shown\n"
    assert cli.main(["-C", c, "-e", "-p", "tcp", "--verbose"]) == 0  # ours: the origin
    assert capsys.readouterr().out.endswith(
        " src=10.9.9.9 dst=10.0.0.1 sport=80 dport=40000 [ASSURED] mark=7 [node=2] "
        "[active since 12s]\n")
    assert cli.main(["-C", c, "-e", "-o", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["proto"], r["origin_node"], r["timeout"], r["reply"]["src"]) for r in records] \
        == [("tcp", 2, 300, "10.9.9.9"), ("udp", 2, 30, "10.0.0.2")]
    assert records[1]["unreplied"] is True
    assert cli.main(["-C", c, "-c"]) == 1  # a flow failed: said on stderr, nothing on stdout
    io = capsys.readouterr()
    assert io.out == ""
    assert io.err.startswith("conntrackd-py: commit: created 2, updated 0, failed 1")
    assert cli.main(["-C", c, "-B"]) == 0  # silent on success, as conntrackd
    assert capsys.readouterr().out == ""
    assert cli.main(["-C", c, "-B", "--verbose"]) == 0
    assert capsys.readouterr().out == "bulk send started\n"
    assert cli.main(["-C", c, "-n", "4"]) == 1
    assert capsys.readouterr().err == ("conntrackd-py: replication is off "
                                       "(general.mode: stats)\n")
    assert cli.main(["-C", c, "-f"]) == 1
    assert "in the middle of a reply" in capsys.readouterr().err
    assert cli.main(["-C", c, "-s", "c"]) == 0  # conntrackd's `-s cache` layout
    assert capsys.readouterr().out.startswith("cache:internal\tactive objects:\t\t           3\n")
    n = len(seen)
    assert cli.main(["-C", c, "-i", "expect"]) == 0  # no expectations: nothing to show
    assert capsys.readouterr().out == ""
    assert seen[n]["cmd"] == "in_sync"  # but the daemon must be there
    # what went over the socket: typed values, from the same parsers the daemon uses
    assert seen[2] == {"cmd": "dump", "args": {"cache": "external", "proto": 6, "origin": 2,
                                               "raw": True}}
    assert {"cmd": "request_resync", "args": {"node": 4}} in seen


def test_no_daemon_is_one_line_and_status_1(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(f"node: {{id: 1}}\ngeneral: {{control_socket: {tmp_path}/none.sock}}\n")
    assert cli.main(["-C", str(conf), "-s"]) == 1
    assert capsys.readouterr().err.startswith("conntrackd-py: cannot reach the daemon at ")


def test_check_says_when_authentication_is_off(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "c.yaml"
    channels = "channels: [{udp: {bind: 10.0.0.1, peers: [10.0.0.2]}}]"
    conf.write_text(f"node: {{id: 1}}\nsync: {{auth: {{required: false}}, {channels}}}\n")
    assert cli.main(["--check", "-C", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out
    assert "authentication is off" in out
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    conf.write_text(f"node: {{id: 1}}\nsync: {{auth: {{key_files: [{key}]}}, {channels}}}\n")
    assert cli.main(["--check", "-C", str(conf)]) == 0
    assert "authentication is off" not in capsys.readouterr().out


def test_start_up_failures_the_operator_can_fix_are_one_line() -> None:
    from conntrackd_py.config import ConfigError
    from conntrackd_py.daemon import LockError
    from conntrackd_py.kernel.nl import KernelError
    eaddr = OSError(98, "Address already in use")
    assert cli.describe_start_error(eaddr) == "cannot start: Address already in use"
    # trio wraps what a nursery's task raised
    group = ExceptionGroup("", [ExceptionGroup("", [OSError(19, "No such device", "eth9")])])
    assert cli.describe_start_error(group) == "cannot start: No such device (eth9)"
    assert cli.describe_start_error(OSError(24, "Too many open files")) == (
        "cannot start: Too many open files")
    assert cli.describe_start_error(LockError("another daemon holds /run/x.lock")) == (
        "another daemon holds /run/x.lock")
    assert cli.describe_start_error(ConfigError("bad")) is not None
    assert cli.describe_start_error(KernelError(2, "opening ctnetlink")) == (
        "cannot start: opening ctnetlink: No such file or directory (errno 2)")
    assert cli.describe_start_error(PermissionError(1, "Operation not permitted")) == (
        "cannot start: Operation not permitted")
    # a bug keeps its traceback
    assert cli.describe_start_error(KeyError("x")) is None
    assert cli.describe_start_error(ExceptionGroup("", [eaddr, KeyError("x")])) is None


def test_a_control_call_imports_nothing_heavy() -> None:
    code = ("import sys, conntrackd_py.cli, conntrackd_py.ctlclient; "
            "print(' '.join(sorted(sys.modules)))")
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, timeout=60).stdout.split())
    for heavy in ("trio", "yaml", "logging", "dataclasses", "conntrackd_py.daemon",
                  "conntrackd_py.config", "msgpack"):
        assert heavy not in mods, heavy


def yaml_socket(text: str) -> str | None:
    """What YAML says general.control_socket is (the default when absent); None when YAML
    cannot say (not YAML, not a mapping, not a path)."""
    import yaml
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(doc, dict):
        return None
    general = doc.get("general")
    if general is None:
        return cli.DEFAULT_CONTROL_SOCKET
    if not isinstance(general, dict):
        return None
    sock = general.get("control_socket", cli.DEFAULT_CONTROL_SOCKET)
    return sock if isinstance(sock, str) and sock else None


def shipped_configs() -> list[str]:
    from lab import daemons
    repo = Path(__file__).resolve().parents[2]
    texts = [p.read_text() for p in [repo / "config" / "conntrackd-py.yaml",
                                     *sorted((repo / "config" / "examples").glob("*.yaml"))]]
    class Values(dict[str, str]):
        def __missing__(self, key: str) -> str:
            return "1"

    lab_yaml = daemons._DAEMON_YAML.format_map(Values(dir="/tmp/lab/d1", extra="",
                                                      auth="{required: false}"))
    return [*texts, lab_yaml]


def test_the_socket_of_plainly_written_configs_is_read_without_yaml() -> None:
    for text in shipped_configs():
        fast = cli.socket_from_text(text)
        assert fast is not None  # these take the fast path
        assert fast == yaml_socket(text)


#: lines that make a config less plain than the fast path reads; YAML decides
TRICKY_LINES = [
    "general:", "  control_socket: /a/b", "  mode: sync", '  x: "abc', '  def"', "  a: [1,",
    "  ]", "  note: |", "    control_socket: /c", "---", "general: {control_socket: /d}",
    "control_socket: /e", "  # control_socket: /f", "node: {id: 1}",
    "  control_socket: /g  # a comment", "\tcontrol_socket: /h", "general: &g", "other:",
    "    y: 1", "  control_socket: null", "  control_socket: 'x/y'", "general:  # hi",
    "  control_socket: /i,", "  b: {c: 1,", "  }", "  control_socket: ~/x", "...",
    "x: 'it''s", "  control_socket: /j", "  <<: *g", "  control_socket: /k: v",
    "%YAML 1.1", "  control_socket:", "    /l", "  control_socket: /m #x", "", "  - item",
    "- general:", "  ? x", " control_socket: /n", "   control_socket: /o", "  mode: >",
    "    folded", "  !!str control_socket: /p", "  control_socket: !!str /q", "  # c",
]


@given(st.lists(st.sampled_from(TRICKY_LINES), max_size=8))
def test_the_fast_reading_agrees_with_yaml_or_leaves_it_to_yaml(lines: list[str]) -> None:
    import yaml
    text = "\n".join(lines) + "\n"
    fast = cli.socket_from_text(text)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # no daemon runs with this text: either answer will do
    truth = yaml_socket(text)
    if truth is not None:
        assert fast in (None, truth), text
    elif any("control_socket" in x and not x.lstrip().startswith("#") for x in lines):
        # its control_socket is not a path, or general not a mapping: the full load explains
        assert fast is None, text
    else:
        # no line names the socket in a text that is no valid config (not a mapping, general
        # not a mapping): the daemon never started with it; the default is as good as an error
        assert fast in (None, cli.DEFAULT_CONTROL_SOCKET), text
    del doc


def test_a_control_call_reads_the_socket_with_or_without_yaml(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("node: {id: 3}\ngeneral:\n  mode: sync\n  control_socket: /tmp/y.sock\n")
    assert cli._control_socket(str(conf)) == "/tmp/y.sock"
    conf.write_text('node: {id: 3}\ngeneral:\n  note: "a\n  control_socket: /tmp/no"\n')
    assert cli._control_socket(str(conf)) == cli.DEFAULT_CONTROL_SOCKET  # YAML's reading


DEBIAN_EXAMPLES = sorted(Path("/usr/share/doc/conntrackd/examples").glob("**/conntrackd.conf"))


@pytest.mark.skipif(not DEBIAN_EXAMPLES, reason="conntrackd's examples are not installed")
@pytest.mark.parametrize("path", DEBIAN_EXAMPLES, ids=lambda p: str(p.parent.name))
def test_a_control_call_reads_a_conntrackd_conf_socket_as_the_full_load_does(
        path: Path) -> None:
    from conntrackd_py.config import is_conntrackd_conf, load
    text = path.read_text()
    assert load(path).general.control_socket == "/var/run/conntrackd.ctl"
    assert cli.looks_like_conntrackd_conf(text) is is_conntrackd_conf(text) is True
    assert cli.conntrackd_socket(text) == "/var/run/conntrackd.ctl"  # its UNIX { Path }
    assert cli._control_socket(str(path)) == "/var/run/conntrackd.ctl"


def test_conntrackd_conf_socket_reading_is_careful() -> None:
    assert not cli.looks_like_conntrackd_conf("general:\n  control_socket: /x\n")
    assert not cli.looks_like_conntrackd_conf("# only a comment\n")
    assert cli.looks_like_conntrackd_conf("# c\n\nGeneral {\n}\n")
    assert cli.looks_like_conntrackd_conf("Sync\n{\n}\n")
    text = "General {\n  UNIX {\n    Path /run/a.ctl\n  }\n}\n"
    assert cli.conntrackd_socket(text) == "/run/a.ctl"
    assert cli.conntrackd_socket(text.replace("Path /run/a.ctl", "# Path /x\n Path /b")) == "/b"
    assert cli.conntrackd_socket("General {\n}\n") is None  # the full load decides
    assert cli.conntrackd_socket(text + text) is None  # two: the full load decides


@pytest.mark.skipif(not DEBIAN_EXAMPLES, reason="conntrackd's examples are not installed")
def test_check_of_a_conntrackd_conf_names_what_did_not_map(
        capsys: pytest.CaptureFixture[str]) -> None:
    path = str(next(p for p in DEBIAN_EXAMPLES if p.parent.name == "ftfw"))
    assert cli.main(["--check", "-C", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("is valid")
    assert out[1].startswith(f"conntrackd-py: warning: {path} read as a conntrackd.conf")
    assert "HashSize" in out[1]
    assert not any(x.startswith("conntrackd-py: note:") for x in out)
    assert cli.main(["--check", "--verbose", "-C", path]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if ": note: " in x]
    assert any(f"{path}:256: HashSize" in x for x in notes)
