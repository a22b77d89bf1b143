"""The `conntrackd-py` command: conntrackd 1.4.7's command line, plus a few subcommands.

Running the daemon:   conntrackd-py [-C FILE] [-d]          (no action flag = run the daemon)
Controlling it:       conntrackd-py [-C FILE] -c [ct|expect] | -f [internal|external|both] |
                      -F [ct|expect] | -R [ct|expect] | -B | -n [NODE] | -t | -k |
                      -s [KIND] | -i [ct|expect] [-x] | -e [ct|expect] [-x] | -E
                      [-o text|json|yaml] [--verbose]
Checking a config:    conntrackd-py --check -C FILE
Subcommands:          conntrackd-py demo | import-conf conntrackd.conf

The control flags and their options are generated from the command table (commands.py); their
values are parsed by the same functions that check a request on the daemon's socket, so a
value the daemon would refuse is a usage error here, before any connection. conntrackd's words
are matched as it matches them: any prefix, in its order (`-s n` is network, `-f e` external).

Outputs are conntrackd's (ctformat.py): control commands are silent on success (`--verbose`
prints their summary), `-i`/`-e` print its lines or, with `-x`, its XML, `-s` its layouts.

Exit codes follow conntrackd: 0 on success, 1 on failure, and 1 with one line on stderr for a
usage error; `-s sync` exits 1 when the node is not in sync with its peers (keepalived's
track_script relies on this). One deliberate difference: conntrackd exits 0 after `Unknown
option` (`conntrackd -c foo`); ours exits 1, so that a script never takes a mistyped command
for a done one.

A control call is on keepalived's failover path: this module imports nothing heavy at the top
(no trio, no yaml, nothing of the daemon).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from typing import Any, NoReturn

from . import __version__
from .commands import (
    COMMANDS,
    STATS_KINDS,
    BadArgument,
    Cli,
    Command,
    ControlError,
    Option,
    Stats,
    by_name,
    parse_request,
)

#: `general.control_socket` when the config does not set it (config.py's default, tested)
DEFAULT_CONTROL_SOCKET = "/run/conntrackd-py.sock"

CONNTRACKD_VERSION = "1.4.7"

HELP_DIFFERENCES = """differences from conntrackd 1.4.7, on purpose:
  -c        exits 1 (and says so on stderr) when some flows could not be committed.
  -i, -e    [active since Ns] is not shown (the daemon does not report the time);
            -x carries no <id> (kernel ids are not replicated). -e shows no reply
            tuple, as conntrackd's (whose external cache has none); ours has it:
            --verbose shows it and the origin node [node=N] (-o json: reply,
            origin_node).
  -s        conntrackd's layouts over our counters; counts conntrackd keeps and we
            do not (cache failures, rsqueue objects, allocated queue nodes) are 0.
  -E        conntrack -E's lines; a [DESTROY] line carries the original tuple only.
  expect    expectations are not replicated: `-i expect` etc. print nothing (with
            -x no XML either).
  errors    an unknown option exits 1 (conntrackd: 0).
  -o        json: structured records; yaml: our own statistics tree."""


class UsageError(Exception):
    """A command line the daemon would refuse: one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line and status 1, as conntrackd's "unknown parameter" (argparse: usage, 2)
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(1)


#: each conntrackd flag with the commands it selects, in table order (-s: in_sync and stats)
_FLAGS: dict[str, list[tuple[Command, Cli]]] = {}
for _cmd in COMMANDS:
    for _cli in _cmd.cli:
        _FLAGS.setdefault(_cli.flag, []).append((_cmd, _cli))
#: every option once (-i and -e share theirs)
_OPTIONS: dict[tuple[str, ...], Option] = {o.flags: o for c in COMMANDS for o in c.options}
_BARE = "\0bare"  # a flag given without its optional value (no command line holds a NUL)

#: conntrackd's `-s` words, in the order it tries them (a prefix selects the first it starts)
STATS_WORDS = ("network", "cache", "runtime", "multicast", "link", "rsqueue", "process",
               "queue", "ct", "expect")
#: our own `-s` words (exact): shown as our tree
OUR_STATS = ("all", "general", "accounting", "control")


def _prefix(value: str, words: tuple[str, ...]) -> str | None:
    """The first of `words` that `value` is a prefix of (conntrackd's strncmp rule)."""
    return next((w for w in words if w.startswith(value)), None)


