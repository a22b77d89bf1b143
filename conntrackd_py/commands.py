"""The control commands, in one table: name, conntrackd flag, typed arguments, handler.

The table drives both sides of the control channel: cli.py builds its argparse parser from it,
and control.py dispatches socket requests through it. Every argument, from a command line or
from a JSON request, goes through the same `parse_request`, which either returns a frozen
request (an immutable NamedTuple) whose fields are in range or raises `ControlError`: a bad
argument is an error reply (or a usage error) by construction, and the daemon's `Ops`
methods may trust what they receive.

This module must stay light to import (no trio, no yaml, nothing of the daemon): every
`conntrackd-py -c` of a keepalived failover imports it. That is why its records are
NamedTuples, not dataclasses: importing `dataclasses` and generating fifteen classes cost
~25 ms at each call, NamedTuples ~3. It must not do I/O.
"""

# no `from __future__ import annotations`: NamedTuple would compile each string annotation
# into a ForwardRef at import (~9 ms of a control call's start)
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NamedTuple, Protocol

from .ctlclient import ControlError

__all__ = [
    "COMMANDS", "NODE_MAX", "PROTO_NAMES", "PURGE_MAX", "STATS_KINDS", "BadArgument", "Cli",
    "Command",
    "ControlError", "Ops", "Option", "by_name", "parse_node", "parse_proto", "parse_request",
    "wire_args",
]


class Ops(Protocol):
    """What the control commands ask of the daemon (implemented by `Daemon`).

    Results are JSON-ready values or dataclasses (the server turns those into JSON with
    `dataclasses.asdict`); a refusal raises `ControlError`. Arguments are already parsed and
    range-checked here: implementations may trust them."""

    async def commit(self) -> object: ...

    def flush_caches(self, which: str) -> object: ...  # "internal" | "external" | "both"

    async def flush_kernel(self) -> object: ...

    async def resync_internal(self) -> object: ...

    def bulk_send(self) -> object: ...

    def request_resync(self, node: int | None) -> object: ...

    # None: sync.purge_timeout (the name is the agreed interface, not a trio timeout)
    async def purge(self, timeout: int | None) -> object: ...  # noqa: ASYNC109

    def stop(self) -> object: ...

    def stats(self, kind: str | None) -> object: ...

    def dump(self, which: str, proto: int | None, nat: str | None,
             origin: int | None, raw: bool) -> list[object]: ...

    def in_sync(self) -> bool: ...

    def watch(self) -> AsyncIterator[object]: ...  # text lines, or structured changes


# --- argument parsers: one JSON value (or command-line text) in, a typed value or ControlError

NODE_MAX = 2**32 - 1
PURGE_MAX = 2**31
#: flow.PROTO_BY_NAME, copied: importing flow (msgpack, enums) would slow every control call;
#: a unit test holds the two equal
PROTO_NAMES: Mapping[str, int] = {
    "icmp": 1, "tcp": 6, "udp": 17, "dccp": 33, "gre": 47, "icmpv6": 58, "sctp": 132,
    "udplite": 136}
#: `-s KIND` (None or "all": every section); stats.sections maps each to what it shows, and a
#: unit test holds the two lists equal
STATS_KINDS = frozenset({"runtime", "general", "cache", "network", "sync", "queue", "link",
                         "accounting", "control"})
FLUSH_CACHES = ("internal", "external", "both")
DUMP_CACHES = ("internal", "external")
NAT_KINDS = ("src", "dst", "any")


def _show(v: object) -> str:
    """A short, printable description of an untrusted value, for an error message."""
    if isinstance(v, str):
        return ascii(v[:40]) + ("..." if len(v) > 40 else "")
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "null"
    if isinstance(v, int):
        return str(v) if v.bit_length() < 128 else f"an integer of {v.bit_length()} bits"
    return f"a JSON {type(v).__name__}" if isinstance(v, (list, dict, float)) else "a value"


def _int(v: object, lo: int, hi: int, what: str) -> int:
    # text from a command line ("-n 3") or JSON ({"node": 3}); never bool, float, or a str
    # int() would read differently from a decimal number ("1_0", " 3", "٣", "-0")
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 20:
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
        return v
    raise ControlError(f"{what} must be an integer {lo}..{hi}, not {_show(v)}")


def parse_node(v: object) -> int:
    """A node id, 1..2**32-1 (the wire's field)."""
    return _int(v, 1, NODE_MAX, "a node id")


def parse_proto(v: object) -> int:
    """A protocol, by name (tcp, udp, ...) or number 0..255."""
    if isinstance(v, str) and v.lower() in PROTO_NAMES:
        return PROTO_NAMES[v.lower()]
    try:
        return _int(v, 0, 255, "a protocol")
    except ControlError:
        raise ControlError(f"a protocol is a name ({', '.join(PROTO_NAMES)}) or a number "
                           f"0..255, not {_show(v)}") from None


