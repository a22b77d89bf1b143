"""Configuration: YAML in, frozen dataclasses out, errors that name file, line and key.

Owns the schema (one frozen, slotted dataclass per section, field names = YAML keys), its
defaults, the rules across fields, and the entry points `load`, `loads`, `default_config`,
`load_keys` and `to_dict`. YAML is parsed once, here, at the edge; nothing below this module
sees it. The node-level readers (sizes, durations, addresses, line numbers) are in
`config_parse.py`.

It must not open sockets or touch the kernel. Key files are read only by `load_keys`, which the
daemon calls at start, so `--check` works on a machine without the keys; but a sync-mode config
that names no key file is refused here (unless `sync.auth.required: false`), so `--check`
catches it. `load` and `loads` raise only ConfigError (and OSError for an unreadable file),
whatever the text: nesting, aliases and list sizes are bounded (`config_parse`).

The defaults of the settings the engine also has (`sync.config.SyncConfig`) are that class's
field defaults, read here: one place for each value.
"""

# The schema's fields are built by helpers that return dataclasses.field(...) objects:
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from functools import lru_cache
from typing import Any

import yaml

from .config_parse import (
    Invalid,
    YNode,
    any_string,
    boolean,
    build,
    choice,
    compose_untrusted,
    duration,
    f,
    hint,
    ifname,
    integer,
    line_of,
    listen,
    listof,
    mapping,
    multicast,
    netns,
    network,
    number,
    optional,
    scalar,
    sec,
    section,
    short,
    show,
    size,
    socket_path,
    string,
    unicast,
)
from .flow import PROTO_BY_NAME, TcpState
from .ipfix import parse_collector
from .sync.config import SyncConfig, config_from

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
KiB = 1024
MiB = 1024 * KiB

PROTOCOLS: Mapping[str, int] = PROTO_BY_NAME  # flow.py holds the one list of names
#: BLAKE2b key lengths the sync layer accepts (sync/wire.py: KEY_MIN, KEY_MAX)
KEY_MIN, KEY_MAX = 16, 64
#: conntrackd's spellings of TCP states that the kernel names differently
TCP_STATE_ALIASES = {"CLOSED": "CLOSE", "LISTEN": "SYN_SENT2"}
#: Where the embedded default (and the docs) keep the sync key.
DEFAULT_KEY_FILE = "/etc/conntrackd-py/sync.key"
#: A config file larger than this is refused before parsing (a 65536-address filter is ~1.5 MiB)
MAX_FILE_SIZE = 4 * 1024 * 1024


def keygen(path: str = DEFAULT_KEY_FILE) -> str:
    """The shell command that makes a key file, for messages people paste from."""
    return f"head -c 32 /dev/urandom > {path} && chmod 600 {path}"


#: SyncConfig's field defaults: the engine's and the schema's one source for shared settings.
_ENGINE: dict[str, Any] = {x.name: x.default for x in dataclasses.fields(SyncConfig)}


class ConfigError(ValueError):
    """A configuration that cannot be used: `str()` is for people, the fields for code."""

    def __init__(self, problem: str, key: str = "", filename: str = "",
                 line: int | None = None) -> None:
        self.problem, self.key, self.filename, self.line = problem, key, filename, line
        where = f"{filename}:{line}" if filename and line else filename
        text = f"{key}: {problem}" if key else problem
        super().__init__(f"{text} ({where})" if where else text)


def _protocol(node: YNode, path: str) -> int:
    v = scalar(node, path)
    if type(v) is int and 0 <= v <= 255:
        return v
    if isinstance(v, str) and v.lower() in PROTOCOLS:
        return PROTOCOLS[v.lower()]
    raise Invalid(path, f"expected a protocol name ({', '.join(PROTOCOLS)}) or number 0..255, "
                  f"got {show(node)}{hint(str(node.value).lower(), PROTOCOLS)}")


def _tcp_state(node: YNode, path: str) -> TcpState:
    name = string(node, path).upper()
    name = TCP_STATE_ALIASES.get(name, name)
    if name not in TcpState.__members__ or name == "NONE":
        names = [s.name for s in TcpState if s.name != "NONE"]
        raise Invalid(path, f"expected a TCP state ({', '.join(names)}), got {show(node)}"
                      f"{hint(name, names)}")
    return TcpState[name]