def _dest(flag: str) -> str:
    return "cmd_" + flag.lstrip("-")


def _odest(o: Option) -> str:
    return "opt_" + o.flags[-1].lstrip("-").replace("-", "_")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="conntrackd-py",
        description="conntrack state synchronisation daemon, with conntrackd "
                    f"{CONNTRACKD_VERSION}'s command line",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP_DIFFERENCES + "\n\nSubcommands: 'demo' (local failover demo, root), "
               "'import-conf FILE' (convert a conntrackd.conf)")
    p.add_argument("-C", "--config", metavar="FILE",
                   help="config: YAML, or a conntrackd.conf (default: embedded)")
    p.add_argument("-d", "--daemon", action="store_true",
                   help="run in the background; returns once the control socket answers, "
                        "or exits 1 with the reason the daemon could not start")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text",
                   help="text: conntrackd's outputs (default); json: structured records; "
                        "yaml: our statistics tree")
    p.add_argument("-x", dest="xml", action="store_true",
                   help="with -i or -e: conntrackd's XML")
    p.add_argument("--verbose", action="store_true",
                   help="print a control command's summary (conntrackd's are silent; the "
                        "daemon logs them)")
    p.add_argument("-v", "--version", action="version",
                   version=f"conntrackd-py v{__version__} (conntrackd {CONNTRACKD_VERSION}'s "
                           "command line)")
    g = p.add_mutually_exclusive_group()
    for flag, rows in _FLAGS.items():
        valued = [c for _, c in rows if c.value is not None]
        tabled = [c for _, c in rows if c.table]
        helps = "; ".join(c.help for _, c in rows)
        if valued or tabled:
            metavar = valued[0].metavar if valued else "ct|expect"
            g.add_argument(flag, dest=_dest(flag), nargs="?", const=_BARE,
                           default=argparse.SUPPRESS, metavar=metavar, help=helps)
        else:
            g.add_argument(flag, dest=_dest(flag), action="store_true",
                           default=argparse.SUPPRESS, help=helps)
    for o in _OPTIONS.values():
        if o.const is not None:
            p.add_argument(*o.flags, dest=_odest(o), action="store_const", const=o.const,
                           default=argparse.SUPPRESS, help=o.help)
        else:
            p.add_argument(*o.flags, dest=_odest(o), metavar=o.metavar,
                           default=argparse.SUPPRESS, help=o.help)
    return p


class Action:
    """What a command line asks of the daemon: the command, its parsed request, and how the
    answer is shown. (A plain class: a NamedTuple's string annotations cost ~1 ms of every
    control call's start.)"""

    __slots__ = ("cmd", "expect", "req", "stats_word", "warning")

    def __init__(self, cmd: Command, req: Any, expect: bool = False,
                 stats_word: str | None = None, warning: str | None = None) -> None:
        self.cmd = cmd
        self.req = req
        #: `[ct|expect]` said expect: nothing is asked (no expectations are replicated)
        self.expect = expect
        #: `-s`: conntrackd's word (its layout), or None (ours: a tree)
        self.stats_word = stats_word
        #: a warning for stderr (conntrackd's, for `-s multicast`)
        self.warning = warning


def _stats_word(value: str) -> tuple[str | None, str | None, str | None]:
    """`-s VALUE` -> (conntrackd's word or None, our stats kind or None, warning)."""
    if value == _BARE:
        return "ct", None, None
    if value in OUR_STATS:
        return None, None if value == "all" else value, None
    word = _prefix(value, STATS_WORDS)
    if word is None:
        raise UsageError(f"-s: unknown parameter {value!r}: one of "
                         f"{', '.join(w for w in STATS_WORDS if w != 'multicast')} (or a "
                         f"prefix), or ours: {', '.join(OUR_STATS)}, sync")
    warning = None
    if word == "multicast":
        word, warning = "link", "warning: use `link' instead of `multicast' as parameter."
    return word, word if word in STATS_KINDS else None, warning


