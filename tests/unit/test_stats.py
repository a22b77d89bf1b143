"""stats.py and commit.py's report: the typed shapes, their JSON, and checking a child's answer."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

import pytest
import trio

from conntrackd_py.cache import ExternalCache
from conntrackd_py.commit import CommitError, commit_forked, report_from_json, report_to_json
from conntrackd_py.config import loads
from conntrackd_py.remote import Remote
from conntrackd_py.stats import (
    CacheStats,
    CommitReport,
    ControlStats,
    DirectStats,
    RuntimeStats,
    Snapshot,
    runtime_stats,
    sections,
    snapshot,
)
from conntrackd_py.vrrp import Follower

REPORT = CommitReport(created=5, updated=1, failed=2, errors={"EINVAL": 2}, seconds=0.5,
                      encode_seconds=0.1, plan_seconds=0.05, undecodable=1)


def test_commit_report_round_trips() -> None:
    assert report_from_json(report_to_json(REPORT)) == REPORT


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b"[" * 100000, b'{"created": 1}',
    json.dumps({**dataclasses.asdict(REPORT), "created": "5"}).encode(),
    json.dumps({**dataclasses.asdict(REPORT), "created": True}).encode(),
    json.dumps({**dataclasses.asdict(REPORT), "seconds": None}).encode(),
    json.dumps({**dataclasses.asdict(REPORT), "errors": {"EINVAL": "x"}}).encode(),
    json.dumps({**dataclasses.asdict(REPORT), "errors": []}).encode(),
])
def test_a_malformed_child_answer_is_a_commit_error(data: bytes) -> None:
    with pytest.raises(CommitError):
        report_from_json(data)


def test_the_childs_own_error_is_passed_on() -> None:
    with pytest.raises(CommitError, match="KernelError: boom"):
        report_from_json(b'{"error": "KernelError: boom"}')


async def test_commit_forked_reports_what_the_child_did() -> None:
    assert await commit_forked(lambda: REPORT) == REPORT


async def test_commit_forked_reports_an_exception_in_the_child() -> None:
    def fail() -> CommitReport:
        raise ValueError("struct.error-like")

    with pytest.raises(CommitError, match=r"ValueError: struct\.error-like"):
        await commit_forked(fail)


async def test_commit_forked_without_descriptors_is_an_error_not_a_crash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pipe(flags: int) -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pipe2", no_pipe)
    with pytest.raises(CommitError, match="Too many open files") as err:
        await commit_forked(lambda: REPORT)
    assert err.value.errno == 24
    await trio.lowlevel.checkpoint()


def test_sections_by_kind() -> None:
    assert sections("cache") == {"cache"}
    assert "control" in sections("runtime")
    assert sections(None) >= {"runtime", "cache", "sync", "link", "direct", "accounting",
                              "control"}
    assert sections("nonsense") == frozenset()


def test_snapshot_json_keeps_only_the_sections_present() -> None:
    snap = Snapshot(direct=DirectStats(created=3), control=ControlStats(errors=1))
    assert snap.as_dict() == {"direct": dataclasses.asdict(DirectStats(created=3)),
                              "control": dataclasses.asdict(ControlStats(errors=1))}
    json.dumps(snap.as_dict())


# --- assembly from the parts (no daemon) -------------------------------------------------
def parts_snapshot(kind: str | None, remote: Remote, *, direct: bool = False) -> Snapshot:
    def runtime() -> RuntimeStats:
        return runtime_stats(
            loads("node: {id: 7}\ngeneral: {mode: stats}\n"), epoch=0x2a, uptime_s=12.34,
            pid=99, in_sync=True, commits=3, last_commit=REPORT, auth_enabled=False,
            reloads=1, reload_failures=2, internal_errors=Counter({"a": 2, "b": 1}),
            fd_exhausted=4, transport=None, remote=remote, commit_echoes=5,
            keepalived=Follower(state="MASTER", transitions=6, ignored=1),
            keepalived_followed=False)

    return snapshot(kind, runtime=runtime, tracker=None, external=remote.external,
                    invalid=remote.invalid, engine=None, transport=None,
                    direct=remote.direct_counts if direct else None, accounting=None,
                    control=None, metrics=None)


def test_a_snapshot_has_the_sections_asked_for_read_from_the_parts() -> None:
    ext = ExternalCache()
    ext.upsert(3, b"k1", b"v", 0.0)
    ext.upsert(3, b"k2", b"v", 0.0)
    ext.upsert(4, b"k3", b"v", 0.0)
    ext.undecodable = 2
    remote = Remote(ext, duplicate_node=1, peers_forgotten=2)
    remote.invalid["port"] += 3
    remote.direct_counts.created = 8
    snap = parts_snapshot("cache", remote)
    assert (snap.runtime, snap.sync, snap.link, snap.direct, snap.control) == (
        None, None, None, None, None)
    assert snap.cache == CacheStats(
        internal=0, external=3, external_by_node={3: 2, 4: 1}, external_undecodable=2,
        external_refused={}, invalid_flows={"port": 3}, kernel_events=None, tracker=None)
    remote.invalid["port"] += 1  # a snapshot is a copy: it does not move with the counters
    assert snap.cache.invalid_flows == {"port": 3}
    assert parts_snapshot("sync", remote, direct=True).direct == DirectStats(created=8)
    assert parts_snapshot("sync", remote).direct is None  # the external cache on
    assert parts_snapshot("control", remote).control == ControlStats()


def test_runtime_stats_name_the_mode_epoch_and_error_totals() -> None:
    r = parts_snapshot("runtime", Remote(ExternalCache(), duplicate_node=1,
                                         peers_forgotten=2)).runtime
    assert r is not None
    assert (r.node, r.epoch, r.uptime_s, r.mode, r.pid) == (7, "0000002a", 12.3, "stats", 99)
    assert (r.internal_errors, r.internal_errors_by_kind) == (3, {"a": 2, "b": 1})
    assert (r.duplicate_node, r.peers_forgotten, r.commit_echoes) == (1, 2, 5)
    assert (r.keepalived_transitions, r.keepalived_lines_ignored) == (6, 1)
    assert r.keepalived_state is None  # no FIFO followed: no role to show
    assert (r.oversize_datagrams, r.last_commit) == (0, REPORT)