# --- the schema -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Node:
    id: int = f(integer(1, 65535), need="an integer 1..65535, different on every node")
    name: str = f(any_string, "")


@dataclass(frozen=True, slots=True)
class General:
    mode: str = f(choice("sync", "stats"), "sync")
    lock_file: str = f(string, "/run/conntrackd-py.lock")
    control_socket: str = f(socket_path, "/run/conntrackd-py.sock")
    netns: str | None = f(optional(netns), None)


@dataclass(frozen=True, slots=True)
class Logging:
    level: str = f(choice("debug", "info", "warning", "error"), "info")
    format: str = f(choice("text", "json"), "text")
    target: str = f(choice("stderr", "file", "syslog"), "stderr")
    file: str | None = f(optional(string), None)


@dataclass(frozen=True, slots=True)
class Netlink:
    rcvbuf: int = f(size(64 * KiB), 64 * MiB)
    reliable_events: bool = f(boolean, False)
    set_events_sysctl: bool = f(boolean, True)
    overrun_resync: bool = f(boolean, True)
    commit_batch: int = f(integer(1, 10000), 256)


@dataclass(frozen=True, slots=True)
class ListFilter:
    """`policy` "accept" keeps only the flows matching `items`; "ignore" drops them.

    Items are protocol numbers, `ipaddress` networks, or `TcpState` members (ints).
    The default, ignore nothing, accepts everything.
    """
    policy: str = "ignore"
    items: tuple[int | Net, ...] = ()


def _list_filter(item: Any) -> Any:
    def parse(node: YNode, path: str) -> ListFilter:
        pairs = mapping(node, path)
        if len(pairs) != 1 or next(iter(pairs)) not in ("accept", "ignore"):
            bad = next((k for k in pairs if k not in ("accept", "ignore")), "")
            raise Invalid(f"{path}.{bad}" if bad else path, "expected exactly one of "
                          f"'accept: [...]' or 'ignore: [...]'{hint(bad, ['accept', 'ignore'])}")
        policy = next(iter(pairs))
        items = listof(item)(pairs[policy][1], f"{path}.{policy}")
        if policy == "accept" and not items:
            raise Invalid(f"{path}.accept", "an empty accept list would drop every flow; "
                          "remove the filter to accept everything")
        return ListFilter(policy, items)
    return f(parse, factory=ListFilter)


@dataclass(frozen=True, slots=True)
class Filters:
    protocols: ListFilter = _list_filter(_protocol)
    addresses: ListFilter = _list_filter(network)
    tcp_states: ListFilter = _list_filter(_tcp_state)
    ignore_sync_link: bool = f(boolean, True)


