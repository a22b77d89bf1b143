"""contain.py: an exception one input caused is counted by kind and logged at most once a
minute per kind, on an explicit clock."""

from __future__ import annotations

import errno
import logging

import pytest

from conntrackd_py.contain import Containment


def test_internal_errors_are_counted_by_where_and_type(
        caplog: pytest.LogCaptureFixture) -> None:
    c = Containment()
    caplog.set_level(logging.ERROR)
    c.record("applying a sync event", KeyError("x"), 0.0)
    c.record("applying a sync event", KeyError("y"), 1.0)
    c.record("direct write", ValueError(), 2.0)
    assert c.internal_errors == {"applying a sync event: KeyError": 2,
                                 "direct write: ValueError": 1}
    assert c.fd_exhausted == 0
    # one line per kind per minute, the traceback with it; the one held back named next time
    assert [r.getMessage() for r in caplog.records] == [
        "applying a sync event: KeyError (contained, the daemon carries on)",
        "direct write: ValueError (contained, the daemon carries on)"]
    assert caplog.records[0].exc_info is not None
    caplog.clear()
    c.record("applying a sync event", KeyError("z"), 60.5)
    assert [r.getMessage() for r in caplog.records] == [
        "applying a sync event: KeyError (contained, the daemon carries on; 1 more since the "
        "last report)"]


def test_exhausted_descriptors_are_a_resource_condition_without_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    c = Containment()
    caplog.set_level(logging.ERROR)
    c.record("sync channel 0", OSError(errno.EMFILE, "Too many open files"), 0.0)
    c.record("sync channel 0", OSError(errno.ECONNREFUSED, "refused"), 0.0)
    assert c.fd_exhausted == 1
    assert c.internal_errors == {"sync channel 0: ConnectionRefusedError": 1}
    assert caplog.records[0].getMessage().startswith("sync channel 0: EMFILE (contained")
    assert caplog.records[0].exc_info is None
    assert caplog.records[1].exc_info is not None


def test_an_errno_reported_as_a_refusal_counts_only_when_it_is_exhaustion() -> None:
    c = Containment()
    assert c.exhausted(errno.ENFILE)
    assert not c.exhausted(errno.EPERM)
    assert not c.exhausted(None)
    assert c.fd_exhausted == 1