def parse_purge_timeout(v: object) -> int:
    """Seconds until the flush -t schedules, 0..2**31."""
    return _int(v, 0, PURGE_MAX, "a purge timeout")


def parse_stats_kind(v: object) -> str | None:
    if v == "all":
        return None
    if isinstance(v, str) and v in STATS_KINDS:
        return v
    raise ControlError(f"a stats kind is one of all, {', '.join(sorted(STATS_KINDS))}; "
                       f"not {_show(v)}")


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(v: object) -> str:
        if isinstance(v, str) and v in allowed:
            return v
        raise ControlError(f"must be one of {', '.join(allowed)}, not {_show(v)}")
    return parse


def parse_bool(v: object) -> bool:
    if isinstance(v, bool):
        return v
    raise ControlError(f"must be true or false, not {_show(v)}")


# --- one immutable request per command: the typed, range-checked arguments ------------------

class Commit(NamedTuple):
    pass


class Flush(NamedTuple):
    cache: str = "both"  # internal, external or both


class FlushKernel(NamedTuple):
    pass


class ResyncInternal(NamedTuple):
    pass


class BulkSend(NamedTuple):
    pass


class RequestResync(NamedTuple):
    node: int | None = None  # only from this node (default: every peer)


class Purge(NamedTuple):
    timeout: int | None = None  # seconds (default: sync.purge_timeout)


class Stop(NamedTuple):
    pass


class Stats(NamedTuple):
    kind: str | None = None  # one section (default: all)


class InSync(NamedTuple):
    pass


class Dump(NamedTuple):
    cache: str = "internal"
    proto: int | None = None     # only this protocol
    nat: str | None = None       # only NATed flows: src, dst or any
    origin: int | None = None    # only the flows of this node (external cache)
    raw: bool = False            # [origin, key hex, value hex] per flow


def _check_dump(r: Dump) -> None:
    if r.origin is not None and r.cache != "external":
        raise BadArgument("dump", "origin", "applies to the external cache only")


class Watch(NamedTuple):
    pass


# --- the table --------------------------------------------------------------------------------

class Cli(NamedTuple):
    """How a conntrackd flag selects a command.

    `value`: the request field the flag's optional value goes to (`-n [NODE]`); a bare flag
    leaves the field's default. `table`: the flag takes conntrackd's optional `ct|expect`.
    `when`: this command when the flag's value is exactly this
    (`-s sync` is `in_sync`, any other `-s KIND` is `stats`). `fixed`: request fields the flag
    sets (`-i` is a dump of the internal cache)."""

    flag: str
    help: str
    value: str | None = None
    metavar: str | None = None
    when: str | None = None
    fixed: Mapping[str, object] = {}  # shared, never mutated
    #: conntrackd's `[ct|expect]` argument: which table (ct, or expectations: none replicated)
    table: bool = False


class Option(NamedTuple):
    """A command-line option of some commands: `--proto tcp` sets a request field;
    a flag with `const` sets it to that (`--src-nat`: nat=src)."""

    flags: tuple[str, ...]
    field: str
    help: str
    const: object = None
    metavar: str | None = None


class Command(NamedTuple):
    """One control command: its request name, its request type, the parser of each of the
    request's fields, and what it runs.

    Exactly one of `run` (one reply) and `stream` (many result lines, `watch`) is set.
    `check`, if any, checks a rule between fields of a parsed request (raises BadArgument)."""

    name: str
    request: type[Any]
    cli: tuple[Cli, ...]
    args: Mapping[str, Callable[[object], object]] = {}  # shared, never mutated
    run: Callable[[Ops, Any], Awaitable[object]] | None = None
    stream: Callable[[Ops, Any], AsyncIterator[object]] | None = None
    options: tuple[Option, ...] = ()
    check: Callable[[Any], None] | None = None


async def _commit(ops: Ops, r: Commit) -> object:
    return await ops.commit()


async def _flush(ops: Ops, r: Flush) -> object:
    return ops.flush_caches(r.cache)


async def _flush_kernel(ops: Ops, r: FlushKernel) -> object:
    return await ops.flush_kernel()


async def _resync_internal(ops: Ops, r: ResyncInternal) -> object:
    return await ops.resync_internal()


async def _bulk_send(ops: Ops, r: BulkSend) -> object:
    return ops.bulk_send()


async def _request_resync(ops: Ops, r: RequestResync) -> object:
    return ops.request_resync(r.node)


async def _purge(ops: Ops, r: Purge) -> object:
    return await ops.purge(r.timeout)


async def _stop(ops: Ops, r: Stop) -> object:
    return ops.stop()


async def _stats(ops: Ops, r: Stats) -> object:
    return ops.stats(r.kind)


async def _in_sync(ops: Ops, r: InSync) -> object:
    return {"in_sync": ops.in_sync()}


async def _dump(ops: Ops, r: Dump) -> object:
    return ops.dump(r.cache, r.proto, r.nat, r.origin, r.raw)


