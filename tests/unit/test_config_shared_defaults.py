"""One place per value (#12): the schema's defaults for settings the engine also has are
SyncConfig's; sync.limits is range-checked; the annotated YAML documents every key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from conntrackd_py.config import Config, ConfigError, Limits, Multicast, Udp, loads
from conntrackd_py.sync.config import SyncConfig, config_from

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
BASE = ("node: {id: 1}\nsync:\n  auth: {required: false}\n"
        "  channels: [{multicast: {group: 225.0.0.50}}]\n")

#: schema key path -> SyncConfig field, for every setting both have
SHARED = {
    "sync.mode": "mode",
    "sync.mtu": "mtu",
    "sync.peer_timeout": "peer_timeout",
    "sync.startup_resync": "startup_resync",
    "sync.ftfw.ack_every": "ack_every",
    "sync.ftfw.ack_interval": "ack_interval",
    "sync.ftfw.resend_queue": "resend_queue_max",
    "sync.ftfw.alive_interval": "alive_interval",
    "sync.notrack.resync_interval": "periodic_resync",
    "sync.alarm.refresh": "alarm_refresh",
    "sync.alarm.cache_timeout": "cache_timeout",
    "sync.limits.max_peers": "max_peers",
    "sync.limits.peer_expire": "peer_expire",
    "sync.limits.resync_min_interval": "resync_min_interval",
    "sync.limits.resend_ratio": "resend_ratio",
}


def schema_default(path: str) -> Any:
    cls: Any = Config
    *sections, leaf = path.split(".")
    for name in sections:
        cls = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory
    return next(f for f in dataclasses.fields(cls) if f.name == leaf).default


def engine_default(name: str) -> Any:
    return next(f for f in dataclasses.fields(SyncConfig) if f.name == name).default


@pytest.mark.parametrize(("path", "name"), SHARED.items())
def test_every_shared_default_is_the_engines(path: str, name: str) -> None:
    ours, theirs = schema_default(path), engine_default(name)
    if name == "periodic_resync":  # YAML 0 means the engine's None (never)
        theirs = theirs or 0.0
    assert ours == theirs
    assert type(ours) is type(theirs) or name == "mode"


def test_the_production_values_reach_the_engine_unchanged() -> None:
    # a config that sets nothing builds the engine's default SyncConfig, field for field
    built = config_from(loads(BASE), ())
    default = SyncConfig(node_id=1)
    for name in SHARED.values():
        assert getattr(built, name) == getattr(default, name), name


def test_production_values_are_the_ones_issue_12_names() -> None:
    # the YAML's long-standing values, which the engine now has too
    assert (schema_default("sync.ftfw.ack_every"), schema_default("sync.ftfw.resend_queue"),
            schema_default("sync.peer_timeout")) == (64, 131072, 5.0)


def test_every_limits_field_the_engine_has_is_shared() -> None:
    engine = {f.name for f in dataclasses.fields(SyncConfig)}
    for f in dataclasses.fields(Limits):
        assert (f.name in engine) == (f"sync.limits.{f.name}" in SHARED), f.name


# --- sync.limits ------------------------------------------------------------------------------

def test_limits_defaults_are_the_agreed_ones() -> None:
    assert loads(BASE).sync.limits == Limits(max_peers=32, peer_expire=3600.0,
                                             max_flows_per_peer=1048576,
                                             resync_min_interval=5.0, resend_ratio=10.0)


def test_limits_accept_units_and_reach_the_engine() -> None:
    c = loads(BASE + "  limits:\n    max_peers: 4\n    peer_expire: 10m\n"
              "    max_flows_per_peer: 5000\n    resync_min_interval: 500ms\n"
              "    resend_ratio: 2.5\n")
    assert c.sync.limits == Limits(4, 600.0, 5000, 0.5, 2.5)
    sc = config_from(c, ())
    assert (sc.max_peers, sc.peer_expire, sc.resync_min_interval, sc.resend_ratio) == (
        4, 600.0, 0.5, 2.5)


@pytest.mark.parametrize(("line", "message"), [
    ("max_peers: 0", "sync.limits.max_peers: expected an integer 1..65535, got 0"),
    ("max_peers: 70000", "sync.limits.max_peers: expected an integer 1..65535, got 70000"),
    ("peer_expire: 0", "sync.limits.peer_expire: must be longer than 0"),
    ("peer_expire: 60d", "sync.limits.peer_expire: expected a duration"),
    ("peer_expire: 1000h", "sync.limits.peer_expire: 3600000s is longer than the maximum, "
     "2592000s"),
    ("peer_expire: 3s", "sync.limits.peer_expire: 3s must be longer than sync.peer_timeout (5s)"),
    ("max_flows_per_peer: 0", "sync.limits.max_flows_per_peer: expected an integer "
     "1..1073741824, got 0"),
    ("resync_min_interval: -1", "sync.limits.resync_min_interval: expected a duration"),
    ("resync_min_interval: 1m", "sync.limits.resync_min_interval: 60s must be shorter than 14s"),
    ("resend_ratio: 0.5", "sync.limits.resend_ratio: expected a number 1..10000, got 0.5"),
    ("resend_ratio: .nan", "sync.limits.resend_ratio: expected a number 1..10000, got .nan"),
    ("resend_ratio: true", "sync.limits.resend_ratio: expected a number 1..10000, got true"),
    ("resend_ratio: '3'", "sync.limits.resend_ratio: expected a number 1..10000, got '3'"),
    ("max_peer: 3", "sync.limits.max_peer: unknown key (did you mean 'max_peers'?)"),
])
def test_limits_out_of_range_name_file_line_and_key(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(BASE + "  limits:\n    " + line + "\n", "fw.yaml")
    assert str(e.value).startswith(message)
    assert str(e.value).endswith("(fw.yaml:6)")


def test_the_engines_own_checks_run_at_load_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # a rule only SyncConfig knows still fails --check, naming the sync section
    def refuse(cfg: Any, keys: tuple[bytes, ...]) -> SyncConfig:
        raise ValueError("stall_timeout must be longer than resync_min_interval + "
                         "resync_retry")

    monkeypatch.setattr("conntrackd_py.config.config_from", refuse)
    with pytest.raises(ConfigError) as e:
        loads(BASE, "fw.yaml")
    assert (e.value.key, e.value.line) == ("sync", 2)
    assert e.value.problem.startswith("the replication engine refuses these settings: "
                                      "stall_timeout")


# --- the annotated file documents every key ---------------------------------------------------

def schema_paths(cls: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if "parse" not in f.metadata:
            continue
        path = f"{prefix}{f.name}"
        sub = f.default_factory
        if isinstance(sub, type) and dataclasses.is_dataclass(sub) and f.name not in (
                "protocols", "addresses", "tcp_states"):
            out |= schema_paths(sub, path + ".")
        else:
            out.add(path)
    return out


def yaml_paths(node: yaml.Node, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = f"{prefix}{k.value}"
            out.add(path)
            out |= yaml_paths(v, path + ".")
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            out |= yaml_paths(v, prefix.rstrip(".") + "[].")
    return out


def test_the_annotated_config_shows_every_key() -> None:
    text = (CONFIG_DIR / "conntrackd-py.yaml").read_text()
    root = yaml.compose(text)
    assert root is not None
    shown = yaml_paths(root)
    assert {p for p in schema_paths(Config) if p not in shown} == set()
    for cls, kind in ((Multicast, "multicast"), (Udp, "udp")):
        # channel keys: listed in the comment above `channels:`, multicast also as a value
        for f in dataclasses.fields(cls):
            assert f"#       {f.name}: " in text, f"{kind}.{f.name}"
        assert f"#   - {kind}:" in text
    assert {f"sync.channels[].multicast.{f.name}" for f in dataclasses.fields(Multicast)} \
        <= shown
