"""Convert a conntrackd.conf into conntrackd-py YAML: `conntrackd-py import-conf FILE`.

Owns a small parser for conntrackd's configuration syntax (nested `Name [args] { ... }` blocks,
`Key value` lines, `#` comments) and the mapping of its options onto our schema. Whatever has
no equivalent is reported with its conntrackd.conf line, never dropped silently. Text in, text
out: it must not start, bind or touch anything.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import DEFAULT_KEY_FILE, PROTOCOLS, TCP_STATE_ALIASES, ConfigError, MiB, keygen, loads

#: conntrackd.conf spellings (getprotobyname) that differ from ours
_PROTOCOL_ALIASES = {"ipv6-icmp": "icmpv6", "icmp6": "icmpv6", "udp-lite": "udplite"}
_TCP_STATES = {"SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
               "TIME_WAIT", "CLOSE", "SYN_SENT2"}
_NO_EQUIVALENT = {
    "hashsize": "no equivalent: the caches grow as needed",
    "hashlimit": "no equivalent: the caches grow as needed",
    "nice": "no equivalent: use the systemd unit (Nice=)",
    "scheduler": "no equivalent: use the systemd unit (CPUSchedulingPolicy=)",
    "systemd": "no equivalent option; see the conntrackd-py systemd unit",
    "eventiterationlimit": "no equivalent: events are drained in batches",
    "pollsecs": "polling mode is not supported; conntrackd-py always uses events",
}
_DEFAULT_RCVBUF = 64 * MiB
#: conntrackd's files for `LogFile on` (conntrackd.h: DEFAULT_LOGFILE, DEFAULT_STATS_LOGFILE)
DEFAULT_LOGFILE = "/var/log/conntrackd.log"
DEFAULT_STATS_LOGFILE = "/var/log/conntrackd-stats.log"
#: conntrackd has no authentication: the converted config says so where the key would go
AUTH_NOTE = ("sync.auth.required: false: conntrackd has no authentication, so neither does "
             "this config; anyone who can reach the sync link can put flows into the kernel "
             f"table. To turn it on: {keygen()} , copy the file to every node, set "
             f"sync.auth.key_files: [{DEFAULT_KEY_FILE}] and remove required: false")
_AUTH_COMMENT = [
    "# conntrackd has no authentication, so neither does this config: anyone who can reach",
    "# the sync link can put flows into the kernel table. To turn it on, make a key with",
    f"#   {keygen()}",
    f"# copy it to every node, set key_files: [{DEFAULT_KEY_FILE}] and remove required.",
]


class ConfSyntaxError(ConfigError):
    """conntrackd.conf text that cannot be parsed (unbalanced braces and the like)."""


@dataclass
class Stmt:
    """One `Key words...` line, or a `Name args { ... }` block when `body` is not None."""
    words: list[str]
    line: int
    body: list[Stmt] | None = None

    @property
    def key(self) -> str:
        return self.words[0].lower() if self.words else ""

    @property
    def args(self) -> list[str]:
        return self.words[1:]


_TOKEN = re.compile(r'"[^"\n]*"|[{}]|[^\s{}"#]+|#.*|"')


def parse(text: str, filename: str = "<conntrackd.conf>") -> list[Stmt]:
    """conntrackd.conf text -> statements. Newlines end statements; braces nest blocks."""
    tokens: list[tuple[str, int]] = []
    for n, line in enumerate(text.splitlines(), 1):
        for tok in _TOKEN.findall(line):
            if tok.startswith("#"):
                break
            if tok == '"':
                raise ConfSyntaxError("unterminated quoted string", filename=filename, line=n)
            tokens.append((tok.strip('"') if len(tok) > 1 else tok, n))
        tokens.append(("\n", n))
    return _block(tokens, 0, None, filename, 0)[0]


#: conntrackd.conf nests four levels at most (General > Filter > Protocol Accept); the parser
#: recurses once per level, so a hostile file must not choose the depth
MAX_DEPTH = 16


def _block(tokens: list[tuple[str, int]], pos: int, opened: int | None,
           filename: str, depth: int) -> tuple[list[Stmt], int]:
    stmts: list[Stmt] = []
    words: list[str] = []
    first = 0
    while pos < len(tokens):
        tok, n = tokens[pos]
        pos += 1
        if tok == "{":
            if not words and stmts and stmts[-1].body is None:  # `Name` then `{` on a new line
                head = stmts.pop()
                words, first = head.words, head.line
            if not words:
                raise ConfSyntaxError("'{' without a section name", filename=filename, line=n)
            if depth >= MAX_DEPTH:
                raise ConfSyntaxError(f"sections nested deeper than {MAX_DEPTH} levels",
                                      filename=filename, line=n)
            body, pos = _block(tokens, pos, first, filename, depth + 1)
            stmts.append(Stmt(words, first, body))
            words = []
        elif tok in ("}", "\n"):
            if words:
                stmts.append(Stmt(words, first))
                words = []
            if tok == "}":
                if opened is None:
                    raise ConfSyntaxError("'}' without a matching '{'", filename=filename,
                                          line=n)
                return stmts, pos
        else:
            if not words:
                first = n
            words.append(tok)
    if opened is not None:
        raise ConfSyntaxError("section is never closed with '}'", filename=filename,
                              line=opened)
    return stmts, pos


def _int(raw: str) -> int | None:
    """A non-negative decimal integer of ASCII digits, at most 18 of them (str.isdigit takes
    '²', and int() refuses texts of thousands of digits): None for anything else."""
    return int(raw) if len(raw) <= 18 and raw.isascii() and raw.isdigit() else None


def _onoff(value: str) -> bool | None:
    v = value.lower()
    return True if v in ("on", "yes", "true", "1") else False if v in (
        "off", "no", "false", "0") else None


@dataclass
class _Converter:
    filename: str
    notes: list[tuple[int, str]] = field(default_factory=list)
    out: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        k: {} for k in ("node", "general", "logging", "netlink", "filters", "sync", "stats")})
    channels: list[tuple[bool, dict[str, Any]]] = field(default_factory=list)
    rcvbuf: list[tuple[int, Stmt]] = field(default_factory=list)
    #: (line, option name) of what was left out, and of what was mapped only approximately
    unmapped: list[tuple[int, str]] = field(default_factory=list)
    approximated: list[tuple[int, str]] = field(default_factory=list)
    #: how node.id was found: "derived" (from an address), "placeholder", or "" (stats mode)
    node_id_from: str = ""
    #: (id of an output dict, its key) -> the statement that set it, for `origins`
    origin: dict[tuple[int, str], Stmt] = field(default_factory=dict)

    def mark(self, container: dict[str, Any], key: str, st: Stmt) -> None:
        self.origin[(id(container), key)] = st

    def origins(self, data: dict[str, Any]) -> dict[str, tuple[int, str]]:
        """Key paths of the output ("sync.channels[0].multicast.port") -> (line, words) of the
        conntrackd.conf statement that set them."""
        out: dict[str, tuple[int, str]] = {}

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    p = f"{path}.{k}" if path else k
                    st = self.origin.get((id(node), k))
                    if st is not None:
                        out[p] = (st.line, " ".join(st.words))
                    walk(v, p)
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    if isinstance(v, dict):
                        walk(v, f"{path}[{i}]")
        walk(data, "")
        return out

    def note(self, st: Stmt, msg: str, approx: bool = False) -> None:
        self.notes.append((st.line, f"{self.filename}:{st.line}: {' '.join(st.words)}: {msg}"))
        (self.approximated if approx else self.unmapped).append(
            (st.line, st.words[0] if st.words else "?"))

    def value(self, st: Stmt, kind: str = "str") -> Any:
        """The single argument of `st` as `kind` (str, int, bool, ip); None after a note."""
        if len(st.args) != 1:
            self.note(st, "expected exactly one value; not converted")
            return None
        raw = st.args[0]
        v: Any = raw
        if kind == "int":
            v = _int(raw)
        elif kind == "bool":
            v = _onoff(raw)
        elif kind == "ip":
            try:
                v = str(ipaddress.ip_address(raw))
            except ValueError:
                v = None
        if v is None:
            self.note(st, f"{raw!r} is not a valid {kind} value; not converted")
        return v

    def put(self, section: dict[str, Any], key: str, st: Stmt, kind: str = "str",
            transform: Any = None) -> None:
        v = self.value(st, kind)
        if v is not None:
            section[key] = transform(v) if transform else v
            self.mark(section, key, st)

    # --- sections -------------------------------------------------------------------------
    def convert(self, stmts: list[Stmt]) -> dict[str, Any]:
        self.out["general"]["mode"] = "sync" if any(st.key == "sync" for st in stmts) else "stats"
        for st in stmts:
            handler = {"sync": self.sync, "general": self.general, "stats": self.stats}.get(st.key)
            if handler is None or st.body is None:
                self.note(st, "not a conntrackd-py feature; not converted" if st.key == "helper"
                          else "not recognised; not converted")
                continue
            handler(st.body)
        self.finish_netlink()
        if self.out["general"]["mode"] == "sync":
            self.out["sync"]["auth"] = {"required": False}
            self.notes.append(((1 << 30) - 1, AUTH_NOTE))
        if self.channels:  # the `Default` link is the one conntrackd starts on: put it first
            ordered = [c for d, c in self.channels if d] + [c for d, c in self.channels if not d]
            self.out["sync"]["channels"] = ordered
        self.node_id()
        return {k: v for k, v in self.out.items() if v}

    def sync(self, body: list[Stmt]) -> None:
        s = self.out["sync"]
        for st in body:
            if st.key == "mode" and st.body is not None and len(st.args) == 1:
                mode = st.args[0].lower()
                if mode not in ("ftfw", "notrack", "alarm"):
                    self.note(st, "unknown sync mode; not converted")
                    continue
                s["mode"] = mode
                self.mark(s, "mode", st)
                self.mode(st.body, s)
            elif st.key in ("multicast", "udp") and st.body is not None:
                self.channel(st)
            elif st.key == "tcp":
                self.note(st, "TCP channels are not supported; use a UDP or multicast channel")
            elif st.key == "options" and st.body is not None:
                for opt in st.body:
                    if opt.key == "tcpwindowtracking" and opt.body is None:
                        self.put(s, "tcp_window_tracking", opt, "bool")
                    elif opt.key == "expectationsync":
                        self.note(opt, "expectations are not replicated by conntrackd-py")
                    else:
                        self.note(opt, "not recognised; not converted")
            else:
                self.note(st, "not recognised; not converted")

    def mode(self, body: list[Stmt], s: dict[str, Any]) -> None:
        for st in body:
            k = st.key
            if k == "resendqueuesize":
                self.put(s.setdefault("ftfw", {}), "resend_queue", st, "int")
            elif k == "ackwindowsize":
                self.put(s.setdefault("ftfw", {}), "ack_every", st, "int")
            elif k == "disableexternalcache":
                self.put(s, "external_cache", st, "bool", lambda v: not v)
            elif k == "disableinternalcache":
                if _onoff(st.args[0] if st.args else "") is not False:
                    self.note(st, "conntrackd-py always keeps an internal cache; ignored")
            elif k in ("committimeout", "purgetimeout"):
                self.put(s, k.replace("timeout", "_timeout"), st, "int")
            elif k == "startupresync":
                self.put(s, "startup_resync", st, "bool")
            elif k in ("refreshtime", "cachetimeout"):
                key = "refresh" if k == "refreshtime" else "cache_timeout"
                self.put(s.setdefault("alarm", {}), key, st, "int")
            elif k == "resendbuffersize":
                self.note(st, "obsolete in conntrackd too (see ResendQueueSize); ignored")
            else:
                self.note(st, "not recognised; not converted")

    def channel(self, block: Stmt) -> None:
        assert block.body is not None
        is_mc = block.key == "multicast"
        ch: dict[str, Any] = {}
        peers: list[str] = []
        default = [a.lower() for a in block.args] == ["default"]
        if block.args and not default:
            self.note(block, f"unexpected {' '.join(block.args)!r} (only 'Default'); ignored")
        for st in block.body:
            k = st.key
            if k in ("ipv4_address", "ipv6_address"):
                self.put(ch, "group" if is_mc else "bind", st, "ip")
            elif k == ("group" if is_mc else "port"):
                self.put(ch, "port", st, "int")
            elif k in ("ipv4_interface", "ipv6_interface") and is_mc:
                self.put(ch, "source", st, "ip")
            elif k in ("ipv4_destination_address", "ipv6_destination_address") and not is_mc:
                v = self.value(st, "ip")
                if v is not None:
                    peers.append(v)
            elif k == "interface":
                self.put(ch, "interface", st)
            elif k in ("sndsocketbuffer", "rcvsocketbuffer"):
                self.put(ch, k[:3] + "buf", st, "int")
            elif k == "checksum":
                if _onoff(st.args[0] if st.args else "") is False:
                    self.note(st, "datagrams are always checksummed (and optionally "
                              "authenticated: sync.auth); ignored")
            else:
                self.note(st, "not recognised; not converted")
        if peers:
            ch["peers"] = peers
            self.mark(ch, "peers", block)
        kind = "multicast" if is_mc else "udp"
        self.channels.append((default, {kind: ch}))
        self.mark(self.channels[-1][1], kind, block)

    def general(self, body: list[Stmt]) -> None:
        g, lg = self.out["general"], self.out["logging"]
        for st in body:
            k = st.key
            if k == "lockfile":
                self.put(g, "lock_file", st)
            elif k == "unix" and st.body is not None:
                for u in st.body:
                    if u.key == "path":
                        self.put(g, "control_socket", u)
                    elif u.key != "backlog":
                        self.note(u, "not recognised; not converted")
            elif k in ("netlinkbuffersize", "socketbuffersize", "netlinkbuffersizemaxgrowth",
                       "socketbuffersizemaxgrown"):
                v = self.value(st, "int")
                if v is not None:
                    self.rcvbuf.append((v, st))
            elif k == "netlinkeventsreliable":
                self.put(self.out["netlink"], "reliable_events", st, "bool")
            elif k == "netlinkoverrunresync":
                v = _onoff(st.args[0]) if len(st.args) == 1 else None
                if v is None and st.args and _int(st.args[0]) is not None:
                    v = True
                    self.note(st, "the resync runs at once, not after a delay", approx=True)
                if v is None:
                    self.note(st, "expected on, off or seconds; not converted")
                else:
                    self.out["netlink"]["overrun_resync"] = v
            elif k == "filter" and st.body is not None:
                self.filters(st)
            elif k in ("logfile", "syslog"):
                self.log_target(st, lg)
            elif k in _NO_EQUIVALENT:
                self.note(st, f"{_NO_EQUIVALENT[k]}; ignored")
            else:
                self.note(st, "not recognised; not converted")

    def log_target(self, st: Stmt, lg: dict[str, Any]) -> None:
        arg = st.args[0] if len(st.args) == 1 else ""
        on = _onoff(arg)
        if on is False:
            return
        if "target" in lg:
            self.note(st, f"conntrackd-py logs to one place; kept logging to {lg['target']}",
                      approx=True)
        elif st.key == "syslog":
            lg["target"] = "syslog"
            if on is None:
                self.note(st, "the syslog facility is always 'daemon'", approx=True)
        else:  # `LogFile on`: conntrackd's default file (DEFAULT_LOGFILE in conntrackd.h)
            lg["target"], lg["file"] = "file", DEFAULT_LOGFILE if on else arg
            self.mark(lg, "file", st)

    def filters(self, block: Stmt) -> None:
        assert block.body is not None
        if [a.lower() for a in block.args] == ["from", "kernelspace"]:
            self.note(block, "filters are applied in user space, with conntrackd's user-space "
                      "rule (original source and reply source; its kernel-space filter checks "
                      "the original destination instead)", approx=True)
        fl = self.out["filters"]
        for st in block.body:
            kind = {"protocol": "protocols", "address": "addresses", "state": "tcp_states"}.get(
                st.key)
            policy = st.args[0].lower() if len(st.args) == 1 else ""
            if kind is None or st.body is None or policy not in ("accept", "ignore"):
                self.note(st, "not recognised; not converted")
                continue
            items = [w for sub in st.body for w in sub.words]
            lines = {w: sub for sub in st.body for w in sub.words}
            if kind == "protocols":
                values = [self.protocol(w, lines[w]) for w in items]
            elif kind == "addresses":
                values = [self.address(sub) for sub in st.body]
            else:
                values = self.states(items, st)
            values = [v for v in values if v is not None]
            if kind in fl and policy not in fl[kind]:
                self.note(st, f"conflicts with the earlier {next(iter(fl[kind]))} list for "
                          f"{kind}; not converted")
                continue
            if policy == "accept" and not values:
                self.note(st, "nothing left to accept; not converted")
                continue
            existing = fl.setdefault(kind, {}).setdefault(policy, [])
            existing += [v for v in values if v not in existing]
            self.mark(fl[kind], policy, st)

    def protocol(self, word: str, st: Stmt) -> Any:
        name = _PROTOCOL_ALIASES.get(word.lower(), word.lower())
        if name in PROTOCOLS:
            return name
        n = _int(name)
        if n is not None and n <= 255:
            return n
        self.note(st, f"unknown protocol {word!r}; use its number; not converted")
        return None

    def address(self, st: Stmt) -> str | None:
        if st.key not in ("ipv4_address", "ipv6_address") or len(st.args) != 1:
            self.note(st, "expected IPv4_address or IPv6_address and one address; not converted")
            return None
        try:
            net = ipaddress.ip_network(st.args[0], strict=False)
        except ValueError:
            self.note(st, "not an address or network; not converted")
            return None
        host = net.prefixlen == net.max_prefixlen
        return str(net.network_address) if host else str(net)

    def states(self, words: list[str], st: Stmt) -> list[Any]:
        names = [w.strip(",").upper() for w in words if w.strip(",")]
        if names[-2:] == ["FOR", "TCP"]:
            names = names[:-2]
        out = []
        for name in names:
            name = TCP_STATE_ALIASES.get(name, name)
            if name in _TCP_STATES:
                out.append(name)
            else:
                self.note(st, f"unknown TCP state {name!r}; not converted")
        return out

    def stats(self, body: list[Stmt]) -> None:
        acc = self.out["stats"].setdefault("accounting", {})
        for st in body:
            arg = st.args[0] if len(st.args) == 1 else ""
            on = _onoff(arg)
            if st.key == "logfile" and on is not False:  # on: conntrackd's DEFAULT_STATS_LOGFILE
                acc.update(enabled=True, file=DEFAULT_STATS_LOGFILE if on else arg,
                           format="text")
            elif st.key == "syslog" and on is not False:
                acc.update(enabled=True, syslog=True)
            elif st.key == "netlinkeventsreliable":
                self.put(self.out["netlink"], "reliable_events", st, "bool")
            elif st.key not in ("logfile", "syslog"):
                self.note(st, "not recognised; not converted")
        if not acc:
            del self.out["stats"]["accounting"]

    # --- values that need the whole file ----------------------------------------------------
    def finish_netlink(self) -> None:
        """conntrackd grows its buffer on overruns up to MaxGrowth; ours is fixed, so use the
        largest size given, but never less than our default (measured to survive bursts)."""
        if not self.rcvbuf:
            return
        size, st = max(self.rcvbuf, key=lambda x: x[0])
        if size > _DEFAULT_RCVBUF:
            self.out["netlink"]["rcvbuf"] = size
        else:
            self.note(st, f"conntrackd-py's netlink buffer is fixed, not grown: kept its "
                      f"default of {_DEFAULT_RCVBUF // MiB}MiB (set netlink.rcvbuf to override)",
                      approx=True)

    def node_id(self) -> None:
        """conntrackd has no node id: derive one from this node's sync address (`node_rule`).

        The Default link's address is used (the first channel here), else the next link's."""
        for ch in self.out["sync"].get("channels", []):
            spec = ch.get("multicast") or ch.get("udp")
            addr = spec.get("source") or spec.get("bind")
            if not addr:
                continue
            own = ipaddress.ip_address(addr)
            peers = [ipaddress.ip_address(p) for p in spec.get("peers", ())]
            nid, bits = derive_node_id(own, peers)
            if nid is None:
                self.node_id_from = "collision"
                self.out["node"]["id"] = 1
                self.notes.append((1 << 30, f"node.id: conntrackd has no node id, and none can "
                                   f"be derived from the sync addresses: {addr} and a peer "
                                   f"({', '.join(map(str, peers))}) share their last two bytes "
                                   "(or they are zero); set node.id (1..65535, different on "
                                   "every node) instead of the placeholder 1"))
                return
            self.node_id_from = "derived"
            self.out["node"]["id"] = nid
            known = ("the peers' addresses differ from it there" if peers else
                     "a multicast link does not name its peers: make sure no other node's sync "
                     "address ends alike (a duplicate id is reported at run time)")
            last = "byte" if bits == 8 else "two bytes"
            self.notes.append((1 << 30, f"node.id: conntrackd has no node id; {nid} was derived "
                               f"from the last {last} of this node's sync address {addr}; every "
                               f"node needs a different one: {known}"))
            return
        self.out["node"]["id"] = 1
        if self.out["general"]["mode"] == "sync":
            self.node_id_from = "placeholder"
            self.notes.append((1 << 30, "node.id: conntrackd has no node id and no sync address "
                               "to derive one from; set node.id (1..65535, different on every "
                               "node) instead of the placeholder 1"))


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def derive_node_id(own: Address, peers: list[Address]) -> tuple[int | None, int]:
    """(node id, bits used) for a node whose sync address is `own`, its UDP peers `peers`.

    The rule: the address's last byte, when the last bytes of all the cluster's addresses
    (own and peers) are distinct and not zero; else its last two bytes, under the same
    condition; else None (no id can be derived: 10.1.0.5 and 10.2.0.5). Every node of a
    cluster sees the same set of addresses, so all of them pick the same width. A multicast
    link names no peers: nodes whose addresses end alike (10.0.1.5 and 10.0.2.5) get one id,
    which the peers detect at run time (a duplicate node id).
    """
    cluster = [own, *peers]
    for bits in (8, 16):
        mask = (1 << bits) - 1
        ids = [int(a) & mask for a in cluster]
        if 0 not in ids and len(set(ids)) == len(ids):
            return ids[0], bits
    return None, 16


def _printable(text: str) -> str:
    """Text for a YAML comment: control characters (which make YAML invalid) escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace")
                   .decode("ascii") for c in text)


