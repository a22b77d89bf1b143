"""The `conntrackd-py` command: conntrackd's flags, plus a few subcommands.

Running the daemon:   conntrackd-py [-C FILE] [-d]          (no action flag = run the daemon)
Controlling it:       conntrackd-py [-C FILE] -c | -f [internal|external|both] | -F | -R | -B |
                      -n [NODE] | -t | -k | -s [KIND] | -i | -e | -E   [-o json]
Checking a config:    conntrackd-py --check -C FILE
Subcommands:          conntrackd-py demo | import-conf conntrackd.conf

The control flags and their options are generated from the command table (commands.py); their
values are parsed by the same functions that check a request on the daemon's socket, so a
value the daemon would refuse is a usage error here, before any connection.

Exit codes follow conntrackd: 0 on success, 1 on failure, and 1 with one line on stderr for a
usage error (conntrackd's `unknown parameter` errors); `-s sync` exits 1 when the node is not
in sync with its peers (keepalived's track_script relies on this).

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
from .commands import COMMANDS, BadArgument, Cli, Command, ControlError, Option, parse_request

#: `general.control_socket` when the config does not set it (config.py's default, tested)
DEFAULT_CONTROL_SOCKET = "/run/conntrackd-py.sock"


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
_BARE = object()  # a flag given without its optional value


def _dest(flag: str) -> str:
    return "cmd_" + flag.lstrip("-")


def _odest(o: Option) -> str:
    return "opt_" + o.flags[-1].lstrip("-").replace("-", "_")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="conntrackd-py", description="conntrack state synchronisation daemon",
        epilog="Subcommands: 'demo' (local failover demo, root), "
               "'import-conf FILE' (convert a conntrackd.conf)")
    p.add_argument("-C", "--config", metavar="FILE", help="YAML config (default: embedded)")
    p.add_argument("-d", "--daemon", action="store_true", help="detach and run in background")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.add_argument("--version", action="version", version=f"conntrackd-py {__version__}")
    g = p.add_mutually_exclusive_group()
    for flag, rows in _FLAGS.items():
        valued = [c for _, c in rows if c.value is not None]
        helps = "; ".join(c.help for _, c in rows)
        if valued:
            g.add_argument(flag, dest=_dest(flag), nargs="?", const=_BARE,
                           default=argparse.SUPPRESS, metavar=valued[0].metavar, help=helps)
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


def resolve(ns: argparse.Namespace) -> tuple[Command, Any] | None:
    """The command and its parsed request that the command line asks for, or None (run the
    daemon, or --check). Raises UsageError with the flag's name and the reason."""
    given = [o for o in _OPTIONS.values() if hasattr(ns, _odest(o))]
    flag = next((f for f in _FLAGS if hasattr(ns, _dest(f))), None)
    if flag is None:
        if given:
            users = sorted({c.flag for cmd in COMMANDS if given[0] in cmd.options
                            for c in cmd.cli})
            raise UsageError(f"{given[0].flags[-1]} needs {' or '.join(users)}")
        return None
    value = getattr(ns, _dest(flag))
    rows = _FLAGS[flag]
    chosen = next(((cmd, c) for cmd, c in rows if c.when is not None and c.when == value),
                  None) or next((cmd, c) for cmd, c in rows if c.when is None)
    cmd, cli = chosen
    raw: dict[str, object] = dict(cli.fixed)
    where = {cli.value: flag} if cli.value else {}
    if cli.value is not None and value is not _BARE and cli.when is None:
        raw[cli.value] = value
    for o in given:
        if o not in cmd.options:
            raise UsageError(f"{o.flags[-1]} does not apply to {flag}")
        if o.field in raw and o.field not in cli.fixed:
            raise UsageError(f"{o.flags[-1]} conflicts with {where[o.field]}")
        raw[o.field] = getattr(ns, _odest(o))
        where[o.field] = o.flags[-1]
    try:
        return cmd, parse_request(cmd, raw)
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


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    elif isinstance(obj, list):
        for line in obj:
            print(line)
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
            sock = socket_from_text(f.read().decode())
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


def _control(sock: str, cmd: Command, req: Any, as_json: bool) -> int:
    from .commands import wire_args
    from .ctlclient import ControlClient
    try:
        client = ControlClient(sock)
    except OSError as e:
        print(f"conntrackd-py: cannot reach the daemon at {sock}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    try:
        with client:
            if cmd.stream is not None:
                for line in client.stream(cmd.name, **wire_args(req)):
                    print(line, flush=True)
                return 0
            res = client.call(cmd.name, **wire_args(req))
            return _show_result(cmd.name, res, as_json)
    except ControlError as e:
        print(f"conntrackd-py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # ^C on -E (or a long -c): no traceback
        return 130
    except BrokenPipeError:  # stdout closed (`| head`): the answer was not wanted
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return 0


def _show_result(name: str, res: Any, as_json: bool) -> int:
    """Print a command's result; its exit status (`-s sync`: 0 only in sync)."""
    if name == "in_sync":
        _print(res, as_json)
        return 0 if isinstance(res, dict) and res.get("in_sync") is True else 1
    if name == "dump":
        _print(res, as_json)
        if not as_json and isinstance(res, list):
            print(f"conntrackd-py: {len(res)} flow entries have been shown.", file=sys.stderr)
        return 0
    if name == "commit" and not as_json and isinstance(res, dict):
        try:
            errors = res.get("errors")
            print(f"commit: created {res['created']}, updated {res['updated']}, failed "
                  f"{res['failed']} in {float(res['seconds']):.3f} s"
                  + (f" {errors}" if errors else ""))
            return 0 if not res["failed"] else 1
        except (KeyError, TypeError, ValueError):
            pass  # another shape: printed as it is below
    _print(res, as_json)
    return 0


def _daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)


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
        return _control(_control_socket(args.config), *action, args.output == "json")
    cfg = _load_config(args.config)
    if args.check:
        print(f"conntrackd-py: configuration {args.config or '(embedded default)'} is valid")
        for line in _check_warnings(cfg):
            print(f"conntrackd-py: {line}")
        return 0
    return run_daemon(cfg, detach=args.daemon)


def _check_warnings(cfg: Any) -> list[str]:
    """What `--check` points out in a valid config."""
    from .config import auth_off
    if auth_off(cfg):
        return ["warning: authentication is off (sync.auth.required: false and no "
                "sync.auth.key_files): anyone who can reach the sync link can put flows into "
                "this node's kernel table"]
    return []


#: start-up failures that are the operator's to fix: one line, exit 1, no traceback
def _operator_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .kernel.nl import KernelError
    kinds: list[type[BaseException]] = [ConfigError, KernelError, OSError]
    with contextlib.suppress(ImportError):
        from .daemon import LockError
        kinds.append(LockError)
    with contextlib.suppress(ImportError):
        from pyroute2.netlink.exceptions import NetlinkError
        kinds.append(NetlinkError)
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


def run_daemon(cfg: Any, detach: bool = False) -> int:
    import logging

    import trio

    from .daemon import Daemon
    lg = cfg.logging
    setup_logging(lg.level, lg.format, lg.target, lg.file)
    if detach:
        _daemonize()
    try:
        trio.run(Daemon(cfg).run)
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        line = describe_start_error(e)
        if line is None:
            raise
        logging.getLogger("conntrackd_py").error("%s", line)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