def resolve(ns: argparse.Namespace) -> Action | None:
    """The command and its parsed request that the command line asks for, or None (run the
    daemon, or --check). Raises UsageError with the flag's name and the reason."""
    given = [o for o in _OPTIONS.values() if hasattr(ns, _odest(o))]
    flag = next((f for f in _FLAGS if hasattr(ns, _dest(f))), None)
    if flag is None:
        if given:
            users = sorted({c.flag for cmd in COMMANDS if given[0] in cmd.options
                            for c in cmd.cli})
            raise UsageError(f"{given[0].flags[-1]} needs {' or '.join(users)}")
        if getattr(ns, "xml", False):
            raise UsageError("-x needs -i or -e")
        return None
    if getattr(ns, "daemon", False):
        raise UsageError(f"-d and {flag} together: run the daemon, or control it")
    value = getattr(ns, _dest(flag))
    rows = _FLAGS[flag]
    if flag == "-s" and value == "sync":
        return Action(*next((cmd, parse_request(cmd, {})) for cmd, c in rows
                            if c.when == "sync"))
    cmd, cli = next((cmd, c) for cmd, c in rows if c.when is None)
    if getattr(ns, "xml", False) and flag not in ("-i", "-e"):
        raise UsageError(f"-x needs -i or -e, not {flag}")
    raw: dict[str, object] = dict(cli.fixed)
    where = {cli.value: flag} if cli.value else {}
    expect = False
    word = warning = None
    if cli.table and value != _BARE and isinstance(value, str):
        table = _prefix(value, ("ct", "expect")) if value else None
        if table is None:
            raise UsageError(f"{flag}: unknown parameter {value!r}: ct or expect")
        expect = table == "expect"
    elif flag == "-s":
        word, kind, warning = _stats_word(str(value))
        expect = word == "expect"
        if kind is not None:
            raw["kind"] = kind
    elif cli.value is not None and value != _BARE:
        if flag == "-f" and isinstance(value, str) and value:
            value = _prefix(value, ("internal", "external", "both")) or value
        raw[cli.value] = value
    for o in given:
        if o not in cmd.options:
            raise UsageError(f"{o.flags[-1]} does not apply to {flag}")
        if o.field in raw and o.field not in cli.fixed:
            raise UsageError(f"{o.flags[-1]} conflicts with {where[o.field]}")
        raw[o.field] = getattr(ns, _odest(o))
        where[o.field] = o.flags[-1]
    try:
        return Action(cmd, parse_request(cmd, raw), expect, word, warning)
    except BadArgument as e:
        raise UsageError(f"{where.get(e.argument, flag)}: {e.reason}") from None


def setup_logging(level: str = "info", fmt: str = "text", target: str = "stderr",
                  file: str | None = None) -> None:
    # here, not at the top: control commands never log, and start faster without it
    # (importing logging is ~13 ms of a control call's ~45)
    import logging
    from logging.handlers import SysLogHandler, WatchedFileHandler
    handler: logging.Handler
    if target == "file" and file:
        handler = WatchedFileHandler(file)
    elif target == "syslog":
        handler = SysLogHandler(address="/dev/log")
    else:
        handler = logging.StreamHandler()
    if fmt == "json":
        class Json(logging.Formatter):
            def format(self, r: logging.LogRecord) -> str:
                return json.dumps({"ts": round(r.created, 3), "level": r.levelname.lower(),
                                   "logger": r.name, "msg": r.getMessage()})
        handler.setFormatter(Json())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _load_config(path: str | None) -> Any:
    from .config import ConfigError, default_config, load
    try:
        return load(path) if path else default_config()
    except ConfigError as e:
        print(f"conntrackd-py: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        print(f"conntrackd-py: cannot read config: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _control_socket(path: str | None) -> str:
    """The socket a control command talks to: `general.control_socket` of the config.

    Read from the file alone, without validating the whole of it (the daemon did that when it
    started): this is keepalived's notify path, and the full validation doubled the start
    of every `-c`/`-f`/`-B` call (0.22 -> 0.11 s). A plainly written file is read without
    YAML (importing it was half of a control call's start); anything else is read with YAML,
    and anything unexpected takes the full load, which reports the config error properly."""
    if path is None:
        return DEFAULT_CONTROL_SOCKET  # the embedded default config does not set it
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
        # a conntrackd.conf (`-C /etc/conntrackd/conntrackd.conf`): its UNIX { Path }
        sock = (conntrackd_socket(text) if looks_like_conntrackd_conf(text)
                else socket_from_text(text))
        if sock is not None:
            return sock
    except (OSError, UnicodeDecodeError):
        pass  # the full load below explains it
    import yaml
    doc: Any = None
    # errors: the full load below explains them
    with contextlib.suppress(OSError, yaml.YAMLError), open(path, "rb") as f:
        doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    general = doc.get("general") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and (general is None or isinstance(general, dict)):
        sock = (general or {}).get("control_socket", DEFAULT_CONTROL_SOCKET)
        if isinstance(sock, str) and sock:
            return sock
    return str(_load_config(path).general.control_socket)


_CONNTRACKD_SECTIONS = ("general", "sync", "stats", "helper")


def looks_like_conntrackd_conf(text: str) -> bool:
    """conntrackd.conf's syntax (config.is_conntrackd_conf decides for the full load): its
    first word that is not in a comment opens one of its sections. Plain string work: this
    runs on every control call (a regex compiled at import cost ~1 ms of each)."""
    for line in text.splitlines():
        s = line.split("#", 1)[0].strip()
        if s:
            return s.split("{", 1)[0].split(None, 1)[0].lower() in _CONNTRACKD_SECTIONS
    return False


def conntrackd_socket(text: str) -> str | None:
    """The `UNIX { Path ... }` of a conntrackd.conf, or None (the full load decides)."""
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines()) + "\n"
    found = re.findall(r"\bunix\s*\{[^{}]*?\bpath\s+([^\s{}\"]+)\s", uncommented,
                       re.IGNORECASE)
    return found[0] if len(found) == 1 else None


