"""stats.py and commit.py's report: the typed shapes, their JSON, and checking a child's answer."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import trio

from conntrackd_py.commit import CommitError, commit_forked, report_from_json, report_to_json
from conntrackd_py.stats import CommitReport, ControlStats, DirectStats, Snapshot, sections

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
