"""purge.py: -t's schedule as conntrackd 1.4.7's RESET_TIMERS, on an explicit clock."""

from __future__ import annotations

from conntrackd_py.purge import PurgeTimer


class Handle:
    """Stands for the daemon's cancel scope: compared by identity."""


def test_one_flush_is_scheduled_and_not_rearmed_while_pending() -> None:
    t = PurgeTimer[Handle](60.0)
    assert t.request(100.0, 5) == (5, True)
    h = Handle()
    t.arm(h, 100.0, 5)
    assert t.pending
    # asked again 2 s later with another delay: the time left, nothing new to schedule
    assert t.request(102.0, 30) == (3, False)
    assert t.request(104.2, None) == (1, False)  # rounded up: not "0" while still pending
    assert t.request(106.0, 5) == (0, False)  # overdue, its flush not yet reported done
    t.done(h)
    assert not t.pending
    assert t.request(106.0, 5) == (5, True)


def test_the_configured_purge_timeout_is_the_default_delay() -> None:
    assert PurgeTimer[Handle](60.0).request(0.0, None) == (60, True)
    assert PurgeTimer[Handle](60.0).request(0.0, 0) == (0, True)


def test_a_commit_cancels_the_pending_flush_and_returns_its_handle() -> None:
    t = PurgeTimer[Handle](60.0)
    assert t.cancel("a commit") is None  # nothing pending: nothing to cancel
    h = Handle()
    t.arm(h, 0.0, 5)
    assert t.cancel("a commit") is h
    assert not t.pending
    assert t.cancel("a commit") is None
    assert t.request(1.0, 5) == (5, True)  # armed again from scratch


def test_a_cancelled_flush_finishing_late_does_not_clear_the_next_one() -> None:
    t = PurgeTimer[Handle](60.0)
    old, new = Handle(), Handle()
    t.arm(old, 0.0, 5)
    t.cancel("-f")
    t.arm(new, 1.0, 5)
    t.done(old)  # the cancelled task's finally runs after the new one was armed
    assert t.pending
    assert t.request(2.0, 5) == (4, False)
    t.done(new)
    assert not t.pending