#: `  control_socket: /a/path  # comment`: a plain scalar that YAML reads as this very text
_SOCKET_LINE = re.compile(r"( +)control_socket: +([\w.@+-]*/[\w./@+-]*)( +#.*)?")


def socket_from_text(text: str) -> str | None:
    """`general.control_socket` of a config written plainly (block style, the key once, under
    a single top-level `general:`, its value a plain path), or the default when no line names
    it; None when the text is anything less plain (YAML must read it). A unit test holds the
    answer equal to YAML's whenever it is not None."""
    if "\t" in text or "\n---" in text or text.startswith(("---", "%")) or "\n%" in text:
        return None
    lines = text.splitlines()
    named = [i for i, line in enumerate(lines)
             if "control_socket" in line and not line.lstrip().startswith("#")]
    if not named:
        return DEFAULT_CONTROL_SOCKET
    generals = [i for i, line in enumerate(lines) if line.startswith("general")]
    if len(named) != 1 or len(generals) != 1:
        return None
    m = _SOCKET_LINE.fullmatch(lines[named[0]])
    if m is None or not all(map(_closed, lines[:named[0]])):
        return None
    indent = len(m.group(1))
    after = next((x for x in lines[named[0] + 1:] if x.strip()), "")
    if len(after) - len(after.lstrip(" ")) > indent:
        return None  # the value may go on on this line (a multi-line plain scalar)
    for line in reversed(lines[:named[0]]):  # its parent: the nearest line indented less
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        if len(line) - len(stripped) < indent:
            return m.group(2) if re.fullmatch(r"general:( +#.*)? *", line) else None
    return None


def _closed(line: str) -> bool:
    """No quote or flow collection opens on this line and goes on to the next (which could
    put a later `control_socket:` line inside a string or a list); erring towards False."""
    body = line.split(" #", 1)[0].strip()
    if body.startswith("#"):
        return True
    return (body.count('"') % 2 == 0 and body.count("'") % 2 == 0
            and body.count("[") == body.count("]") and body.count("{") == body.count("}"))


