"""importconf.py: conntrackd.conf -> conntrackd-py YAML, with what could not be mapped."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conntrackd_py.config import Config, auth_off, loads
from conntrackd_py.flow import TcpState
from conntrackd_py.importconf import AUTH_NOTE, ConfSyntaxError, Stmt, convert, main, parse

# A primary-backup firewall as people run it: the Debian FTFW example, tuned, with a second
# (Default) link, filters, and a few options conntrackd-py has no equivalent for.
PRIMARY_BACKUP = """\
# conntrackd.conf of fw1 (primary-backup, FTFW)
Sync {
\tMode FTFW {
\t\tResendQueueSize 262144
\t\tACKWindowSize 300
\t\tDisableExternalCache Off
\t\tCommitTimeout 180
\t\tPurgeTimeout 15
\t\tStartupResync on
\t}
\tMulticast {
\t\tIPv4_address 225.0.0.50
\t\tGroup 3780
\t\tIPv4_interface 192.168.100.1
\t\tInterface eth2
\t\tSndSocketBuffer 1249280
\t\tRcvSocketBuffer 1249280
\t\tChecksum on
\t}
\tMulticast Default {
\t\tIPv4_address 225.0.0.51
\t\tGroup 3781
\t\tIPv4_interface 192.168.101.1
\t\tInterface eth3
\t}
\tOptions {
\t\tTCPWindowTracking Off
\t\tExpectationSync On
\t}
}
General {
\tSystemd on
\tHashSize 32768
\tHashLimit 131072
\tLogFile on
\tSyslog on
\tLockFile /var/lock/conntrack.lock
\tUNIX {
\t\tPath /var/run/conntrackd.ctl
\t\tBacklog 20
\t}
\tNetlinkBufferSize 2097152
\tNetlinkBufferSizeMaxGrowth 134217728
\tNetlinkOverrunResync Off
\tNetlinkEventsReliable On
\tFilter From Userspace {
\t\tProtocol Accept {
\t\t\tTCP
\t\t\tSCTP
\t\t\tDCCP
\t\t\tUDP
\t\t\tIPv6-ICMP # needs Linux >= 2.6.31
\t\t}
\t\tAddress Ignore {
\t\t\tIPv4_address 127.0.0.1 # loopback
\t\t\tIPv4_address 192.168.0.100 # virtual IP 1
\t\t\tIPv4_address 192.168.100.0/24 # dedicated link
\t\t\tIPv6_address ::1
\t\t}
\t\tState Accept {
\t\t\tESTABLISHED CLOSED TIME_WAIT CLOSE_WAIT for TCP
\t\t}
\t}
}
"""

UDP_CONF = """\
Sync {
    Mode NOTRACK {
        DisableInternalCache On
        DisableExternalCache On
    }
    UDP {
        IPv4_address 172.16.0.12
        IPv4_Destination_Address 172.16.0.11
        Port 3781
        Interface eth3
        Checksum off
    }
    TCP {
        IPv4_address 172.16.0.12
    }
}
General {
    LockFile "/run/conntrackd.lock"
    LogFile /var/log/ctd.log
}
"""


def converted(text: str) -> tuple[Config, list[str], str]:
    out, notes = convert(text, "conntrackd.conf")
    return loads(out, "converted.yaml"), notes, out


# --- the realistic primary-backup config ------------------------------------------------------

def test_primary_backup_conf_converts_to_a_config_that_loads() -> None:
    c, _, _ = converted(PRIMARY_BACKUP)
    s = c.sync
    assert c.general.mode == "sync"
    assert s.mode == "ftfw"
    assert (s.ftfw.resend_queue, s.ftfw.ack_every) == (262144, 300)
    assert s.external_cache is True
    assert s.tcp_window_tracking is False
    assert (s.commit_timeout, s.purge_timeout, s.startup_resync) == (180.0, 15.0, True)
    assert c.general.lock_file == "/var/lock/conntrack.lock"
    assert c.general.control_socket == "/var/run/conntrackd.ctl"
    assert c.netlink.rcvbuf == 134217728  # MaxGrowth: conntrackd's buffer reaches it
    assert c.netlink.reliable_events
    assert not c.netlink.overrun_resync
    # `LogFile on`: conntrackd's own default file (conntrackd.h DEFAULT_LOGFILE)
    assert (c.logging.target, c.logging.file) == ("file", "/var/log/conntrackd.log")


def test_the_default_link_comes_first() -> None:
    c, _, _ = converted(PRIMARY_BACKUP)
    first, second = (ch.multicast for ch in c.sync.channels)
    assert first is not None
    assert second is not None
    assert (first.group, first.port, first.source, first.interface) == (
        "225.0.0.51", 3781, "192.168.101.1", "eth3")
    assert (second.group, second.port, second.source, second.interface) == (
        "225.0.0.50", 3780, "192.168.100.1", "eth2")
    assert (second.sndbuf, second.rcvbuf) == (1249280, 1249280)


def test_filters_are_mapped_to_our_names() -> None:
    f = converted(PRIMARY_BACKUP)[0].filters
    assert (f.protocols.policy, f.protocols.items) == ("accept", (6, 132, 33, 17, 58))
    assert f.addresses.policy == "ignore"
    assert f.addresses.items == tuple(ipaddress.ip_network(a) for a in (
        "127.0.0.1/32", "192.168.0.100/32", "192.168.100.0/24", "::1/128"))
    assert (f.tcp_states.policy, f.tcp_states.items) == ("accept", (
        TcpState.ESTABLISHED, TcpState.CLOSE, TcpState.TIME_WAIT, TcpState.CLOSE_WAIT))


def test_node_id_comes_from_the_default_links_address_and_is_reported() -> None:
    c, notes, _ = converted(PRIMARY_BACKUP)
    assert c.node.id == 1  # 192.168.101.1
    assert notes[-1].startswith("node.id: conntrackd has no node id; 1 was derived from the "
                                "last byte of this node's sync address 192.168.101.1")


def test_what_cannot_be_mapped_is_listed_with_its_line() -> None:
    _, notes, out = converted(PRIMARY_BACKUP)
    expected = [
        "conntrackd.conf:28: ExpectationSync On: expectations are not replicated",
        "conntrackd.conf:32: Systemd on: no equivalent option",
        "conntrackd.conf:33: HashSize 32768: no equivalent",
        "conntrackd.conf:34: HashLimit 131072: no equivalent",
        "conntrackd.conf:36: Syslog on: conntrackd-py logs to one place; kept logging to file",
    ]
    assert len(notes) == len(expected) + 2  # and sync.auth, node.id
    for note, start in zip(notes, expected, strict=False):
        assert note.startswith(start), note
    for note in notes:  # the YAML carries them too, as comments
        assert f"#   - {note}" in out


def test_sync_runs_without_auth_as_conntrackd_did_and_says_so_in_a_note_and_a_comment() -> None:
    c, notes, out = converted(PRIMARY_BACKUP)
    assert c.sync.auth.required is False
    assert c.sync.auth.key_files == ()
    assert auth_off(c)
    assert notes[-2] == AUTH_NOTE
    assert AUTH_NOTE.startswith("sync.auth.required: false: conntrackd has no authentication")
    assert "head -c 32 /dev/urandom > /etc/conntrackd-py/sync.key" in AUTH_NOTE
    # the comment sits right above the setting it explains
    auth = out[out.index("\n  auth:\n"):]
    lines = auth.splitlines()[2:7]
    assert [ln.lstrip()[:1] for ln in lines] == ["#", "#", "#", "#", "r"]
    assert lines[-1] == "    required: false"
    assert "conntrackd has no authentication" in lines[0]


def test_limits_are_not_written_their_defaults_apply() -> None:
    c, _, out = converted(PRIMARY_BACKUP)
    assert "limits" not in out
    assert c.sync.limits == type(c.sync.limits)()


def test_stats_only_conf_needs_no_auth_setting() -> None:
    c, notes, out = converted("General {\n LockFile /var/lock/ct.lock\n}\n")
    assert "auth" not in out
    assert AUTH_NOTE not in notes
    assert not auth_off(c)


def test_ftfw_backup_node_gets_a_different_id() -> None:
    fw2 = PRIMARY_BACKUP.replace("192.168.100.1\n", "192.168.100.2\n").replace(
        "192.168.101.1\n", "192.168.101.2\n")
    assert converted(fw2)[0].node.id == 2


# --- other modes and channels -----------------------------------------------------------------

def test_udp_notrack_conf_converts() -> None:
    c, notes, _ = converted(UDP_CONF)
    assert c.sync.mode == "notrack"
    assert c.sync.external_cache is False
    (ch,) = c.sync.channels
    assert ch.udp is not None
    assert (ch.udp.bind, ch.udp.peers, ch.udp.port, ch.udp.interface) == (
        "172.16.0.12", ("172.16.0.11",), 3781, "eth3")
    assert c.node.id == 12
    assert c.general.lock_file == "/run/conntrackd.lock"  # quotes removed
    assert (c.logging.target, c.logging.file) == ("file", "/var/log/ctd.log")
    text = "\n".join(notes)
    assert "conntrackd.conf:3: DisableInternalCache On: conntrackd-py always keeps" in text
    assert "conntrackd.conf:11: Checksum off: datagrams are always checksummed" in text
    assert "conntrackd.conf:13: TCP: TCP channels are not supported" in text


def test_alarm_mode_maps_refresh_and_cache_timeout() -> None:
    c, _, _ = converted("Sync {\n Mode ALARM {\n  RefreshTime 10\n  CacheTimeout 40\n }\n"
                        " Multicast {\n  IPv4_address 225.0.0.50\n  Group 3780\n }\n}\n")
    assert c.sync.mode == "alarm"
    assert (c.sync.alarm.refresh, c.sync.alarm.cache_timeout) == (10.0, 40.0)


def test_stats_only_conf_becomes_stats_mode_with_accounting() -> None:
    c, notes, _ = converted("General {\n LockFile /var/lock/ct.lock\n}\n"
                            "Stats {\n LogFile on\n Syslog on\n}\n")
    assert c.general.mode == "stats"
    assert c.sync.channels == ()
    a = c.stats.accounting
    # conntrackd.h DEFAULT_STATS_LOGFILE
    assert (a.enabled, a.file, a.syslog) == (True, "/var/log/conntrackd-stats.log", True)
    assert not any(n.startswith("node.id") for n in notes)  # stats mode has no peers


def test_sync_without_an_address_gets_placeholder_node_id_and_a_note() -> None:
    c, notes, _ = converted("Sync {\n Mode FTFW {\n }\n Multicast {\n"
                            "  IPv4_address 225.0.0.50\n }\n}\n")
    assert c.node.id == 1
    assert notes == [AUTH_NOTE, "node.id: conntrackd has no node id and no sync address to "
                     "derive one from; set node.id (1..65535, different on every node) instead "
                     "of the placeholder 1"]


def test_small_netlink_buffers_keep_our_default_with_a_note() -> None:
    c, notes, _ = converted("General {\n NetlinkBufferSize 2097152\n"
                            " NetlinkBufferSizeMaxGrowth 8388608\n}\n")
    assert c.netlink.rcvbuf == 64 << 20
    assert notes[0].startswith("conntrackd.conf:3: NetlinkBufferSizeMaxGrowth 8388608: "
                               "conntrackd-py's netlink buffer is fixed")


def test_unknown_options_and_bad_values_are_reported_not_dropped() -> None:
    _, notes, _ = converted("Sync {\n Mode FTFW {\n  ResendQueueSize lots\n  Bogus 1\n }\n"
                            " Multicast {\n  IPv4_address 225.0.0.50\n }\n}\nHelper {\n}\n"
                            "General {\n Filter {\n  Protocol Accept {\n   XYZ\n  }\n"
                            "  Address Ignore {\n   IPv4_address 300.0.0.1\n  }\n }\n}\n")
    text = "\n".join(notes)
    assert "conntrackd.conf:3: ResendQueueSize lots: 'lots' is not a valid int value" in text
    assert "conntrackd.conf:4: Bogus 1: not recognised; not converted" in text
    assert "conntrackd.conf:10: Helper: not a conntrackd-py feature" in text
    assert "conntrackd.conf:15: XYZ: unknown protocol 'XYZ'" in text
    assert "conntrackd.conf:18: IPv4_address 300.0.0.1: not an address or network" in text
    assert "conntrackd.conf:14: Protocol Accept: nothing left to accept; not converted" in text


def test_conflicting_filter_policies_keep_the_first() -> None:
    c, notes, _ = converted("General {\n Filter {\n  Protocol Accept { TCP }\n"
                            "  Protocol Ignore { UDP }\n }\n}\n")
    assert (c.filters.protocols.policy, c.filters.protocols.items) == ("accept", (6,))
    assert notes[0].startswith("conntrackd.conf:4: Protocol Ignore: conflicts with the earlier "
                               "accept list")


#: conntrack-tools' example configurations, copied into the tests (tests/data/conntrackd/
#: README.md): the test does not depend on the conntrackd package being installed
EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "conntrackd"
EXAMPLE_NAMES = ("sync-ftfw.conf", "sync-notrack.conf", "sync-alarm.conf", "stats.conf")


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_conntrackd_examples_convert_to_valid_configs(name: str) -> None:
    converted((EXAMPLES / name).read_text())  # a missing copy fails (FileNotFoundError)


# --- the parser -------------------------------------------------------------------------------

def test_parser_handles_comments_quotes_one_line_blocks_and_braces_on_their_own_line() -> None:
    stmts = parse('A { B "x y" # c\n  C { d e }\n}\nD\n{\n E 1\n}\n')
    assert stmts == [
        Stmt(["A"], 1, [Stmt(["B", "x y"], 1), Stmt(["C"], 2, [Stmt(["d", "e"], 2)])]),
        Stmt(["D"], 4, [Stmt(["E", "1"], 6)]),
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("A {\n B 1\n}\n}\n", "'}' without a matching '{' (f.conf:4)"),
    ("A {\n B {\n  C 1\n }\n", "section is never closed with '}' (f.conf:1)"),
    ("{\n}\n", "'{' without a section name (f.conf:1)"),
    ('A "b\n', "unterminated quoted string (f.conf:1)"),
    ("A {\n" * 10000 + "}\n" * 10000, "sections nested deeper than 16 levels (f.conf:17)"),
])
def test_syntax_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfSyntaxError) as e:
        parse(text, "f.conf")
    assert str(e.value) == message


@given(st.text(alphabet=st.sampled_from(list('{}#"\n \tSyncGeneralMode FTFW Multicast 1.')),
               max_size=120) | st.text(max_size=120))
def test_any_text_converts_to_yaml_or_raises_a_syntax_error(text: str) -> None:
    try:
        out, _ = convert(text)
    except ConfSyntaxError:
        return
    assert isinstance(yaml.safe_load(out), dict)


# --- the command ------------------------------------------------------------------------------

def test_main_writes_the_yaml_and_prints_notes(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "conntrackd.conf", tmp_path / "out.yaml"
    src.write_text(PRIMARY_BACKUP)
    assert main([str(src), "-o", str(dst)]) == 0
    assert loads(dst.read_text()).sync.channels
    err = capsys.readouterr().err
    assert f"note: {src}:33: HashSize 32768" in err


def test_main_fails_when_the_result_does_not_validate(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "conntrackd.conf"
    src.write_text("Sync {\n Multicast {\n  Group 3780\n }\n}\n")
    assert main([str(src)]) == 1
    captured = capsys.readouterr()
    assert "multicast:" in captured.out
    assert "the converted config needs a manual fix: sync.channels[0].multicast.group: is " \
           "required" in captured.err


def test_main_reports_unreadable_and_unparsable_files(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.conf")]) == 1
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.conf"
    bad.write_text("Sync {\n")
    assert main([str(bad)]) == 1
    assert f"section is never closed with '}}' ({bad}:1)" in capsys.readouterr().err


def test_control_characters_in_the_conf_are_escaped_in_comments_and_notes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "conntrackd.conf"
    src.write_text("Sync {\n Mode FTFW {\n  Bogus \x1b[31mred\x07\n }\n Multicast {\n"
                   "  IPv4_address 225.0.0.50\n  IPv4_interface 10.0.0.1\n }\n}\n")
    assert main([str(src)]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err
    assert "Bogus \\x1b[31mred\\x07: not recognised" in captured.out
    assert "note: " in captured.err
    assert "\\x1b[31mred" in captured.err
