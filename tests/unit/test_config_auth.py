"""Secure by default (#13): sync needs a key unless the config says otherwise, and key files
are refused when others could read or change them (as ssh refuses private keys)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conntrackd_py.config import (
    DEFAULT_KEY_FILE,
    Auth,
    ConfigError,
    auth_off,
    default_config,
    load,
    load_keys,
    loads,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
KEY_HEX = "00112233445566778899aabbccddeeff" * 2
NO_KEY = ("node: {id: 1}\n"
          "sync:\n"
          "  mode: ftfw\n"
          "  channels:\n"
          "    - multicast: {group: 225.0.0.50}\n")
KEYGEN = ("head -c 32 /dev/urandom > /etc/conntrackd-py/sync.key && "
          "chmod 600 /etc/conntrackd-py/sync.key")


def key_file(path: Path, mode: int = 0o600, data: str = KEY_HEX) -> str:
    path.write_text(data)
    path.chmod(mode)
    return str(path)


# --- the rule in load/loads (so --check catches it) -------------------------------------------

def test_sync_without_a_key_is_refused_naming_key_file_line_and_the_fix() -> None:
    with pytest.raises(ConfigError) as e:
        loads(NO_KEY, "fw.yaml")
    err = e.value
    assert (err.key, err.filename, err.line) == ("sync.auth.key_files", "fw.yaml", 2)
    assert err.problem.startswith("is empty while sync.auth.required is true (the default)")
    assert KEYGEN in err.problem
    assert "'auth: {required: false}' under sync" in err.problem
    assert str(err).startswith("sync.auth.key_files: is empty")
    assert str(err).endswith("(fw.yaml:2)")


def test_the_error_points_at_the_auth_section_when_there_is_one() -> None:
    with pytest.raises(ConfigError) as e:
        loads(NO_KEY + "  auth:\n    key_files: []\n", "fw.yaml")
    assert (e.value.key, e.value.line) == ("sync.auth.key_files", 7)


def test_any_other_mistake_is_reported_before_the_missing_key() -> None:
    with pytest.raises(ConfigError) as e:
        loads(NO_KEY + "  mtu: 100\n", "fw.yaml")
    assert e.value.key == "sync.mtu"


def test_required_false_runs_without_auth_and_says_so() -> None:
    c = loads(NO_KEY + "  auth: {required: false}\n")
    assert c.sync.auth.required is False
    assert auth_off(c)
    assert load_keys(c.sync.auth) == ()


def test_a_key_file_turns_auth_on_whatever_required_says() -> None:
    for required in ("true", "false"):
        c = loads(NO_KEY + f"  auth: {{key_files: [/k], required: {required}}}\n")
        assert not auth_off(c)


def test_stats_mode_needs_no_key() -> None:
    c = loads("node: {id: 1}\ngeneral: {mode: stats}\n")
    assert c.sync.auth.required
    assert not auth_off(c)  # nothing is replicated


def test_required_is_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"^sync\.auth\.required: expected true or false, "
                                          r"got 'no thanks' \(<string>:6\)$"):
        loads(NO_KEY + "  auth: {required: no thanks}\n")


def test_load_keys_refuses_no_key_while_required() -> None:
    with pytest.raises(ConfigError) as e:
        load_keys(Auth())
    assert e.value.key == "sync.auth.key_files"
    assert KEYGEN in e.value.problem


# --- the embedded default ---------------------------------------------------------------------

def test_embedded_default_names_the_standard_key_file() -> None:
    c = default_config()
    assert c.general.mode == "sync"
    assert c.sync.auth.key_files == (DEFAULT_KEY_FILE,)
    assert c.sync.auth.required
    assert not auth_off(c)


@pytest.mark.skipif(os.path.exists(DEFAULT_KEY_FILE), reason="this machine has the key")
def test_a_daemon_on_the_embedded_default_without_the_key_stops_saying_how_to_make_it() -> None:
    with pytest.raises(ConfigError) as e:
        load_keys(default_config().sync.auth)
    assert str(e.value) == (
        "sync.auth.key_files[0]: cannot read key file: No such file or directory; make one "
        f"with: {KEYGEN} (the same key on every node) ({DEFAULT_KEY_FILE})")


def test_every_shipped_example_authenticates() -> None:
    for path in sorted((CONFIG_DIR / "examples").glob("*.yaml")):
        c = load(path)
        assert not auth_off(c), path.name
        assert c.sync.auth.required, path.name
        assert all(k.startswith("/etc/conntrackd-py/") for k in c.sync.auth.key_files)


# --- key files --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_key_files_only_the_owner_can_read_are_accepted(tmp_path: Path, mode: int) -> None:
    k = key_file(tmp_path / "k", mode)
    assert load_keys(Auth(key_files=(k,))) == (bytes.fromhex(KEY_HEX),)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o610, 0o601])
def test_key_files_group_or_others_can_read_or_write_are_refused(tmp_path: Path,
                                                                 mode: int) -> None:
    k = key_file(tmp_path / "k", mode)
    with pytest.raises(ConfigError) as e:
        load_keys(Auth(key_files=(k,)))
    assert str(e.value) == (
        f"sync.auth.key_files[0]: the key file is readable or writable by group or others "
        f"(mode {mode:04o}); fix: chmod 600 {k} ({k})")


def test_the_second_key_file_is_checked_too(tmp_path: Path) -> None:
    a = key_file(tmp_path / "a")
    b = key_file(tmp_path / "b", 0o644, "ff" * 32)
    with pytest.raises(ConfigError, match=r"^sync\.auth\.key_files\[1\]: the key file is "):
        load_keys(Auth(key_files=(a, b)))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    k = key_file(tmp_path / "k")
    os.chown(k, 4242, -1)
    with pytest.raises(ConfigError) as e:
        load_keys(Auth(key_files=(k,)))
    assert e.value.problem == f"the key file is owned by uid 4242, not root; fix: chown root {k}"


def test_a_symlink_is_judged_by_the_file_it_reaches(tmp_path: Path) -> None:
    good = key_file(tmp_path / "good")
    bad = key_file(tmp_path / "bad", 0o644, "ff" * 32)
    (tmp_path / "to-good").symlink_to(good)
    (tmp_path / "to-bad").symlink_to(bad)
    assert load_keys(Auth(key_files=(str(tmp_path / "to-good"),))) == (bytes.fromhex(KEY_HEX),)
    with pytest.raises(ConfigError, match=r"\(mode 0644\)"):
        load_keys(Auth(key_files=(str(tmp_path / "to-bad"),)))


def test_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # no writer: a plain open() would wait for one forever
    for path in (fifo, tmp_path):
        with pytest.raises(ConfigError) as e:
            load_keys(Auth(key_files=(str(path),)))
        assert e.value.problem == "is not a regular file"
        assert e.value.filename == str(path)


def test_a_file_longer_than_any_key_is_refused(tmp_path: Path) -> None:
    k = key_file(tmp_path / "k", data="ab" * 1000)
    with pytest.raises(ConfigError, match=r"the file is larger than any key \(64 bytes, or 128 "
                                          r"hex digits\)"):
        load_keys(Auth(key_files=(k,)))


def test_a_hex_key_with_crlf_is_the_longest_accepted(tmp_path: Path) -> None:
    k = key_file(tmp_path / "k", data="ab" * 64 + "\r\n")
    assert load_keys(Auth(key_files=(k,))) == (b"\xab" * 64,)