def _control(sock: str, act: Action, output: str, xml: bool, verbose: bool) -> int:
    from .commands import wire_args
    from .ctlclient import ControlClient
    cmd, req = act.cmd, act.req
    if act.warning:
        print(f"conntrackd-py: {act.warning}", file=sys.stderr)
    if cmd.name == "dump":
        req = req._replace(raw=True)  # records: formatted here, in the layout asked for
    elif act.stats_word is not None and output == "text":
        req = Stats(_layout_kind(act.stats_word))
    if act.expect:  # no expectations: ask the daemon only whether it is there
        cmd, req = by_name("in_sync"), by_name("in_sync").request()
    try:
        client = ControlClient(sock)
    except OSError as e:
        print(f"conntrackd-py: cannot reach the daemon at {sock}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    try:
        with client:
            if cmd.stream is not None:
                from .ctformat import watch_text
                for item in client.stream(cmd.name, **wire_args(req)):
                    print(watch_text(item), flush=True)
                return 0
            res = client.call(cmd.name, **wire_args(req))
            if act.expect:
                if verbose:
                    print("no expectations: conntrackd-py replicates conntrack entries only")
                return 0
            return _show_result(act, req, res, output, xml, verbose)
    except ControlError as e:
        print(f"conntrackd-py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # ^C on -E (or a long -c): no traceback
        return 130
    except BrokenPipeError:  # stdout closed (`| head`): the answer was not wanted
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return 0


def _layout_kind(word: str) -> str | None:
    from .ctformat import STATS_LAYOUTS
    return STATS_LAYOUTS[word][0]


def _print(obj: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(obj, indent=2, default=str))
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict):
                _print_tree(item, 0)
                print()
            else:
                print(item)
    elif isinstance(obj, dict):
        _print_tree(obj, 0)
    else:
        print(obj)


def _print_tree(d: dict[str, Any], depth: int) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            print("  " * depth + f"{k}:")
            _print_tree(v, depth + 1)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            print("  " * depth + f"{k}:")
            for item in v:
                _print_tree(item, depth + 1)
                print()
        else:
            print("  " * depth + f"{k}: {v}")


#: what --verbose prints for a control command's result
_SUMMARY = {
    "flush": lambda r: "flushed: " + ", ".join(f"{k} cache {v} entries" for k, v in r.items())
    if isinstance(r, dict) else str(r),
    "purge": lambda r: f"the kernel conntrack table is flushed in {r['flush_in']} s (-c, or "
    "-f of the internal cache, cancels it)" if isinstance(r, dict) and "flush_in" in r else str(r),
    "resync_internal": lambda r: f"internal cache: {r['internal']} entries"
    if isinstance(r, dict) and "internal" in r else str(r),
}


def _show_result(act: Action, req: Any, res: Any, output: str, xml: bool,
                 verbose: bool) -> int:
    """Print a command's result as conntrackd would; its exit status (`-s sync`: 0 only in
    sync; `-c`: 1 when flows failed)."""
    name = act.cmd.name
    if name == "in_sync":
        _print(res, output)
        return 0 if isinstance(res, dict) and res.get("in_sync") is True else 1
    if name == "dump":
        return _show_dump(req, res, output, xml, verbose)
    if name == "stats":
        if act.stats_word is not None and output == "text" and isinstance(res, dict):
            from .ctformat import stats_text
            sys.stdout.write(stats_text(act.stats_word, res))
        else:
            _print(res, output)
        return 0
    if name == "commit" and isinstance(res, dict):
        try:
            line = (f"commit: created {res['created']}, updated {res['updated']}, failed "
                    f"{res['failed']} in {float(res['seconds']):.3f} s"
                    + (f" {res['errors']}" if res.get("errors") else ""))
            failed = bool(res["failed"])
        except (KeyError, TypeError, ValueError):
            line, failed = str(res), False  # another shape: shown as it is
        if output != "text":
            _print(res, output)
        elif failed:
            print(f"conntrackd-py: {line}", file=sys.stderr)
        elif verbose:
            print(line)
        return 1 if failed else 0
    # control commands: silent as conntrackd's, unless asked
    if output != "text":
        _print(res, output)
    elif verbose:
        summary = _SUMMARY.get(name)
        print(summary(res) if summary is not None else res)
    return 0


def _show_dump(req: Any, res: Any, output: str, xml: bool, verbose: bool) -> int:
    from . import ctformat
    if not isinstance(res, list):
        print("conntrackd-py: the daemon's dump is not a list", file=sys.stderr)
        return 1
    rows = [r for r in res if isinstance(r, list)]
    if output == "text":
        show = ctformat.dump_xml if xml else ctformat.dump_text
        lines, bad = show(rows, req.proto, req.nat, full=verbose)
        for line in lines:
            print(line)
    else:
        records, bad = ctformat.dump_json(rows, req.proto, req.nat)
        _print(records, output)
    if bad or len(rows) != len(res):
        print(f"conntrackd-py: {bad + len(res) - len(rows)} entries do not describe a flow "
              "(a peer's bytes); not shown", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    if argv and argv[0] == "import-conf":
        from .importconf import main as import_main
        return import_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        action = resolve(args)
    except UsageError as e:
        parser.error(str(e))
    if action is not None and not args.check:
        return _control(_control_socket(args.config), action, args.output, args.xml,
                        args.verbose)
    cfg = _load_config(args.config)
    if args.check:
        print(f"conntrackd-py: configuration {args.config or '(embedded default)'} is valid")
        for line in _check_warnings(cfg):
            print(f"conntrackd-py: {line}")
        if args.verbose:  # a conntrackd.conf read natively: each note in full
            for note in getattr(cfg, "import_notes", ()):
                print(f"conntrackd-py: note: {note}")
        return 0
    return run_daemon(cfg, detach=args.daemon)


def _check_warnings(cfg: Any) -> list[str]:
    """What `--check` points out in a valid config."""
    from .config import auth_off
    out = []
    imported = getattr(cfg, "import_warning", None)  # a conntrackd.conf: what did not map
    if imported:
        out.append(f"warning: {imported}")
    if auth_off(cfg):
        out.append("warning: authentication is off (sync.auth.required: false and no "
                   "sync.auth.key_files): anyone who can reach the sync link can put flows "
                   "into this node's kernel table")
    return out


#: start-up failures that are the operator's to fix: one line, exit 1, no traceback
def _operator_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .kernel.nl import KernelError
    kinds: list[type[BaseException]] = [ConfigError, KernelError, OSError]
    with contextlib.suppress(ImportError):
        from .daemon import LockError
        kinds.append(LockError)
    return tuple(kinds)


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def describe_start_error(e: BaseException) -> str | None:
    """One line for a start-up failure the operator can fix (a trio nursery may wrap it in an
    exception group), or None for anything else (a bug: its traceback is wanted)."""
    leaves = _leaves(e)
    kinds = _operator_errors()
    if not leaves or not all(isinstance(x, kinds) for x in leaves):
        return None
    first = leaves[0]
    name = type(first).__name__
    if name == "LockError":
        return str(first)
    if name == "ConfigError":
        return f"bad configuration: {first}"
    if isinstance(first, OSError) and first.strerror:
        where = f" ({first.filename})" if first.filename else ""
        return f"cannot start: {first.strerror}{where}"
    return f"cannot start: {first or name}"


#: how long `-d` waits for the control socket to answer before it gives up (a daemon that
#: loads a million flows from the kernel takes a few seconds; a hung one must not hang the
#: init script)
READY_TIMEOUT = 60.0


def run_daemon(cfg: Any, detach: bool = False) -> int:
    """Run the daemon in the foreground, or with `detach` in the background: then this
    process returns 0 once the daemon's control socket answers, or 1 with the one-line
    reason the daemon gave (over a pipe) when it could not start."""
    import logging

    import trio

    from .daemon import Daemon
    lg = cfg.logging
    setup_logging(lg.level, lg.format, lg.target, lg.file)
    ready_fd = _detach() if detach else None
    daemon = Daemon(cfg)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            if ready_fd is not None:
                _report(ready_fd, "ready")

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        line = describe_start_error(e)
        if ready_fd is not None:
            _report(ready_fd, line or f"internal error: {type(e).__name__}: {e}")
        if line is None:
            raise
        logging.getLogger("conntrackd_py").error("%s", line)
        if ready_fd is None and lg.target != "stderr":  # in the foreground: say it here too
            print(f"conntrackd-py: {line}", file=sys.stderr)
        return 1
    return 0


def _report(fd: int, line: str) -> None:
    """Tell the waiting `-d` parent how the start went (once; it may be gone)."""
    with contextlib.suppress(OSError):
        os.write(fd, line.replace("\n", " ").encode()[:4000] + b"\n")
        os.close(fd)


def _detach() -> int:
    """Fork into the background. The parent waits for the daemon's one line on a pipe
    ("ready", or why it could not start) and exits with it (0 or 1): it never returns.
    The daemon (the grandchild, in its own session, stdio on /dev/null) gets the pipe's
    write end."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        os._exit(_wait_ready(r))
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)
    if fd > 2:
        os.close(fd)
    os.set_inheritable(w, False)
    return w


def _wait_ready(r: int) -> int:
    import select
    import time
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"conntrackd-py: the daemon did not answer within {READY_TIMEOUT:.0f} s "
                  "(it goes on starting; see its log)", file=sys.stderr)
            return 1
        if not select.select([r], [], [], left)[0]:
            continue
        chunk = os.read(r, 4096)
        if not chunk:  # the daemon exited without a word: killed, or a crash
            print("conntrackd-py: the daemon exited while starting (see its log)",
                  file=sys.stderr)
            return 1
        data += chunk
    line = data.split(b"\n", 1)[0].decode(errors="replace")
    if line == "ready":
        return 0
    print(f"conntrackd-py: {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
