"""The command table: each command's arguments parsed and range-checked into its request, or
refused with ControlError and nothing else, whatever JSON a client sends."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrackd_py import commands
from conntrackd_py.commands import (
    COMMANDS,
    NODE_MAX,
    PURGE_MAX,
    STATS_KINDS,
    BadArgument,
    ControlError,
    Ops,
    by_name,
    parse_request,
    wire_args,
)


def parse(name: str, **args: Any) -> Any:
    return parse_request(by_name(name), args)


def test_the_table_is_consistent() -> None:
    assert len({c.name for c in COMMANDS}) == len(COMMANDS)
    for c in COMMANDS:
        # every field of the request has its parser, and nothing else does
        assert set(c.args) == set(c.request._fields), c.name
        assert (c.run is None) != (c.stream is None), c.name
        assert c.cli, c.name
        for o in c.options:
            assert o.field in c.args, (c.name, o.flags)
        for cli in c.cli:
            assert cli.value is None or cli.value in c.args
            assert set(cli.fixed) <= set(c.args)
        assert parse_request(c, {}) == c.request()  # no argument needed
    flags = [cli.flag for c in COMMANDS for cli in c.cli]
    assert sorted(flags) == sorted(["-c", "-f", "-F", "-R", "-B", "-n", "-t", "-k", "-s", "-s",
                                    "-i", "-e", "-E"])


def test_ops_is_the_agreed_interface() -> None:
    names = {n for n, _ in inspect.getmembers(Ops, inspect.isfunction)
             if not n.startswith("_")}
    assert names == {"commit", "flush_caches", "flush_kernel", "resync_internal", "bulk_send",
                     "request_resync", "purge", "stop", "stats", "dump", "in_sync", "watch"}
    for coro in ("commit", "flush_kernel", "resync_internal", "purge"):
        assert inspect.iscoroutinefunction(getattr(Ops, coro)), coro
    assert list(inspect.signature(Ops.dump).parameters) == [
        "self", "which", "proto", "nat", "origin", "raw"]


@pytest.mark.parametrize(("name", "args", "expected"), [
    ("request_resync", {"node": 1}, commands.RequestResync(1)),
    ("request_resync", {"node": NODE_MAX}, commands.RequestResync(NODE_MAX)),
    ("request_resync", {"node": "42"}, commands.RequestResync(42)),
    ("request_resync", {"node": None}, commands.RequestResync(None)),
    ("request_resync", {}, commands.RequestResync(None)),
    ("purge", {"timeout": 0}, commands.Purge(0)),
    ("purge", {"timeout": PURGE_MAX}, commands.Purge(PURGE_MAX)),
    ("purge", {}, commands.Purge(None)),
    ("stats", {"kind": "all"}, commands.Stats(None)),
    ("stats", {"kind": "cache"}, commands.Stats("cache")),
    ("flush", {}, commands.Flush("both")),
    ("flush", {"cache": "external"}, commands.Flush("external")),
    ("dump", {"proto": "tcp"}, commands.Dump(proto=6)),
    ("dump", {"proto": "UDP"}, commands.Dump(proto=17)),
    ("dump", {"proto": "0"}, commands.Dump(proto=0)),
    ("dump", {"proto": 255}, commands.Dump(proto=255)),
    ("dump", {"cache": "external", "origin": 9, "nat": "src", "raw": True},
     commands.Dump("external", None, "src", 9, True)),
])
def test_good_arguments_become_typed_requests(name: str, args: dict[str, Any],
                                              expected: Any) -> None:
    assert parse(name, **args) == expected


@pytest.mark.parametrize(("name", "args", "argument"), [
    ("request_resync", {"node": "x"}, "node"),
    ("request_resync", {"node": 2**70}, "node"),
    ("request_resync", {"node": "99999999999999999999999"}, "node"),
    ("request_resync", {"node": NODE_MAX + 1}, "node"),
    ("request_resync", {"node": 0}, "node"),
    ("request_resync", {"node": -3}, "node"),
    ("request_resync", {"node": "-3"}, "node"),
    ("request_resync", {"node": " 3"}, "node"),
    ("request_resync", {"node": "1_0"}, "node"),
    ("request_resync", {"node": "\u0663"}, "node"),  # a digit int() would read
    ("request_resync", {"node": True}, "node"),
    ("request_resync", {"node": 2.0}, "node"),
    ("request_resync", {"node": [1]}, "node"),
    ("dump", {"origin": "x", "cache": "external"}, "origin"),
    ("dump", {"origin": 3}, "origin"),  # the internal cache has no origins
    ("dump", {"proto": "tcpx"}, "proto"),
    ("dump", {"proto": 256}, "proto"),
    ("dump", {"proto": -1}, "proto"),
    ("dump", {"cache": "both"}, "cache"),
    ("dump", {"nat": "SRC"}, "nat"),
    ("dump", {"raw": 1}, "raw"),
    ("dump", {"raw": "true"}, "raw"),
    ("purge", {"timeout": "x"}, "timeout"),
    ("purge", {"timeout": -5}, "timeout"),
    ("purge", {"timeout": PURGE_MAX + 1}, "timeout"),
    ("purge", {"timeout": 1.5}, "timeout"),
    ("stats", {"kind": {}}, "kind"),
    ("stats", {"kind": "Cache"}, "kind"),
    ("flush", {"cache": ""}, "cache"),
    ("commit", {"force": True}, ""),
    ("stats", {"kind": "cache", "extra": 1}, ""),
])
def test_hostile_arguments_are_refused_naming_the_argument(name: str, args: dict[str, Any],
                                                           argument: str) -> None:
    with pytest.raises(BadArgument) as e:
        parse(name, **args)
    assert e.value.command == name
    assert e.value.argument == argument
    assert len(str(e.value)) < 300  # no echo of a huge value


def test_the_protocol_names_are_flows() -> None:
    from conntrackd_py.flow import PROTO_BY_NAME
    assert dict(commands.PROTO_NAMES) == dict(PROTO_BY_NAME)


def test_the_stats_kinds_are_those_the_daemon_shows() -> None:
    from conntrackd_py import stats
    assert set(stats._KINDS) - {None, "all"} == STATS_KINDS
    for kind in STATS_KINDS:
        assert stats.sections(kind), kind


def test_unknown_commands_are_refused() -> None:
    with pytest.raises(ControlError, match="unknown command"):
        by_name("drop_tables")


def test_wire_arguments_parse_back_to_the_same_request() -> None:
    for c in COMMANDS:
        req = parse_request(c, {})
        assert parse_request(c, wire_args(req)) == req
    req = parse("dump", cache="external", proto="sctp", origin=5, raw=True, nat="dst")
    assert wire_args(req) == {"cache": "external", "proto": 132, "nat": "dst", "origin": 5,
                              "raw": True}
    assert parse("dump", **wire_args(req)) == req


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["tcp", "all", "cache", "internal", "external", "both", "src", "7"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
arg_names = st.sampled_from(sorted({a for c in COMMANDS for a in c.args})) | st.text(max_size=8)


@given(st.sampled_from(COMMANDS), st.dictionaries(arg_names, json_values, max_size=5))
def test_any_json_arguments_give_a_request_or_a_control_error(cmd: commands.Command,
                                                              args: dict[str, Any]) -> None:
    try:
        req = parse_request(cmd, args)
    except ControlError:
        return
    assert isinstance(req, cmd.request)
    # what was accepted is in range
    for name, v in req._asdict().items():
        if name in ("node", "origin") and v is not None:
            assert 1 <= v <= NODE_MAX
        if name == "proto" and v is not None:
            assert 0 <= v <= 255
        if name == "timeout" and v is not None:
            assert 0 <= v <= PURGE_MAX
        if name == "kind":
            assert v is None or v in STATS_KINDS
        if name == "raw":
            assert isinstance(v, bool)