@dataclass(frozen=True)
class Conversion:
    """A conntrackd.conf read: the YAML, the notes (each naming its line), the one-line
    warning that sums them up, and why no node id could be derived (None when one was)."""
    yaml: str
    notes: tuple[str, ...]
    warning: str
    node_id_problem: str | None
    data: dict[str, Any]
    #: key paths of the YAML -> (line, statement) of the conntrackd.conf that set them
    origins: dict[str, tuple[int, str]]


#: names listed in the warning line at most (a hostile file may have thousands)
_WARN_NAMES = 8


def _names(items: list[tuple[int, str]]) -> str:
    shown = [f"{_printable(name[:40])} (line {line})" for line, name in sorted(items)[:_WARN_NAMES]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def read(text: str, filename: str = "<conntrackd.conf>") -> Conversion:
    """conntrackd.conf text -> Conversion. Raises ConfSyntaxError when the text cannot be
    parsed at all; the YAML may still be refused by `config.loads` (a value out of range)."""
    conv = _Converter(filename)
    data = conv.convert(parse(text, filename))
    notes = [text for _, text in sorted(conv.notes, key=lambda n: n[0])]
    header = [f"# conntrackd-py configuration converted from {_printable(filename)} by",
              "# `conntrackd-py import-conf`. Check it with: conntrackd-py --check -C FILE"]
    if notes:
        header += ["#", "# Review (not converted or approximated):"]
        header += [f"#   - {_printable(n)}" for n in notes]
    # libyaml's emitter when there is one: the pure one took 7 s for 60000 filter addresses
    body = yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                     sort_keys=False, default_flow_style=False)
    auth = "\n  auth:\n    required: false\n"
    if auth in body:  # the one comment inside the YAML: why there is no key
        body = body.replace(auth, "\n  auth:\n" + "".join(
            f"    {line}\n" for line in _AUTH_COMMENT) + "    required: false\n", 1)
    parts = []
    if conv.node_id_from == "derived":
        parts.append(f"node.id {data['node']['id']} derived from the sync address (every node "
                     "needs a different one)")
    if data["general"]["mode"] == "sync":
        parts.append("no authentication (conntrackd has none: sync.auth.required false)")
    if conv.unmapped:
        parts.append(f"not mapped: {_names(conv.unmapped)}")
    if conv.approximated:
        parts.append(f"approximated: {_names(conv.approximated)}")
    warning = (f"{_printable(filename)} read as a conntrackd.conf: {'; '.join(parts)}; details: "
               f"conntrackd-py import-conf {_printable(filename)}")
    problem = None  # for `config.load`, which reads the file as it is: the fix in its terms
    if conv.node_id_from == "placeholder":
        problem = ("conntrackd has no node id, and this file names no sync address of this node "
                   "to derive one from: give the Multicast block this node's IPv4_interface "
                   "(or IPv6_interface; conntrackd reads it too), or convert the file with "
                   "`conntrackd-py import-conf` and set node.id")
    elif conv.node_id_from == "collision":
        problem = ("conntrackd has no node id, and none can be derived: this node's sync "
                   "address and a UDP peer's share their last two bytes; convert the file with "
                   "`conntrackd-py import-conf` and set node.id (different on every node)")
    return Conversion("\n".join(header) + "\n\n" + body, tuple(notes), warning, problem, data,
                      conv.origins(data))