@dataclass(frozen=True, slots=True)
class Auth:
    """Key files: the first signs, all verify (two during a key rotation).

    `required` (true unless the file says false) refuses a sync mode without a key file.
    """
    key_files: tuple[str, ...] = f(listof(string, max_len=2), ())
    required: bool = f(boolean, True)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what peers can make this node hold or do (hostile or broken peers)."""
    #: peer nodes tracked at once; more are refused and counted
    max_peers: int = f(integer(1, 65535), _ENGINE["max_peers"])
    #: a peer down that long is forgotten by the engine
    peer_expire: float = f(duration(positive=True, hi=30 * 86400.0), _ENGINE["peer_expire"])
    #: external cache entries per origin node; more are refused and counted (the external
    #: cache's, not the engine's: this is its one default)
    max_flows_per_peer: int = f(integer(1, 1 << 30), 1048576)
    #: a full resync is sent at most once per this (requests in between coalesce); below the
    #: engine's stall timeout minus its resync retry (checked in `_check`)
    resync_min_interval: float = f(duration(), _ENGINE["resync_min_interval"])
    #: retransmitted bytes per received byte, per peer, per window
    resend_ratio: float = f(number(1.0, 10000.0), _ENGINE["resend_ratio"])


@dataclass(frozen=True, slots=True)
class Ftfw:
    ack_every: int = f(integer(1, 1 << 20), _ENGINE["ack_every"])
    ack_interval: float = f(duration(positive=True), _ENGINE["ack_interval"])
    resend_queue: int = f(integer(1, 1 << 24), _ENGINE["resend_queue_max"])
    alive_interval: float = f(duration(positive=True), _ENGINE["alive_interval"])


@dataclass(frozen=True, slots=True)
class Notrack:
    #: 0 in YAML is the engine's None (never)
    resync_interval: float = f(duration(), float(_ENGINE["periodic_resync"] or 0.0))


@dataclass(frozen=True, slots=True)
class Alarm:
    refresh: float = f(duration(positive=True), _ENGINE["alarm_refresh"])
    cache_timeout: float = f(duration(positive=True), _ENGINE["cache_timeout"])


_PORT = integer(1, 65535)
_BUF = size(4 * KiB)


def _needs_interface(addr: str) -> bool:
    """IPv6 link-local unicast and interface/link-scope multicast exist on one link only."""
    a = ipaddress.ip_address(addr)
    return a.version == 6 and (a.is_link_local or (a.is_multicast and a.packed[1] & 15 <= 2))


@dataclass(frozen=True, slots=True)
class Multicast:
    group: str = f(multicast, need="a multicast address such as 225.0.0.50 or ff02::cd:1")
    port: int = f(_PORT, 3780)
    interface: str | None = f(optional(ifname), None)
    source: str | None = f(optional(unicast), None)
    ttl: int = f(integer(0, 255), 1)
    rcvbuf: int = f(_BUF, 8 * MiB)
    sndbuf: int = f(_BUF, 8 * MiB)


def _check_multicast(m: Multicast, path: str) -> None:
    version = ipaddress.ip_address(m.group).version
    if m.source is not None and ipaddress.ip_address(m.source).version != version:
        raise Invalid(f"{path}.source", f"{m.source!r} is not an IPv{version} address like "
                      f"the group {m.group!r}")
    if m.interface is None and _needs_interface(m.group):
        raise Invalid(f"{path}.interface", f"is required: group {m.group!r} is link-scoped")


@dataclass(frozen=True, slots=True)
class Udp:
    bind: str = f(unicast, need="the local address of the sync link")
    peers: tuple[str, ...] = f(listof(unicast, min_len=1), need="the peers' addresses (a list)")
    port: int = f(_PORT, 3780)
    interface: str | None = f(optional(ifname), None)
    rcvbuf: int = f(_BUF, 8 * MiB)
    sndbuf: int = f(_BUF, 8 * MiB)


def _check_udp(u: Udp, path: str) -> None:
    version = ipaddress.ip_address(u.bind).version
    for i, peer in enumerate(u.peers):
        if ipaddress.ip_address(peer).version != version:
            raise Invalid(f"{path}.peers[{i}]", f"{peer!r} is not an IPv{version} address "
                          f"like bind {u.bind!r}")
        if peer == u.bind:
            raise Invalid(f"{path}.peers[{i}]", "is this node's own bind address")
    if u.interface is None and any(map(_needs_interface, (u.bind, *u.peers))):
        raise Invalid(f"{path}.interface", "is required with IPv6 link-local addresses")


@dataclass(frozen=True, slots=True)
class Channel:
    """One sync link: exactly one of `multicast` and `udp` is set."""
    multicast: Multicast | None = f(optional(section(Multicast, _check_multicast)), None)
    udp: Udp | None = f(optional(section(Udp, _check_udp)), None)


def _check_channel(ch: Channel, path: str) -> None:
    if (ch.multicast is None) == (ch.udp is None):
        raise Invalid(path, "needs exactly one of 'multicast: {...}' or 'udp: {...}'")


def _channel_identity(ch: Channel) -> tuple[Any, ...]:
    if ch.multicast is not None:
        return ("multicast", ch.multicast.group, ch.multicast.port, ch.multicast.interface)
    assert ch.udp is not None
    return ("udp", ch.udp.bind, ch.udp.port)


@dataclass(frozen=True, slots=True)
class Sync:
    mode: str = f(choice("ftfw", "notrack", "alarm"), str(_ENGINE["mode"]))
    startup_resync: bool = f(boolean, _ENGINE["startup_resync"])
    peer_timeout: float = f(duration(positive=True), _ENGINE["peer_timeout"])
    mtu: int = f(integer(576, 9000), _ENGINE["mtu"])
    commit_timeout: float | None = f(optional(duration(positive=True)), None)
    purge_timeout: float = f(duration(), 60.0)
    external_cache: bool = f(boolean, True)
    tcp_window_tracking: bool = f(boolean, False)
    peers: tuple[int, ...] = f(listof(integer(1, 65535)), ())
    auth: Auth = sec(Auth)
    limits: Limits = sec(Limits)
    ftfw: Ftfw = sec(Ftfw)
    notrack: Notrack = sec(Notrack)
    alarm: Alarm = sec(Alarm)
    channels: tuple[Channel, ...] = f(listof(section(Channel, _check_channel),
                                             key=_channel_identity), ())
    failback: bool = f(boolean, True)


def _collector(node: YNode, path: str) -> str:
    text = string(node, path)
    try:
        parse_collector(text)
    except ValueError as e:
        raise Invalid(path, f"{show(node)} is not a collector: {short(str(e))} (expected "
                      "ADDRESS, ADDRESS:PORT or [IPv6 ADDRESS]:PORT; addresses only)") from None
    return text


def _collector_identity(text: str) -> tuple[str, int]:
    return parse_collector(text)


@dataclass(frozen=True, slots=True)
class Ipfix:
    """IPFIX (RFC 7011) export of destroyed flows; no collectors = off."""
    collectors: tuple[str, ...] = f(listof(_collector, max_len=16, key=_collector_identity), ())
    #: seconds between template retransmissions (RFC 7011 templateRefreshTimeout)
    template_refresh: float = f(duration(positive=True, hi=86400.0), 600.0)
    #: messages between template retransmissions; 0 = by time only
    template_refresh_packets: int = f(integer(0, 1 << 31), 0)
    #: the observation domain id; null = this node's sync node id
    observation_domain: int | None = f(optional(integer(0, 4294967295)), None)
    #: the path MTU to the collectors
    mtu: int = f(integer(576, 65535), 1400)


@dataclass(frozen=True, slots=True)
class Accounting:
    enabled: bool = f(boolean, False)
    file: str | None = f(optional(string), None)
    format: str = f(choice("json", "text"), "json")
    syslog: bool = f(boolean, False)
    buffer: int = f(integer(1, 10_000_000), 50000)
    top_talkers: int = f(integer(0, 10000), 20)
    writer_priority: str = f(choice("idle", "low", "normal"), "idle")
    ipfix: Ipfix = sec(Ipfix)


@dataclass(frozen=True, slots=True)
class Stats:
    accounting: Accounting = sec(Accounting)


@dataclass(frozen=True, slots=True)
class Metrics:
    listen: str | None = f(optional(listen), None)


def _fifo_path(node: YNode, path: str) -> str:
    name = string(node, path)
    if not name.startswith("/"):
        raise Invalid(path, f"{show(node)} is not an absolute path")
    if "\0" in name or len(os.fsencode(name)) > 4095:
        raise Invalid(path, "is not a usable file path")
    return name


def _vrrp_name(node: YNode, path: str) -> str:
    """A vrrp_instance or vrrp_sync_group name as keepalived writes it into the FIFO."""
    name = string(node, path)
    if not 1 <= len(name) <= 64 or '"' in name or not name.isprintable():
        raise Invalid(path, f"{show(node)} is not a keepalived instance name (1..64 printable "
                      "characters, no '\"')")
    return name


@dataclass(frozen=True, slots=True)
class Keepalived:
    """Following keepalived's state through its notify FIFO, without a script per transition.

    `notify_fifo` None is off. `instances` () means every vrrp_instance and vrrp_sync_group
    named in the FIFO; otherwise only these."""
    notify_fifo: str | None = f(optional(_fifo_path), None)
    instances: tuple[str, ...] = f(listof(_vrrp_name, max_len=256), ())


@dataclass(frozen=True, slots=True)
class Config:
    node: Node = f(section(Node), need="this node's identity, e.g. 'node: {id: 1}'")
    general: General = sec(General)
    logging: Logging = sec(Logging)
    netlink: Netlink = sec(Netlink)
    filters: Filters = sec(Filters)
    sync: Sync = sec(Sync)
    stats: Stats = sec(Stats)
    metrics: Metrics = sec(Metrics)
    keepalived: Keepalived = sec(Keepalived)
    path: str | None = None
    #: set when the file was a conntrackd.conf (`load` reads those natively): the one line to
    #: warn with (what was derived, not mapped or approximated), and every note in full, each
    #: naming its conntrackd.conf line; None and () for a YAML file
    import_warning: str | None = None
    import_notes: tuple[str, ...] = ()


def _check(cfg: Config) -> None:
    """Rules that span sections; each names the key to fix."""
    s, lg = cfg.sync, cfg.logging
    if cfg.general.mode == "sync" and not s.channels:
        raise Invalid("sync.channels", "at least one channel is needed when general.mode is "
                      "'sync' (or set general.mode: stats)")
    if s.peer_timeout >= s.limits.peer_expire:
        raise Invalid("sync.limits.peer_expire", f"{s.limits.peer_expire:g}s must be longer "
                      f"than sync.peer_timeout ({s.peer_timeout:g}s)")
    # the engine's own rule (SyncConfig: stall_timeout > resync_min_interval + resync_retry)
    most = _ENGINE["stall_timeout"] - _ENGINE["resync_retry"]
    if s.limits.resync_min_interval >= most:
        raise Invalid("sync.limits.resync_min_interval", f"{s.limits.resync_min_interval:g}s "
                      f"must be shorter than {most:g}s (a peer waiting longer for a resync "
                      "is taken as stuck)")
    if cfg.node.id in s.peers:
        raise Invalid("sync.peers", f"lists this node's own id {cfg.node.id}")
    if s.peer_timeout <= s.ftfw.alive_interval:
        raise Invalid("sync.peer_timeout", f"{s.peer_timeout:g}s must be longer than "
                      f"sync.ftfw.alive_interval ({s.ftfw.alive_interval:g}s)")
    if s.mode == "alarm" and s.alarm.cache_timeout <= s.alarm.refresh:
        raise Invalid("sync.alarm.cache_timeout", f"{s.alarm.cache_timeout:g}s must be longer "
                      f"than sync.alarm.refresh ({s.alarm.refresh:g}s)")
    addrs = [ch.multicast.group if ch.multicast else ch.udp.bind if ch.udp else ""
             for ch in s.channels]
    if s.mtu < 1280 and any(":" in a for a in addrs):
        raise Invalid("sync.mtu", f"{s.mtu} is below 1280, the IPv6 minimum")
    if lg.target == "file" and lg.file is None:
        raise Invalid("logging.file", "is required when logging.target is 'file'")
    if lg.target != "file" and lg.file is not None:
        raise Invalid("logging.file", f"is set but logging.target is {lg.target!r}; "
                      "set 'target: file' or remove it")
    if cfg.general.mode == "sync":
        try:  # a net under the rules above: what the engine would refuse at start, --check does
            config_from(cfg, ())
        except ValueError as e:
            raise Invalid("sync", f"the replication engine refuses these settings: {e}") \
                from None
    # last, so that any other mistake in a file is reported first
    if cfg.general.mode == "sync" and s.auth.required and not s.auth.key_files:
        raise Invalid("sync.auth.key_files", _NO_KEY)


_NO_KEY = (
    "is empty while sync.auth.required is true (the default): without a key, anyone who can "
    "reach the sync link can put flows into this node's kernel table. Make a key with: "
    f"{keygen()} , copy the file to every node and list it: 'auth: {{key_files: "
    f"[{DEFAULT_KEY_FILE}]}}' under sync; or set 'auth: {{required: false}}' under sync to "
    "replicate without authentication")


def auth_off(cfg: Config) -> bool:
    """True when this node would replicate without authentication (sync mode, no key file):
    for `--check`, `-s` and metrics to say so."""
    return cfg.general.mode == "sync" and not cfg.sync.auth.key_files


# --- entry points -----------------------------------------------------------------------------

def _parse(text: str, filename: str, path: str | None) -> Config:
    root = None
    try:
        root = compose_untrusted(text)
        cfg = build(Config, root, "", {"path": path})
        _check(cfg)
    except Invalid as e:
        line = e.mark.line + 1 if e.mark is not None else line_of(root, e.key)
        raise ConfigError(e.problem, key=e.key, filename=filename, line=line) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigError(f"not valid YAML: {e.problem or e.context}", filename=filename,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:  # e.g. a control character (ReaderError)
        raise ConfigError(f"not valid YAML: {e}", filename=filename) from None
    return cfg


def loads(text: str, filename: str = "<string>") -> Config:
    """Parse YAML text (or conntrackd.conf text, as `load` does); `filename` is only used in
    error messages."""
    if is_conntrackd_conf(text):
        return dataclasses.replace(_from_conntrackd_conf(text, filename), path=None)
    return _parse(text, filename, None)


_CONNTRACKD_SECTIONS = ("general", "sync", "stats", "helper")


def is_conntrackd_conf(text: str) -> bool:
    """True when `text` is written in conntrackd.conf's syntax, not YAML: its first line that is
    neither blank nor a comment opens one of conntrackd's top-level sections (`General {`,
    `Sync {`, `Stats {`, `Helper {`; the brace may be on the next line), which no YAML config
    can begin with."""
    first: str | None = None
    for line in text.splitlines():
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        if first is not None:  # `Sync` alone on its line: the brace must come next
            return s.startswith("{")
        word, brace, _ = s.partition("{")
        if word.strip().lower() not in _CONNTRACKD_SECTIONS:
            return False
        if brace:
            return True
        first = s
    return False


def origin_of(key: str, origins: Mapping[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The origin of key path `key` ("a.b[2].c"), else of its closest parent that has one."""
    while key:
        if key in origins:
            return origins[key]
        parent = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", key)
        key = parent if parent != key else ""
    return None


