"""32-bit serial-number arithmetic (RFC 1982) for sequence numbers and epochs.

This module owns how two 32-bit counters are compared once they may have wrapped: `a` is
after `b` when `(a - b) mod 2**32` is in `[1, 2**31)`. The distance of exactly 2**31, which
RFC 1982 leaves undefined, counts as "before" here so every comparison has one answer.
It also turns a set of missing numbers into inclusive ranges (what a NACK carries).
"""

from __future__ import annotations

from collections.abc import Iterable

MOD = 1 << 32
MASK = MOD - 1
HALF = 1 << 31


def add(a: int, n: int) -> int:
    """`a + n` in sequence space."""
    return (a + n) & MASK


def diff(a: int, b: int) -> int:
    """Signed distance `a - b` in sequence space, in `[-2**31, 2**31)`."""
    d = (a - b) & MASK
    return d - MOD if d >= HALF else d


def after(a: int, b: int) -> bool:
    """True if `a` comes strictly after `b`."""
    return 0 < ((a - b) & MASK) < HALF


def missing_ranges(
    first: int, last: int, present: Iterable[int], limit: int
) -> list[tuple[int, int]]:
    """Inclusive ranges of `[first, last]` not in `present`, in order, at most `limit` of them.

    `present` may hold numbers outside `[first, last]`; they are ignored. Cost is
    O(len(present) log len(present)), whatever the width of the interval.
    """
    width = diff(last, first)
    if width < 0:
        return []
    offsets = sorted(o for o in (((s - first) & MASK) for s in present) if o <= width)
    out: list[tuple[int, int]] = []
    nxt = 0  # first offset not yet known present or missing
    for o in offsets:
        if o > nxt:
            out.append((add(first, nxt), add(first, o - 1)))
            if len(out) >= limit:
                return out
        nxt = o + 1
    if nxt <= width:
        out.append((add(first, nxt), last))
    return out[:limit]
