"""Waiting helpers of the lab: poll a condition until it holds or a limit passes.

This module owns nothing but the polling loop; it must not sleep longer than `interval` between
two checks, so a test waits only as long as the condition takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def time_until(pred: Callable[[], object], limit: float,
               interval: float = 0.05) -> float | None:
    """Poll `pred` until it is true: the monotonic time it was seen true, or None after
    `limit` seconds (for measurements that need when, not only whether)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(interval)
    return None


def poll_until(pred: Callable[[], object], limit: float, interval: float = 0.05) -> bool:
    """Poll `pred` until it is true (True) or `limit` seconds have passed (False)."""
    return time_until(pred, limit, interval) is not None


def wait_until(pred: Callable[[], object], limit: float, what: str,
               interval: float = 0.05) -> None:
    """Poll `pred` until it is true; AssertionError naming `what` after `limit` seconds."""
    if not poll_until(pred, limit, interval):
        raise AssertionError(f"timed out after {limit} s waiting for {what}")