def _short_words(words: str) -> str:
    """A conntrackd.conf statement for an error message: bounded, control characters escaped."""
    text = words if len(words) <= 60 else words[:57] + "..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _from_conntrackd_conf(text: str, name: str) -> Config:
    """A conntrackd.conf read through import-conf's reader (`importconf.read`): the Config it
    converts to, with the warning line and the notes. Errors name the conntrackd.conf."""
    from .importconf import read  # importconf builds on this module's names: imported late
    res = read(text, name)  # ConfSyntaxError is a ConfigError naming the file and line
    if res.node_id_problem is not None:
        raise ConfigError(res.node_id_problem, "node.id", name)
    try:
        cfg = _parse(res.yaml, name, name)
    except ConfigError as e:  # the conntrackd.conf statement that set the key, or its block
        origin = origin_of(e.key, res.origins)
        if origin is None:
            raise ConfigError(f"{e.problem} (in what this conntrackd.conf converts to: see "
                              f"`conntrackd-py import-conf {name}`)", e.key, name) from None
        line, words = origin
        raise ConfigError(f"{e.problem} (from {_short_words(words)!r}, read as {e.key})",
                          e.key, name, line) from None
    return dataclasses.replace(cfg, import_warning=res.warning, import_notes=res.notes)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse a config file. OSError propagates; everything else is a ConfigError.

    A file in conntrackd.conf's syntax (`is_conntrackd_conf`) is read natively, through the
    import-conf reader: `Config.import_warning` then says, in one line, what was derived, not
    mapped or approximated (`import_notes` has each note with its line)."""
    name = os.fspath(path)
    with open(name, "rb") as fh:
        data = fh.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(f"larger than {MAX_FILE_SIZE >> 20} MiB; not a config file?",
                          filename=name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", filename=name) from None
    if is_conntrackd_conf(text):
        return _from_conntrackd_conf(text, name)
    return _parse(text, name, name)


DEFAULT_YAML = f"""\
node: {{id: 1}}
sync:
  auth: {{key_files: [{DEFAULT_KEY_FILE}]}}
  channels:
    - multicast: {{group: 225.0.0.50, port: 3780}}