def _watch(ops: Ops, r: Watch) -> AsyncIterator[object]:
    return ops.watch()


_DUMP_OPTIONS = (
    Option(("-p", "--proto"), "proto", "only this protocol (name or number)", metavar="PROTO"),
    Option(("--src-nat",), "nat", "only source-NATed flows", const="src"),
    Option(("--dst-nat",), "nat", "only destination-NATed flows", const="dst"),
    Option(("--any-nat",), "nat", "only NATed flows", const="any"),
)

COMMANDS: tuple[Command, ...] = (
    Command("commit", Commit, (Cli("-c", "commit the external cache into the kernel table",
                                   table=True),), run=_commit),
    Command("flush", Flush, (Cli("-f", "flush the internal and/or external cache (default: "
                                       "both)", value="cache", metavar="internal|external"),),
            {"cache": _choice(*FLUSH_CACHES)}, run=_flush),
    Command("flush_kernel", FlushKernel, (Cli("-F", "flush the kernel conntrack table",
                                              table=True),), run=_flush_kernel),
    Command("resync_internal", ResyncInternal,
            (Cli("-R", "resync the internal cache with the kernel table", table=True),),
            run=_resync_internal),
    Command("bulk_send", BulkSend,
            (Cli("-B", "send a bulk update (every internal flow) to the peers"),), run=_bulk_send),
    Command("request_resync", RequestResync,
            (Cli("-n", "request a full resync from every peer (or node NODE)", value="node",
                 metavar="NODE"),), {"node": parse_node}, run=_request_resync),
    Command("purge", Purge,
            (Cli("-t", "on becoming backup: flush the kernel entries this node replicates "
                       "(those its filters accept) and the internal cache "
                       "sync.purge_timeout seconds later, once (as conntrackd 1.4.7's -t); "
                       "-c, or -f of the internal cache (-f, -f internal), cancels it; "
                       "-f external does not"),),
            {"timeout": parse_purge_timeout}, run=_purge),
    Command("stop", Stop, (Cli("-k", "stop the daemon"),), run=_stop),
    Command("stats", Stats,
            (Cli("-s", "statistics in conntrackd's layout: ct (default), network, cache, "
                       "runtime, link, rsqueue, process, queue, expect, or a prefix of one; "
                       "ours (shown as with -o yaml): all, general, accounting, control",
                 value="kind", metavar="KIND"),), {"kind": parse_stats_kind}, run=_stats),
    Command("in_sync", InSync,
            (Cli("-s", "'-s sync': exit 0 only when in sync with every peer", when="sync"),),
            run=_in_sync),
    Command("dump", Dump,
            (Cli("-i", "dump the internal cache", fixed={"cache": "internal"}, table=True),
             Cli("-e", "dump the external cache", fixed={"cache": "external"}, table=True)),
            {"cache": _choice(*DUMP_CACHES), "proto": parse_proto, "nat": _choice(*NAT_KINDS),
             "origin": parse_node, "raw": parse_bool},
            run=_dump, check=_check_dump,
            options=(*_DUMP_OPTIONS,
                     Option(("--node",), "origin", "with -e: only flows of this origin node",
                            metavar="NODE"))),
    Command("watch", Watch, (Cli("-E", "watch cache changes live"),), stream=_watch),
)

_BY_NAME = {c.name: c for c in COMMANDS}


class BadArgument(ControlError):
    """An argument of a known command refused: which one, and why (the CLI names its flag)."""

    def __init__(self, command: str, argument: str, reason: str) -> None:
        super().__init__(f"{command}: {argument}: {reason}" if argument
                         else f"{command}: {reason}")
        self.command = command
        self.argument = argument
        self.reason = reason


def by_name(name: str) -> Command:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ControlError(f"unknown command {_show(name)}; known: "
                           + ", ".join(sorted(_BY_NAME))) from None


def parse_request(cmd: Command, args: Mapping[str, object]) -> Any:
    """The request of `cmd` from untrusted arguments (a JSON object's members, or the command
    line's values): every field parsed and range-checked, unknown names refused. Raises only
    ControlError (BadArgument)."""
    values: dict[str, object] = {}
    for name, v in args.items():
        parse = cmd.args.get(name) if isinstance(name, str) else None
        if parse is None:
            known = ", ".join(cmd.args) or "none"
            raise BadArgument(cmd.name, "", f"unknown argument {_show(name)} "
                              f"(arguments: {known})")
        if v is None:
            continue  # the default, as when absent
        try:
            values[name] = parse(v)
        except ControlError as e:
            raise BadArgument(cmd.name, name, str(e)) from None
    req = cmd.request(**values)
    if cmd.check is not None:
        cmd.check(req)
    return req


def wire_args(req: Any) -> dict[str, object]:
    """The members of a request's JSON arguments (None fields are left out: the default)."""
    return {k: v for k, v in req._asdict().items() if v is not None}

