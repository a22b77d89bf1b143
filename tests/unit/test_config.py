"""config.py: YAML -> frozen dataclasses; every error names file, line and key."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conntrackd_py.config import (
    DEFAULT_KEY_FILE,
    DEFAULT_YAML,
    Auth,
    Config,
    ConfigError,
    default_config,
    load,
    load_keys,
    loads,
    to_dict,
)
from conntrackd_py.flow import TcpState

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
# every conntrackd-py config shipped (config/prometheus holds Prometheus rules, not ours)
EXAMPLES = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent.name != "prometheus")
# three lines, as before auth was required: the line numbers below count on it
CHANNEL = ("sync:\n  auth: {required: false}\n"
           "  channels: [{multicast: {group: 225.0.0.50}}]\n")
NO_AUTH = "  auth: {required: false}\n"


def key_file(path: Path, data: bytes | str, mode: int = 0o600) -> str:
    """A key file as load_keys wants it (0600 unless `mode` says otherwise)."""
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def cfg(text: str) -> Config:
    """A config with node 1 and one channel, plus `text` (whole sections)."""
    base = "node: {id: 1}\n"
    if "sync:" not in text:
        base += CHANNEL
    return loads(base + text, "conntrackd-py.yaml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        loads(text, "conntrackd-py.yaml")
    return str(e.value)


# --- defaults and shipped files ----------------------------------------------------------------

def test_default_config_is_node_1_on_multicast_225_0_0_50_with_no_interface() -> None:
    c = default_config()
    assert c.node.id == 1
    assert c.node.name == ""
    assert c.general.mode == "sync"
    assert c.sync.mode == "ftfw"
    (ch,) = c.sync.channels
    assert ch.udp is None
    assert ch.multicast is not None
    assert (ch.multicast.group, ch.multicast.port, ch.multicast.interface) == (
        "225.0.0.50", 3780, None)
    assert c.path is None


def test_defaults_match_the_schema() -> None:
    c = default_config()
    assert c.general.lock_file == "/run/conntrackd-py.lock"
    assert c.general.control_socket == "/run/conntrackd-py.sock"
    assert c.general.netns is None
    assert (c.logging.level, c.logging.format, c.logging.target, c.logging.file) == (
        "info", "text", "stderr", None)
    assert c.netlink.rcvbuf == 64 << 20
    assert c.netlink.commit_batch == 256
    assert not c.netlink.reliable_events
    assert c.netlink.set_events_sysctl
    assert c.netlink.overrun_resync
    for lf in (c.filters.protocols, c.filters.addresses, c.filters.tcp_states):
        assert (lf.policy, lf.items) == ("ignore", ())
    assert c.filters.ignore_sync_link
    s = c.sync
    assert (s.startup_resync, s.peer_timeout, s.mtu, s.commit_timeout, s.purge_timeout) == (
        True, 5.0, 1400, None, 60.0)
    assert s.external_cache
    assert not s.tcp_window_tracking
    assert s.failback
    assert s.peers == ()
    assert s.auth.key_files == (DEFAULT_KEY_FILE,)
    assert s.auth.required
    lim = s.limits
    assert (lim.max_peers, lim.peer_expire, lim.max_flows_per_peer, lim.resync_min_interval,
            lim.resend_ratio) == (32, 3600.0, 1048576, 5.0, 10.0)
    assert (s.ftfw.ack_every, s.ftfw.ack_interval, s.ftfw.resend_queue,
            s.ftfw.alive_interval) == (64, 0.05, 131072, 1.0)
    assert s.notrack.resync_interval == 0.0
    assert (s.alarm.refresh, s.alarm.cache_timeout) == (15.0, 180.0)
    m = s.channels[0].multicast
    assert m is not None
    assert (m.source, m.ttl, m.rcvbuf, m.sndbuf) == (None, 1, 8 << 20, 8 << 20)
    a = c.stats.accounting
    assert (a.enabled, a.file, a.format, a.syslog, a.buffer, a.top_talkers) == (
        False, None, "json", False, 50000, 20)
    assert c.metrics.listen is None


def test_annotated_config_states_exactly_the_defaults() -> None:
    annotated = load(CONFIG_DIR / "conntrackd-py.yaml")
    assert annotated.path == str(CONFIG_DIR / "conntrackd-py.yaml")
    assert dataclasses.replace(annotated, path=None) == default_config()


def test_shipped_configs_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"conntrackd-py.yaml", "primary-backup-fwA.yaml", "primary-backup-fwB.yaml",
            "cluster-3node-node1.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips_through_to_dict(path: Path) -> None:
    c = load(path)
    again = loads(yaml.safe_dump(to_dict(c)), "dump.yaml")
    assert again == dataclasses.replace(c, path=None)


def test_primary_backup_pair_differs_in_node_and_source_only() -> None:
    a = load(CONFIG_DIR / "examples" / "primary-backup-fwA.yaml")
    b = load(CONFIG_DIR / "examples" / "primary-backup-fwB.yaml")
    assert (a.node.id, b.node.id) == (1, 2)
    assert a.sync.peers == (b.node.id,)
    assert b.sync.peers == (a.node.id,)
    assert [ch.multicast.group for ch in a.sync.channels if ch.multicast] == \
        [ch.multicast.group for ch in b.sync.channels if ch.multicast]
    assert a.filters == b.filters


def test_config_is_frozen() -> None:
    c = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.node.id = 2  # type: ignore[misc]


def test_to_dict_prints_names_not_numbers() -> None:
    d = to_dict(cfg("filters:\n  protocols: {accept: [tcp, 47, 200]}\n"
                    "  tcp_states: {ignore: [TIME_WAIT]}\n  addresses: {ignore: [10.0.0.0/8]}\n"))
    assert d["filters"]["protocols"] == {"accept": ["tcp", "gre", 200]}
    assert d["filters"]["tcp_states"] == {"ignore": ["TIME_WAIT"]}
    assert d["filters"]["addresses"] == {"ignore": ["10.0.0.0/8"]}
    assert "path" not in d


# --- errors: file, line, key ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast:\n        group: 300.1.1.1\n",
     "sync.channels[0].multicast.group: '300.1.1.1' is not a multicast address "
     "(224.0.0.0/4 or ff00::/8) (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast: {group: 10.0.0.1}\n",
     "sync.channels[0].multicast.group: '10.0.0.1' is not a multicast address "
     "(224.0.0.0/4 or ff00::/8) (conntrackd-py.yaml:4)"),
    ("node:\n  id: 0\n", "node.id: expected an integer 1..65535, got 0 (conntrackd-py.yaml:2)"),
    ("node:\n  id: one\n",
     "node.id: expected an integer 1..65535, got 'one' (conntrackd-py.yaml:2)"),
    ("general: {mode: sync}\n",
     "node: is required: this node's identity, e.g. 'node: {id: 1}' (conntrackd-py.yaml:1)"),
    ("node:\n  name: fw\n", "node.id: is required: an integer 1..65535, different on every "
     "node (conntrackd-py.yaml:2)"),
    ("node: {id: 1}\n", "sync.channels: at least one channel is needed when general.mode is "
     "'sync' (or set general.mode: stats) (conntrackd-py.yaml)"),
    ("node: {id: 1}\nsync:\n  mode: ftfw\n", "sync.channels: at least one channel is needed "
     "when general.mode is 'sync' (or set general.mode: stats) (conntrackd-py.yaml:2)"),
    ("node: {id: 1}\n" + CHANNEL + "  peers: [2, 1]\n",
     "sync.peers: lists this node's own id 1 (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "  peers: [2, 2]\n",
     "sync.peers[1]: repeats sync.peers[0] (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "  peer_timeout: 500ms\n",
     "sync.peer_timeout: 0.5s must be longer than sync.ftfw.alive_interval (1s) "
     "(conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "  mode: alarm\n  alarm: {refresh: 1m, cache_timeout: 30}\n",
     "sync.alarm.cache_timeout: 30s must be longer than sync.alarm.refresh (60s) "
     "(conntrackd-py.yaml:6)"),
    ("node: {id: 1}\n" + CHANNEL + "  mtu: 100\n",
     "sync.mtu: expected an integer 576..9000, got 100 (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\nsync:\n  mtu: 1000\n  channels:\n    - multicast: {group: ff05::1}\n",
     "sync.mtu: 1000 is below 1280, the IPv6 minimum (conntrackd-py.yaml:3)"),
    ("node: {id: 1}\n" + CHANNEL + "logging:\n  target: file\n",
     "logging.file: is required when logging.target is 'file' (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "logging:\n  file: /var/log/x\n",
     "logging.file: is set but logging.target is 'stderr'; set 'target: file' or remove it "
     "(conntrackd-py.yaml:6)"),
    ("node: {id: 1}\nsync:\n  channels: [{multicast: {group: 225.0.0.50}}]\n"
     "  auth:\n    key_files: [a, b, c]\n",
     "sync.auth.key_files: needs at most 2 entries, got 3 (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - {}\n",
     "sync.channels[0]: needs exactly one of 'multicast: {...}' or 'udp: {...}' "
     "(conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast: {group: 225.0.0.50}\n"
     "      udp: {bind: 10.0.0.1, peers: [10.0.0.2]}\n",
     "sync.channels[0]: needs exactly one of 'multicast: {...}' or 'udp: {...}' "
     "(conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast: {group: 225.0.0.50}\n"
     "    - multicast: {group: 225.0.0.50, ttl: 2}\n",
     "sync.channels[1]: repeats sync.channels[0] (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - udp:\n        bind: 10.0.0.1\n"
     "        peers: [10.0.0.2, 'fd00::2']\n",
     "sync.channels[0].udp.peers[1]: 'fd00::2' is not an IPv4 address like bind '10.0.0.1' "
     "(conntrackd-py.yaml:6)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - udp:\n        bind: 10.0.0.1\n",
     "sync.channels[0].udp.peers: is required: the peers' addresses (a list) "
     "(conntrackd-py.yaml:5)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - udp: {bind: 10.0.0.1, peers: []}\n",
     "sync.channels[0].udp.peers: needs at least 1 entries, got 0 (conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - udp: {bind: 10.0.0.1, peers: [10.0.0.1]}\n",
     "sync.channels[0].udp.peers[0]: is this node's own bind address (conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - udp: {bind: 225.0.0.1, peers: [10.0.0.1]}\n",
     "sync.channels[0].udp.bind: '225.0.0.1' is a multicast address; expected a unicast one "
     "(conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - udp: {bind: 'fe80::1', peers: ['fe80::2']}\n",
     "sync.channels[0].udp.interface: is required with IPv6 link-local addresses "
     "(conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast: {group: 'ff02::cd'}\n",
     "sync.channels[0].multicast.interface: is required: group 'ff02::cd' is link-scoped "
     "(conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast: {group: 225.0.0.5, source: 'fd00::1'}\n",
     "sync.channels[0].multicast.source: 'fd00::1' is not an IPv4 address like the group "
     "'225.0.0.5' (conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast: {group: 225.0.0.5, interface: eth0/1}\n",
     "sync.channels[0].multicast.interface: 'eth0/1' is not an interface name (1-15 "
     "characters, no '/', ':' or spaces) (conntrackd-py.yaml:4)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast: {group: 225.0.0.5, port: 0}\n",
     "sync.channels[0].multicast.port: expected an integer 1..65535, got 0 "
     "(conntrackd-py.yaml:4)"),
    ("node: {id: 1}\n" + CHANNEL + "metrics:\n  listen: localhost:9477\n",
     "metrics.listen: expected ADDRESS:PORT like '127.0.0.1:9477' or '[::1]:9477', got "
     "'localhost:9477' (conntrackd-py.yaml:6)"),
    ("node: {id: 1}\n" + CHANNEL + "metrics:\n  listen: '::1:9477'\n",
     "metrics.listen: expected ADDRESS:PORT like '127.0.0.1:9477' or '[::1]:9477', got "
     "'::1:9477' (conntrackd-py.yaml:6)"),
    ("node: {id: 1}\n" + CHANNEL + "general:\n  control_socket: /" + "x" * 120 + "\n",
     "general.control_socket: a UNIX socket path may be at most 107 bytes long "
     "(conntrackd-py.yaml:6)"),
    ("node: {id: 1}\n" + CHANNEL + "netlink: {reliable_events: maybe}\n",
     "netlink.reliable_events: expected true or false, got 'maybe' (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "netlink: [rcvbuf]\n",
     "netlink: expected a mapping of keys, got a list (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "  peers: 2\n",
     "sync.peers: expected a list, got 2 (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "stats:\n  accounting:\n    enabled: yes\n    file: [a]\n",
     "stats.accounting.file: expected a non-empty string, got a list (conntrackd-py.yaml:8)"),
    ("- node\n", "the top level must be a mapping of sections, got a list (conntrackd-py.yaml:1)"),
    ("", "node: is required: this node's identity, e.g. 'node: {id: 1}' (conntrackd-py.yaml)"),
    ("node:\n  id: 1\n  id: 2\n",
     "node.id: appears twice (first on line 2) (conntrackd-py.yaml:3)"),
    ("node: {id: 1\n", "not valid YAML: did not find expected ',' or '}' "
     "(conntrackd-py.yaml:2)"),
    ("node: {id: !!python/name:os.system 1}\n", "not valid YAML: could not determine a "
     "constructor for the tag 'tag:yaml.org,2002:python/name:os.system' (conntrackd-py.yaml:1)"),
])
def test_error_names_key_problem_file_and_line(text: str, message: str) -> None:
    assert error(text) == message


def test_error_fields_are_machine_readable() -> None:
    with pytest.raises(ConfigError) as e:
        loads("node:\n  id: 70000\n", "a.yaml")
    assert (e.value.key, e.value.filename, e.value.line) == ("node.id", "a.yaml", 2)
    assert e.value.problem == "expected an integer 1..65535, got 70000"


@pytest.mark.parametrize(("text", "message"), [
    ("nodes: {id: 1}\n", "nodes: unknown key (did you mean 'node'?) (conntrackd-py.yaml:1)"),
    ("node: {id: 1}\nsync:\n  chanels: []\n",
     "sync.chanels: unknown key (did you mean 'channels'?) (conntrackd-py.yaml:3)"),
    ("node: {id: 1}\n" + CHANNEL + "  ftfw:\n    ack_evry: 3\n",
     "sync.ftfw.ack_evry: unknown key (did you mean 'ack_every'?) (conntrackd-py.yaml:6)"),
    ("node: {id: 1}\nsync:\n  channels:\n    - multicast: {group: 225.0.0.50, iface: eth0}\n",
     "sync.channels[0].multicast.iface: unknown key (did you mean 'interface'?) "
     "(conntrackd-py.yaml:4)"),
    ("node: {id: 1}\n" + CHANNEL + "  mode: fftw\n",
     "sync.mode: expected one of 'ftfw', 'notrack', 'alarm', got 'fftw' (did you mean 'ftfw'?) "
     "(conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "logging: {level: warn}\n",
     "logging.level: expected one of 'debug', 'info', 'warning', 'error', got 'warn' "
     "(did you mean 'warning'?) (conntrackd-py.yaml:5)"),
    ("node: {id: 1}\n" + CHANNEL + "filters:\n  protocols: {acept: [tcp]}\n",
     "filters.protocols.acept: expected exactly one of 'accept: [...]' or 'ignore: [...]' "
     "(did you mean 'accept'?) (conntrackd-py.yaml:6)"),
    ("node: {id: 1}\n" + CHANNEL + "filters:\n  protocols: {accept: [tcp, tpc]}\n",
     "filters.protocols.accept[1]: expected a protocol name (icmp, tcp, udp, dccp, gre, "
     "icmpv6, sctp, udplite) or number 0..255, got 'tpc' (did you mean 'tcp'?) "
     "(conntrackd-py.yaml:6)"),
    ("node: {id: 1}\n" + CHANNEL + "filters:\n  tcp_states: {accept: [ESTABLISHD]}\n",
     "filters.tcp_states.accept[0]: expected a TCP state (SYN_SENT, SYN_RECV, ESTABLISHED, "
     "FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2), got 'ESTABLISHD' "
     "(did you mean 'ESTABLISHED'?) (conntrackd-py.yaml:6)"),
    ("node: {id: 1}\n" + CHANNEL + "filters:\n  addresses: {accept: [10.0.0.1/8]}\n",
     "filters.addresses.accept[0]: '10.0.0.1/8' is not an address or CIDR network like "
     "10.0.0.0/8 or fd00::/64 (did you mean '10.0.0.0/8'?) (conntrackd-py.yaml:6)"),
])
def test_misspellings_get_a_did_you_mean(text: str, message: str) -> None:
    assert error(text) == message


def test_unknown_key_with_nothing_close_lists_the_valid_keys() -> None:
    assert error("node: {id: 1, zzzzzz: 2}\n") == (
        "node.zzzzzz: unknown key; expected one of: id, name (conntrackd-py.yaml:1)")


def test_empty_accept_list_is_an_error_but_empty_ignore_list_accepts_all() -> None:
    assert error("node: {id: 1}\n" + CHANNEL + "filters:\n  protocols: {accept: []}\n") == (
        "filters.protocols.accept: an empty accept list would drop every flow; remove the "
        "filter to accept everything (conntrackd-py.yaml:6)")
    assert cfg("filters:\n  protocols: {ignore: []}\n").filters.protocols.items == ()


# --- values -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("65536", 65536), ("64MiB", 64 << 20), ("8M", 8 << 20), ("8MB", 8 << 20),
    ("512k", 512 << 10), ("512 KiB", 512 << 10), ("1.5MiB", 1536 << 10), ("1G", 1 << 30),
    ("'1048576'", 1 << 20), ("100000B", 100000),
])
def test_sizes_accept_integers_and_binary_units(text: str, value: int) -> None:
    assert cfg(f"netlink: {{rcvbuf: {text}}}\n").netlink.rcvbuf == value


@pytest.mark.parametrize("text", ["8MX", "1.1K", "-1", "true", "''", "8 M B", "2G"])
def test_bad_sizes_are_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^netlink\.rcvbuf: expected a size"):
        cfg(f"netlink: {{rcvbuf: {text}}}\n")


@pytest.mark.parametrize(("text", "seconds"), [
    ("2", 2.0), ("0.25", 0.25), ("200ms", 0.2), ("1s", 1.0), ("1.5s", 1.5), ("5m", 300.0),
    ("1h", 3600.0), ("0", 0.0), ("'30'", 30.0),
])
def test_durations_accept_seconds_and_units(text: str, seconds: float) -> None:
    c = loads("node: {id: 1}\n" + CHANNEL + f"  purge_timeout: {text}\n")
    assert c.sync.purge_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1", "1d", "true", ".nan", ".inf", "5 minutes", "'1s1'"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^sync\.purge_timeout: expected a duration"):
        loads("node: {id: 1}\n" + CHANNEL + f"  purge_timeout: {text}\n")


def test_positive_durations_reject_zero() -> None:
    assert error("node: {id: 1}\n" + CHANNEL + "  ftfw: {ack_interval: 0ms}\n") == (
        "sync.ftfw.ack_interval: must be longer than 0 (conntrackd-py.yaml:5)")


def test_filters_normalise_protocols_networks_and_tcp_states() -> None:
    f = cfg("filters:\n"
            "  protocols: {accept: [tcp, UDP, 47, icmpv6]}\n"
            "  addresses: {ignore: [10.0.0.0/8, 192.168.0.1, 'fd00::/64', '::1']}\n"
            "  tcp_states: {accept: [established, CLOSED, LISTEN, TIME_WAIT]}\n").filters
    assert (f.protocols.policy, f.protocols.items) == ("accept", (6, 17, 47, 58))
    assert f.addresses.policy == "ignore"
    assert f.addresses.items == tuple(ipaddress.ip_network(n) for n in (
        "10.0.0.0/8", "192.168.0.1/32", "fd00::/64", "::1/128"))
    assert f.tcp_states.items == (TcpState.ESTABLISHED, TcpState.CLOSE, TcpState.SYN_SENT2,
                                  TcpState.TIME_WAIT)
    assert 3 in f.tcp_states.items  # TcpState members are ints: the filter compares numbers


def test_addresses_are_stored_in_canonical_form() -> None:
    c = loads("node: {id: 1}\nsync:\n" + NO_AUTH + "  channels:\n"
              "    - multicast: {group: 'FF05:0::0001', interface: eth2}\n"
              "    - udp: {bind: 'fd00:0::1', peers: ['fd00::0002']}\n")
    assert c.sync.channels[0].multicast is not None
    assert c.sync.channels[0].multicast.group == "ff05::1"
    assert c.sync.channels[1].udp is not None
    assert (c.sync.channels[1].udp.bind, c.sync.channels[1].udp.peers) == (
        "fd00::1", ("fd00::2",))


def test_stats_mode_needs_no_channel() -> None:
    c = loads("node: {id: 7}\ngeneral: {mode: stats}\n")
    assert c.general.mode == "stats"
    assert c.sync.channels == ()


def test_metrics_listen_accepts_ipv4_and_bracketed_ipv6() -> None:
    assert cfg("metrics: {listen: '127.0.0.1:9477'}\n").metrics.listen == "127.0.0.1:9477"
    assert cfg("metrics: {listen: '[::1]:9477'}\n").metrics.listen == "[::1]:9477"


def test_null_means_default_or_none() -> None:
    c = cfg("general:\n  netns: ~\nstats:\nmetrics:\n  listen:\n")
    assert c.general.netns is None
    assert c.metrics.listen is None
    assert c.stats == default_config().stats


def test_yaml_anchors_and_merge_keys_work() -> None:
    c = loads("node: {id: 1}\nsync:\n" + NO_AUTH + "  channels:\n"
              "    - multicast: &link {group: 225.0.0.50, interface: eth2, ttl: 2}\n"
              "    - multicast: {<<: *link, group: 225.0.0.51}\n")
    m0, m1 = (ch.multicast for ch in c.sync.channels)
    assert m0 is not None
    assert m1 is not None
    assert (m1.group, m1.interface, m1.ttl) == ("225.0.0.51", "eth2", 2)


def test_strings_keep_what_was_written() -> None:
    c = loads("node: {id: 1, name: 1234}\nsync:\n" + NO_AUTH + "  channels:\n"
              "    - multicast: {group: 225.0.0.50, interface: 1234}\n")
    assert c.node.name == "1234"
    assert c.sync.channels[0].multicast is not None
    assert c.sync.channels[0].multicast.interface == "1234"


@given(st.text(max_size=200))
def test_any_text_either_loads_or_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        loads(text)


@given(st.integers(min_value=64 << 10, max_value=1 << 30))
def test_sizes_round_trip_in_every_unit(n: int) -> None:
    assert cfg(f"netlink: {{rcvbuf: {n}}}\n").netlink.rcvbuf == n
    if n % 1024 == 0:
        assert cfg(f"netlink: {{rcvbuf: {n // 1024}KiB}}\n").netlink.rcvbuf == n


# --- files and keys ---------------------------------------------------------------------------

def test_load_names_the_file_in_errors_and_records_the_path(tmp_path: Path) -> None:
    p = tmp_path / "fw.yaml"
    p.write_text("node: {id: 1}\n" + CHANNEL)
    assert load(p).path == str(p)
    p.write_text("node: {id: 1}\n" + CHANNEL + "  mtu: 10\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert str(e.value) == f"sync.mtu: expected an integer 576..9000, got 10 ({p}:5)"


def test_load_rejects_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"node: {id: 1}\n# \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 16\)"):
        load(p)


def test_load_lets_a_missing_file_raise_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "none.yaml")


def test_load_keys_reads_hex_and_raw_keys_in_order(tmp_path: Path) -> None:
    hexfile, rawfile = tmp_path / "a.key", tmp_path / "b.key"
    key_file(hexfile, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n")
    key_file(rawfile, bytes(range(100, 124)), 0o400)
    keys = load_keys(Auth(key_files=(str(hexfile), str(rawfile))))
    assert keys == (bytes.fromhex("00112233445566778899aabbccddeeff" * 2),
                    bytes(range(100, 124)))
    assert load_keys(Auth(required=False)) == ()


def test_load_keys_rejects_short_keys_naming_the_file(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    key_file(short, "deadbeef\n")
    with pytest.raises(ConfigError) as e:
        load_keys(Auth(key_files=(str(short),)))
    assert str(e.value).startswith("sync.auth.key_files[0]: the key is 4 bytes; 16..64 are "
                                   "needed")
    assert str(e.value).endswith(f"({short})")


def test_load_keys_rejects_long_and_repeated_keys(tmp_path: Path) -> None:
    long, a, b = tmp_path / "long.key", tmp_path / "a.key", tmp_path / "b.key"
    key_file(long, b"\x01" * 65)
    key_file(a, "ab" * 32)
    key_file(b, b"\xab" * 32)  # the same key, raw
    with pytest.raises(ConfigError, match=r"^sync\.auth\.key_files\[0\]: the key is 65 bytes"):
        load_keys(Auth(key_files=(str(long),)))
    with pytest.raises(ConfigError) as e:
        load_keys(Auth(key_files=(str(a), str(b))))
    assert str(e.value) == (
        f"sync.auth.key_files[1]: holds the same key as sync.auth.key_files[0] ({b})")


def test_load_keys_reports_an_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.key")
    with pytest.raises(ConfigError) as e:
        load_keys(Auth(key_files=(missing,)))
    assert str(e.value) == (
        "sync.auth.key_files[0]: cannot read key file: No such file or directory; make one "
        f"with: head -c 32 /dev/urandom > {missing} && chmod 600 {missing} (the same key on "
        f"every node) ({missing})")


def test_key_files_are_not_read_when_parsing() -> None:
    c = cfg("sync:\n  auth: {key_files: [/nonexistent/sync.key]}\n"
            "  channels:\n    - multicast: {group: 225.0.0.50}\n")
    assert c.sync.auth.key_files == ("/nonexistent/sync.key",)


def test_embedded_default_yaml_is_what_default_config_parses() -> None:
    assert dataclasses.replace(loads(DEFAULT_YAML), path=None) == default_config()


# --- keepalived: the daemon follows keepalived's notify FIFO (#14) -----------------------------

def test_keepalived_fifo_is_off_by_default_and_takes_an_absolute_path_and_names() -> None:
    assert (cfg("").keepalived.notify_fifo, cfg("").keepalived.instances) == (None, ())
    k = cfg("keepalived: {notify_fifo: /run/conntrackd-py/ka.fifo, instances: [VI_1, G 2]}\n"
            ).keepalived
    assert (k.notify_fifo, k.instances) == ("/run/conntrackd-py/ka.fifo", ("VI_1", "G 2"))


@pytest.mark.parametrize(("text", "key", "why"), [
    ("keepalived: {notify_fifo: run/ka.fifo}", "keepalived.notify_fifo", "not an absolute path"),
    ('keepalived: {instances: [\'a"b\']}', "keepalived.instances[0]", "instance name"),
    ("keepalived: {instances: [" + "x" * 65 + "]}", "keepalived.instances[0]", "1..64"),
    ("keepalived: {instances: [VI_1, VI_1]}", "keepalived.instances[1]", ""),
    ("keepalived: {fifo: /x}", "keepalived.fifo", "unknown key"),
])
def test_keepalived_settings_are_checked(text: str, key: str, why: str) -> None:
    msg = error("node: {id: 1}\n" + CHANNEL + text + "\n")
    assert msg.startswith(key + ":"), msg
    assert why in msg


# --- stats.accounting.ipfix (#17) ---------------------------------------------------------------

def test_ipfix_is_off_by_default_and_takes_collectors_as_written() -> None:
    assert cfg("").stats.accounting.ipfix.collectors == ()
    x = cfg("stats: {accounting: {enabled: true, ipfix: {collectors: ['10.0.0.1:4739', "
            "'[fd00::1]:4739', 10.0.0.2], template_refresh: 30s, template_refresh_packets: 20, "
            "observation_domain: 7, mtu: 9000}}}\n").stats.accounting
    assert x.enabled
    assert (x.file, x.syslog) == (None, False)  # collectors alone are a valid sink
    i = x.ipfix
    assert i.collectors == ("10.0.0.1:4739", "[fd00::1]:4739", "10.0.0.2")
    assert (i.template_refresh, i.template_refresh_packets, i.observation_domain, i.mtu) == (
        30.0, 20, 7, 9000)


@pytest.mark.parametrize(("value", "key", "why"), [
    ("{collectors: [collector.example:4739]}", "collectors[0]", "is not a collector"),
    ("{collectors: ['10.0.0.1:0']}", "collectors[0]", "out of range"),
    ("{collectors: ['10.0.0.1:4739', '10.0.0.1']}", "collectors[1]", ""),  # same place twice
    ("{collectors: ['[fd00::1']}", "collectors[0]", "is not a collector"),
    ("{mtu: 500}", "mtu", "576..65535"),
    ("{observation_domain: 4294967296}", "observation_domain", ""),
    ("{template_refresh: 0}", "template_refresh", ""),
])
def test_ipfix_settings_are_checked(value: str, key: str, why: str) -> None:
    msg = error("node: {id: 1}\n" + CHANNEL + f"stats: {{accounting: {{ipfix: {value}}}}}\n")
    assert msg.startswith(f"stats.accounting.ipfix.{key}:"), msg
    assert why in msg