"""


@lru_cache(maxsize=1)
def default_config() -> Config:
    """The embedded default: node 1, FTFW over multicast 225.0.0.50:3780, any interface,
    authenticated with the key in DEFAULT_KEY_FILE (a daemon started on it without that file
    stops at `load_keys`, which says how to make one)."""
    return _parse(DEFAULT_YAML, "<embedded default>", None)


_KEY_FILE_MAX = 2 * KEY_MAX + 2  # the longest key in hex, and a CR LF


def load_keys(auth: Auth) -> tuple[bytes, ...]:
    """Read the sync keys: hex text or raw bytes, 16..64 bytes each; the first signs.

    A key file must be a regular file owned by root (or this user) that neither group nor
    others may read or write, as ssh demands of private keys; it is checked through the open
    descriptor (fstat), so a symlink is judged by the file it reaches. No key file while
    `auth.required` is an error too. Errors are ConfigErrors naming the key path and the file.
    """
    if auth.required and not auth.key_files:
        raise ConfigError(_NO_KEY, "sync.auth.key_files")
    keys: list[bytes] = []
    for i, name in enumerate(auth.key_files):
        where = f"sync.auth.key_files[{i}]"
        try:
            # O_NONBLOCK: a FIFO in the key's place must not hang the start
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                data = os.read(fd, _KEY_FILE_MAX + 1) if stat.S_ISREG(st.st_mode) else b""
            finally:
                os.close(fd)
        except OSError as e:
            raise ConfigError(f"cannot read key file: {e.strerror}; make one with: "
                              f"{keygen(name)} (the same key on every node)", where,
                              name) from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("is not a regular file", where, name)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(f"the key file is readable or writable by group or others (mode "
                              f"{mode:04o}); fix: chmod 600 {name}", where, name)
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"the key file is owned by uid {st.st_uid}, not root; fix: "
                              f"chown root {name}", where, name)
        if len(data) > _KEY_FILE_MAX:
            raise ConfigError(f"the file is larger than any key ({KEY_MAX} bytes, or "
                              f"{2 * KEY_MAX} hex digits)", where, name)
        text = data.strip()
        hexkey = re.fullmatch(rb"(?:[0-9a-fA-F]{2})+", text)
        key = bytes.fromhex(text.decode()) if hexkey else data
        if not KEY_MIN <= len(key) <= KEY_MAX:
            raise ConfigError(f"the key is {len(key)} bytes; {KEY_MIN}..{KEY_MAX} are needed "
                              f"(make one with: {keygen(name)})", where, name)
        if key in keys:
            raise ConfigError(f"holds the same key as sync.auth.key_files[{keys.index(key)}]",
                              where, name)
        keys.append(key)
    return tuple(keys)


_PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (YAML/JSON-ready) that `loads` turns back into an equal Config."""
    return {x.name: _plain(getattr(cfg, x.name)) for x in fields(cfg)
            if x.name not in _NOT_SCHEMA}


_NOT_SCHEMA = ("path", "import_warning", "import_notes")


def _plain(v: Any) -> Any:
    if isinstance(v, Filters):  # protocol names read better than numbers
        out = {x.name: _plain(getattr(v, x.name)) for x in fields(v)}
        out["protocols"] = {v.protocols.policy: [_PROTOCOL_NAMES.get(p, p) if isinstance(
            p, int) else p for p in v.protocols.items]}
        return out
    if isinstance(v, ListFilter):
        return {v.policy: [_plain(i) for i in v.items]}
    if isinstance(v, Channel):
        return {"multicast": _plain(v.multicast)} if v.multicast else {"udp": _plain(v.udp)}
    if is_dataclass(v) and not isinstance(v, type):
        return {x.name: _plain(getattr(v, x.name)) for x in fields(v)}
    if isinstance(v, TcpState):
        return v.name
    if isinstance(v, tuple):
        return [_plain(i) for i in v]
    if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(v)
    return v