def convert(text: str, filename: str = "<conntrackd.conf>") -> tuple[str, list[str]]:
    """conntrackd.conf text -> (conntrackd-py YAML text, what could not be mapped).

    Each entry of the list names its conntrackd.conf line. Raises ConfSyntaxError when the
    text cannot be parsed at all.
    """
    res = read(text, filename)
    return res.yaml, list(res.notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="conntrackd-py import-conf",
                                description="Convert a conntrackd.conf to conntrackd-py YAML.")
    p.add_argument("conf", help="conntrackd.conf to read ('-' = stdin)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the YAML here (default: stdout)")
    args = p.parse_args(argv)
    try:
        if args.conf == "-":
            text = sys.stdin.read()
        else:
            with open(args.conf) as fh:
                text = fh.read()
    except OSError as e:
        print(f"conntrackd-py import-conf: cannot read {args.conf}: {e.strerror}",
              file=sys.stderr)
        return 1
    name = "<stdin>" if args.conf == "-" else args.conf
    try:
        out, notes = convert(text, name)
    except ConfigError as e:
        print(f"conntrackd-py import-conf: {e}", file=sys.stderr)
        return 1
    for n in notes:
        print(f"note: {_printable(n)}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(out)
    else:
        sys.stdout.write(out)
    try:
        loads(out, args.output or "<output>")
    except ConfigError as e:
        print(f"conntrackd-py import-conf: the converted config needs a manual fix: {e}",
              file=sys.stderr)
        return 1
    return 0
