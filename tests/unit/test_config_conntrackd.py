"""`config.load` reads a conntrackd.conf natively (issue #14: `-C` with conntrackd's own file).

The fixtures are Debian's conntrackd 1.4.7 example configs, unchanged (tests/data/conntrackd/
README.md). Every mapped key must hold the value the file says, or conntrackd's default where
the file says nothing; what is not mapped is named in one warning line.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conntrackd_py.config import (
    Config,
    ConfigError,
    auth_off,
    is_conntrackd_conf,
    load,
    loads,
    origin_of,
    to_dict,
)
from conntrackd_py.importconf import AUTH_NOTE, derive_node_id

DATA = Path(__file__).parent.parent / "data" / "conntrackd"
SYNC = ("sync-ftfw.conf", "sync-notrack.conf", "sync-alarm.conf")
# the Address Ignore list of the three sync examples
EXAMPLE_IGNORE = ("127.0.0.1", "192.168.0.100", "192.168.1.100", "192.168.0.1", "192.168.1.1",
                  "192.168.100.100")
# lines of what the examples set and conntrackd-py has no equivalent for (HashSize, HashLimit)
UNMAPPED = {"sync-ftfw.conf": (256, 264), "sync-notrack.conf": (295, 303),
            "sync-alarm.conf": (233, 241), "stats.conf": (16, 22)}


def nets(*addrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(a) for a in addrs)


@pytest.mark.parametrize("name", SYNC)
def test_debian_sync_examples_load_with_every_mapped_value(name: str) -> None:
    c = load(DATA / name)
    assert c.path == str(DATA / name)
    assert c.general.mode == "sync"
    assert c.sync.mode == name.removeprefix("sync-").removesuffix(".conf")
    (ch,) = c.sync.channels
    m = ch.multicast
    assert m is not None
    # Multicast { IPv4_address 225.0.0.50  Group 3780  IPv4_interface 192.168.100.100
    #             Interface eth2  SndSocketBuffer 1249280  RcvSocketBuffer 1249280 }
    assert (m.group, m.port, m.source, m.interface) == ("225.0.0.50", 3780, "192.168.100.100",
                                                        "eth2")  # eth2 need not exist here
    assert (m.sndbuf, m.rcvbuf) == (1249280, 1249280)
    assert (c.general.lock_file, c.general.control_socket) == ("/var/lock/conntrack.lock",
                                                               "/var/run/conntrackd.ctl")
    # LogFile on: conntrackd's default file
    assert (c.logging.target, c.logging.file) == ("file", "/var/log/conntrackd.log")
    f = c.filters
    assert (f.protocols.policy, f.protocols.items) == ("accept", (6, 132, 33))  # TCP SCTP DCCP
    assert (f.addresses.policy, f.addresses.items) == ("ignore", nets(*EXAMPLE_IGNORE))
    assert f.tcp_states.items == ()
    # not in the file: conntrackd's defaults (PurgeTimeout 60, CommitTimeout unset)
    assert (c.sync.purge_timeout, c.sync.commit_timeout) == (60.0, None)
    # conntrackd has no authentication: neither has the config, and it says so
    assert c.sync.auth.required is False
    assert c.sync.auth.key_files == ()
    assert auth_off(c)
    assert AUTH_NOTE in c.import_notes
    assert c.node.id == 100  # the last byte of IPv4_interface 192.168.100.100
    if c.sync.mode == "alarm":  # RefreshTime 15, CacheTimeout 180
        assert (c.sync.alarm.refresh, c.sync.alarm.cache_timeout) == (15.0, 180.0)


@pytest.mark.parametrize("name", [*SYNC, "stats.conf"])
def test_one_warning_line_names_what_was_derived_and_not_mapped(name: str) -> None:
    c = load(DATA / name)
    w = c.import_warning
    assert w is not None
    assert "\n" not in w
    assert w.startswith(f"{DATA / name} read as a conntrackd.conf: ")
    hashsize, hashlimit = UNMAPPED[name]
    assert f"not mapped: HashSize (line {hashsize}), HashLimit (line {hashlimit})" in w
    assert "approximated: NetlinkBufferSizeMaxGrowth" in w
    sync = name != "stats.conf"
    assert ("node.id 100 derived from the sync address" in w) == sync
    assert ("no authentication" in w) == sync
    for line in (hashsize, hashlimit):  # and each note in full, with its line
        assert any(n.startswith(f"{DATA / name}:{line}: ") for n in c.import_notes)


def test_debian_stats_example_loads_as_stats_mode_with_conntrackds_log_file() -> None:
    c = load(DATA / "stats.conf")
    assert c.general.mode == "stats"
    assert c.sync.channels == ()
    a = c.stats.accounting
    # Stats { LogFile on }: conntrackd's DEFAULT_STATS_LOGFILE, in its text format
    assert (a.enabled, a.file, a.format, a.syslog) == (
        True, "/var/log/conntrackd-stats.log", "text", False)
    assert (c.filters.protocols.policy, c.filters.protocols.items) == ("accept", (6,))
    assert c.filters.addresses.items == nets("127.0.0.1")
    assert not auth_off(c)
    assert (c.logging.target, c.logging.file) == ("stderr", None)  # General has no LogFile


@pytest.mark.parametrize("name", [*SYNC, "stats.conf"])
def test_check_accepts_the_debian_examples(name: str) -> None:
    r = subprocess.run([sys.executable, "-m", "conntrackd_py.cli", "--check", "-C",
                        str(DATA / name)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "is valid" in r.stdout


TUNED = """\
Sync {
\tMode FTFW {
\t\tResendQueueSize 262144
\t\tACKWindowSize 300
\t\tDisableExternalCache on
\t\tCommitTimeout 180
\t\tPurgeTimeout 15
\t\tStartupResync on
\t}
\tUDP {
\t\tIPv4_address 172.16.0.2
\t\tIPv4_Destination_Address 172.16.0.1
\t\tPort 3781
\t\tInterface eth3
\t}
\tOptions {
\t\tTCPWindowTracking on
\t}
}
General {
\tLogFile /var/log/ct/own.log
\tNetlinkEventsReliable on
\tFilter From Kernelspace {
\t\tAddress Accept {
\t\t\tIPv4_address 10.0.0.0/8
\t\t\tIPv6_address fd00::/8
\t\t}
\t\tState Accept {
\t\t\tESTABLISHED CLOSED TIME_WAIT CLOSE_WAIT for TCP
\t\t}
\t}
}
"""


def test_every_mapped_sync_option_keeps_its_value(tmp_path: Path) -> None:
    p = tmp_path / "conntrackd.conf"
    p.write_text(TUNED)
    c = load(p)
    s = c.sync
    assert (s.mode, s.ftfw.resend_queue, s.ftfw.ack_every) == ("ftfw", 262144, 300)
    assert (s.commit_timeout, s.purge_timeout) == (180.0, 15.0)
    assert (s.external_cache, s.startup_resync, s.tcp_window_tracking) == (False, True, True)
    (ch,) = s.channels
    assert ch.udp is not None
    assert (ch.udp.bind, ch.udp.peers, ch.udp.port, ch.udp.interface) == (
        "172.16.0.2", ("172.16.0.1",), 3781, "eth3")
    assert c.node.id == 2
    assert (c.logging.target, c.logging.file) == ("file", "/var/log/ct/own.log")
    assert c.netlink.reliable_events
    assert (c.filters.addresses.policy, c.filters.addresses.items) == (
        "accept", nets("10.0.0.0/8", "fd00::/8"))
    assert c.filters.tcp_states.policy == "accept"
    assert len(c.filters.tcp_states.items) == 4
    assert c.import_warning is not None
    assert "approximated: Filter (line 23)" in c.import_warning  # user-space filtering


def test_a_conntrackd_conf_reloads_equal_and_its_schema_round_trips() -> None:
    a, b = load(DATA / "sync-ftfw.conf"), load(DATA / "sync-ftfw.conf")
    assert a == b
    back = loads(yaml.safe_dump(to_dict(a)))
    assert back == Config(**{**{k: getattr(a, k) for k in a.__dataclass_fields__},
                             "path": None, "import_warning": None, "import_notes": ()})


# --- which syntax a file is in -----------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Sync {\n}\n", "# a comment\n\n  General{\n}\n", "Stats\n{\n}\n", "sync {", "HELPER {\n}",
])
def test_conntrackd_syntax_is_recognised(text: str) -> None:
    assert is_conntrackd_conf(text)


@pytest.mark.parametrize("text", [
    "", "# only a comment\n", "sync:\n  mode: ftfw\n", "node: {id: 1}\n", "Sync\nmode: x\n",
    "general: {mode: stats}\n", "Mode FTFW {\n}\n", "{Sync}\n",
])
def test_yaml_and_other_text_is_not_taken_for_conntrackd_syntax(text: str) -> None:
    assert not is_conntrackd_conf(text)


def test_shipped_yaml_configs_are_read_as_yaml() -> None:
    root = Path(__file__).parent.parent.parent / "config"
    for p in [root / "conntrackd-py.yaml", *sorted((root / "examples").glob("*.yaml"))]:
        assert not is_conntrackd_conf(p.read_text()), p


# --- errors name the conntrackd.conf ----------------------------------------------------------

def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "conntrackd.conf"
    p.write_text("Sync {\n Mode FTFW {\n }\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert (e.value.filename, e.value.line) == (str(p), 1)
    assert "never closed" in e.value.problem


def test_a_value_out_of_range_names_our_key_and_the_conntrackd_conf(tmp_path: Path) -> None:
    p = tmp_path / "conntrackd.conf"
    p.write_text((DATA / "sync-ftfw.conf").read_text().replace("Group 3780", "Group 70000"))
    with pytest.raises(ConfigError) as e:
        load(p)
    assert e.value.key == "sync.channels[0].multicast.port"
    group_line = p.read_text().splitlines().index("\t\tGroup 70000") + 1
    assert (e.value.filename, e.value.line) == (str(p), group_line)
    assert e.value.problem.endswith("(from 'Group 70000', read as "
                                    "sync.channels[0].multicast.port)")


def test_an_error_inside_a_list_names_the_block_that_made_it(tmp_path: Path) -> None:
    p = tmp_path / "conntrackd.conf"
    p.write_text(TUNED.replace("\t\tIPv4_Destination_Address 172.16.0.1\n",
                               "\t\tIPv4_Destination_Address 172.16.0.1\n"
                               "\t\tIPv6_Destination_Address fd00::7\n"))
    with pytest.raises(ConfigError) as e:
        load(p)
    assert e.value.key == "sync.channels[0].udp.peers[1]"
    assert e.value.line == 10  # the UDP block
    assert "read as sync.channels[0].udp.peers[1]" in e.value.problem


# --- node ids ---------------------------------------------------------------------------------

A = ipaddress.ip_address


def test_node_id_is_the_last_byte_when_the_clusters_last_bytes_differ() -> None:
    assert derive_node_id(A("10.0.3.1"), []) == (1, 8)
    assert derive_node_id(A("10.0.3.2"), [A("10.0.3.1")]) == (2, 8)
    assert derive_node_id(A("fd00:3::2"), [A("fd00:3::1")]) == (2, 8)


def test_node_ids_take_two_bytes_on_both_nodes_when_last_bytes_collide() -> None:
    # 10.0.1.5 and 10.0.2.5: both would be 5; each node sees the same pair, so both widen
    assert derive_node_id(A("10.0.1.5"), [A("10.0.2.5")]) == (0x0105, 16)
    assert derive_node_id(A("10.0.2.5"), [A("10.0.1.5")]) == (0x0205, 16)
    assert derive_node_id(A("10.0.1.0"), []) == (0x0100, 16)  # a zero last byte too


def test_node_ids_that_cannot_differ_are_none() -> None:
    assert derive_node_id(A("10.1.0.5"), [A("10.2.0.5")]) == (None, 16)
    assert derive_node_id(A("10.1.0.0"), []) == (None, 16)


def test_a_conntrackd_conf_whose_node_id_cannot_be_derived_is_refused_with_the_fix(
        tmp_path: Path) -> None:
    p = tmp_path / "conntrackd.conf"
    p.write_text(TUNED.replace("172.16.0.2", "172.16.1.1").replace("172.16.0.1", "172.17.1.1"))
    with pytest.raises(ConfigError) as e:
        load(p)
    assert (e.value.key, e.value.filename) == ("node.id", str(p))
    assert "share their last two bytes" in e.value.problem
    assert "set node.id" in e.value.problem
    p.write_text("Sync {\n Mode FTFW {\n }\n Multicast {\n  IPv4_address 225.0.0.50\n }\n}\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert "IPv4_interface" in e.value.problem


def test_a_derived_node_id_says_how_collisions_show() -> None:
    c = load(DATA / "sync-ftfw.conf")
    (note,) = [n for n in c.import_notes if n.startswith("node.id:")]
    assert "100 was derived from the last byte of this node's sync address 192.168.100.100" \
        in note
    assert "a duplicate id is reported at run time" in note


# --- hostile conntrackd.conf text -------------------------------------------------------------

WORDS = ["Sync", "General", "Stats", "Mode", "FTFW", "NOTRACK", "ALARM", "Multicast", "UDP",
         "Default", "IPv4_address", "IPv6_address", "IPv4_interface", "Interface", "Group",
         "Port", "IPv4_Destination_Address", "Filter", "From", "Userspace", "Kernelspace",
         "Protocol", "Address", "State", "Accept", "Ignore", "for", "TCP", "ESTABLISHED",
         "LogFile", "Syslog", "on", "off", "LockFile", "UNIX", "Path", "PurgeTimeout",
         "CommitTimeout", "ResendQueueSize", "ACKWindowSize", "RefreshTime", "CacheTimeout",
         "NetlinkBufferSize", "NetlinkOverrunResync", "Options", "TCPWindowTracking",
         "HashSize", "Checksum", "225.0.0.50", "10.0.0.1", "10.0.0.0/8", "fd00::1", "::/0",
         "0", "3780", "65536", "99999999999999999999", "9" * 5000, "²", "٣", "-1", "1.5",
         "eth0", "/var/log/x", '"a b"', "\x00", "\x1b[31m", "é", "{", "}", "#"]
CONF = st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=60).map(
    lambda ws: "".join(w + (" " if i % 3 else "\n") for i, w in enumerate(ws)))


def _outcome(text: str) -> None:
    try:
        cfg = loads(text, "fuzz.conf")
    except ConfigError:
        return
    assert isinstance(cfg, Config)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.sampled_from(["Sync {\n", "General {\n", "Stats {\n", "Sync {\n Mode FTFW {\n"]),
       CONF, st.integers(0, 3))
def test_any_conntrackd_like_text_loads_or_raises_config_error(head: str, body: str,
                                                              closing: int) -> None:
    text = head + body + "}\n" * closing
    assert is_conntrackd_conf(text)
    _outcome(text)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.sampled_from((*SYNC, "stats.conf")), st.integers(0, 10**6), st.sampled_from(WORDS))
def test_a_debian_example_with_one_word_replaced_loads_or_raises_config_error(
        name: str, at: int, word: str) -> None:
    words = (DATA / name).read_text().split(" ")
    words[at % len(words)] = word
    _outcome(" ".join(words))


def test_a_conntrackd_conf_in_a_file_goes_through_the_same_bounds(tmp_path: Path) -> None:
    p = tmp_path / "deep.conf"
    p.write_text("Sync {\n" + "A {\n" * 100 + "}\n" * 101)
    with pytest.raises(ConfigError) as e:
        load(p)
    assert "nested deeper" in e.value.problem
    p.write_bytes(b"Sync {\n \xff\n}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(p)


@pytest.mark.parametrize(("text", "key"), [
    # a rule across keys: named by one of them; a required key missing: by its block
    ("Sync {\n Mode ALARM {\n  RefreshTime 10\n  CacheTimeout 5\n }\n Multicast {\n"
     "  IPv4_address 225.0.0.50\n  IPv4_interface 10.0.0.1\n }\n}\n",
     "sync.alarm.cache_timeout"),
    ("Sync {\n Mode FTFW {\n }\n UDP {\n  IPv4_address 10.0.0.1\n }\n}\n",
     "sync.channels[0].udp.peers"),
])
def test_errors_on_keys_without_a_statement_of_their_own_name_the_nearest(text: str,
                                                                          key: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(text, "c.conf")
    assert e.value.key == key


def test_the_origin_of_a_key_is_its_own_or_its_closest_parents() -> None:
    origins = {"sync.channels[0].udp": (10, "UDP"), "sync.mode": (2, "Mode FTFW")}
    assert origin_of("sync.channels[0].udp.peers[1]", origins) == (10, "UDP")
    assert origin_of("sync.mode", origins) == (2, "Mode FTFW")
    for key in ("sync", "sync.channels", "node.id", "", "[3]", "a..b"):  # none: and it ends
        assert origin_of(key, origins) is None
