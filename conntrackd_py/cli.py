"""The `conntrackd-py` command: conntrackd's flags, plus a few subcommands.

Running the daemon:   conntrackd-py [-C FILE] [-d]          (no action flag = run the daemon)
Controlling it:       conntrackd-py [-C FILE] -c | -f [internal|external] | -F | -R | -B |
                      -n [NODE] | -t | -k | -s [KIND] | -i | -e | -E   [-o json]
Checking a config:    conntrackd-py --check -C FILE
Subcommands:          conntrackd-py demo | import-conf conntrackd.conf

Exit codes follow conntrackd: 0 on success, 1 on failure; `-s sync` exits 1 when the node is
not in sync with its peers (keepalived's track_script relies on this).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any

from . import __version__

#: `general.control_socket` when the config does not set it (config.py's default, tested)
DEFAULT_CONTROL_SOCKET = "/run/conntrackd-py.sock"

PROTO_NAMES = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "dccp": 33,
               "gre": 47, "udplite": 136}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conntrackd-py", description="conntrack state synchronisation daemon",
        epilog="Subcommands: 'demo' (local failover demo, root), "
               "'import-conf FILE' (convert a conntrackd.conf)")
    p.add_argument("-C", "--config", metavar="FILE", help="YAML config (default: embedded)")
    p.add_argument("-d", "--daemon", action="store_true", help="detach and run in background")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.add_argument("--version", action="version", version=f"conntrackd-py {__version__}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-c", dest="action", action="store_const", const="commit",
                   help="commit the external cache into the kernel table")
    g.add_argument("-f", dest="flush", nargs="?", const="both",
                   choices=["internal", "external", "both"], help="flush cache(s)")
    g.add_argument("-F", dest="action", action="store_const", const="flush_kernel",
                   help="flush the kernel conntrack table")
    g.add_argument("-R", dest="action", action="store_const", const="resync_internal",
                   help="resync the internal cache with the kernel table")
    g.add_argument("-B", dest="action", action="store_const", const="bulk_send",
                   help="send a bulk update (all internal flows) to the peers")
    g.add_argument("-n", dest="resync", nargs="?", const="all", metavar="NODE",
                   help="request a full resync from all peers (or node NODE)")
    g.add_argument("-t", dest="action", action="store_const", const="purge",
                   help="purge the external cache after the purge timeout")
    g.add_argument("-k", dest="action", action="store_const", const="stop",
                   help="stop the daemon")
    g.add_argument("-s", dest="stats", nargs="?", const="all",
                   choices=["all", "network", "cache", "runtime", "link", "queue", "sync",
                            "accounting"], help="statistics ('sync': exit 0 only if in sync)")
    g.add_argument("-i", dest="action", action="store_const", const="dump_internal",
                   help="dump the internal cache")
    g.add_argument("-e", dest="action", action="store_const", const="dump_external",
                   help="dump the external cache")
    g.add_argument("-E", dest="action", action="store_const", const="watch",
                   help="watch cache changes live")
    p.add_argument("-p", "--proto", help="with -i/-e: only this protocol")
    p.add_argument("--src-nat", action="store_const", dest="nat", const="src")
    p.add_argument("--dst-nat", action="store_const", dest="nat", const="dst")
    p.add_argument("--any-nat", action="store_const", dest="nat", const="any")
    p.add_argument("--node", type=int, help="with -e: only flows of this origin node")
    return p


def setup_logging(level: str = "info", fmt: str = "text", target: str = "stderr",
                  file: str | None = None) -> None:
    # here, not at the top: control commands never log, and start faster without it
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

    Read from the YAML alone, without validating the whole file (the daemon did that when it
    started): this is keepalived's notify path, and the full validation doubled the start
    of every `-c`/`-f`/`-B` call (0.22 -> 0.11 s). Anything unexpected takes the full path,
    which reports the config error properly."""
    if path is None:
        return DEFAULT_CONTROL_SOCKET  # the embedded default config does not set it
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


def _control(sock: str, args: argparse.Namespace) -> int:
    from .ctlclient import ControlClient, ControlError
    as_json = args.output == "json"
    try:
        client = ControlClient(sock)
    except OSError as e:
        print(f"conntrackd-py: cannot reach the daemon at {sock}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    try:
        with client:
            if args.action == "watch":
                for line in client.stream("watch"):
                    print(line, flush=True)
                return 0
            if args.stats is not None:
                kind = args.stats
                if kind == "sync":
                    res = client.call("in_sync")
                    _print(res, as_json)
                    return 0 if res["in_sync"] else 1
                res = client.call("stats", kind=None if kind == "all" else kind)
                _print(res, as_json)
                return 0
            if args.flush is not None:
                _print(client.call("flush", cache=args.flush), as_json)
                return 0
            if args.resync is not None:
                node = None if args.resync == "all" else int(args.resync)
                _print(client.call("request_resync", node=node), as_json)
                return 0
            if args.action in ("dump_internal", "dump_external"):
                proto = args.proto
                if proto is not None and not proto.isdigit():
                    if proto.lower() not in PROTO_NAMES:
                        print(f"conntrackd-py: unknown protocol {proto!r}", file=sys.stderr)
                        return 1
                    proto = PROTO_NAMES[proto.lower()]
                lines = client.call("dump", cache=args.action.split("_")[1],
                                    proto=None if proto is None else int(proto), nat=args.nat,
                                    origin=args.node)
                _print(lines, as_json)
                if not as_json:
                    print(f"conntrackd-py: {len(lines)} flow entries have been shown.",
                          file=sys.stderr)
                return 0
            res = client.call(args.action)
            if args.action == "commit" and not as_json:
                print(f"commit: created {res['created']}, updated {res['updated']}, failed "
                      f"{res['failed']} in {res['seconds']:.3f} s"
                      + (f" {res['errors']}" if res["errors"] else ""))
                return 0 if not res["failed"] else 1
            _print(res, as_json)
            return 0
    except ControlError as e:
        print(f"conntrackd-py: {e}", file=sys.stderr)
        return 1


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
    args = _parser().parse_args(argv)
    if not args.check and (args.action or args.flush or args.resync or args.stats):
        return _control(_control_socket(args.config), args)
    cfg = _load_config(args.config)
    if args.check:
        print(f"conntrackd-py: configuration {args.config or '(embedded default)'} is valid")
        return 0
    return run_daemon(cfg, detach=args.daemon)


def run_daemon(cfg: Any, detach: bool = False) -> int:
    import trio

    from .config import ConfigError
    from .daemon import Daemon, LockError
    from .kernel.nl import KernelError
    lg = cfg.logging
    setup_logging(lg.level, lg.format, lg.target, lg.file)
    if detach:
        _daemonize()
    try:
        trio.run(Daemon(cfg).run)
    except LockError as e:
        logging.getLogger("conntrackd_py").error("%s", e)
        return 1
    except ConfigError as e:
        logging.getLogger("conntrackd_py").error("bad configuration: %s", e)
        return 1
    except (KernelError, PermissionError) as e:
        logging.getLogger("conntrackd_py").error("cannot start: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
