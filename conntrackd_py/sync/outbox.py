"""A coalescing queue of flow messages waiting to be packed into datagrams.

This module owns one rule: per key, only the latest state waits (an update replaces the
waiting update, a destroy replaces it too, and the reverse), and keys leave in the order they
first entered. The engine uses one `Outbox` for live changes and one per full resync or ALARM
refresh (a snapshot of the internal cache that live changes `discard` from, because the live
message they queue carries fresher state).

Draining is O(1) per message: the keys are listed once per pass and looked up as they go,
so a dict is never popped from its front (which degrades on large dicts).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_MISSING = object()


class Outbox:
    __slots__ = ("_items", "_order", "_pos")

    def __init__(self, items: Iterable[tuple[bytes, bytes | None]] = ()) -> None:
        self._items: dict[bytes, bytes | None] = dict(items)
        self._order: list[bytes] = []
        self._pos = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def items(self) -> Iterable[tuple[bytes, bytes | None]]:
        return self._items.items()

    def put(self, key: bytes, value: bytes | None) -> None:
        self._items[key] = value

    def discard(self, key: bytes) -> None:
        self._items.pop(key, None)

    def pop(self) -> tuple[bytes, bytes | None] | None:
        """The next waiting message, or None when empty."""
        items = self._items
        while items:
            if self._pos >= len(self._order):
                self._order = list(items)
                self._pos = 0
            k = self._order[self._pos]
            self._pos += 1
            v = items.pop(k, _MISSING)
            if v is not _MISSING:
                return k, v  # type: ignore[return-value]
        self._order = []
        self._pos = 0
        return None

    def fill(self, parts: list[bytes], size: int, limit: int, allowance: int,
             update: bytes, destroy: bytes) -> tuple[int, int, bool]:
        """Drain messages into `parts` (`update` + key + value, or `destroy` + key) while the
        total stays within `limit` bytes, at most `allowance` of them (-1: no limit): `pop`
        and `unpop` inlined, since a full resync of a large table spends most of its time
        here. Returns (new size, messages added, True if it stopped because one did not
        fit)."""
        items = self._items
        order, pos = self._order, self._pos
        append = parts.append
        pop = items.pop
        n = 0
        full = False
        lu, ld = len(update), len(destroy)
        while n != allowance and items:
            if pos >= len(order):
                order, pos = list(items), 0
            k = order[pos]
            pos += 1
            v: Any = pop(k, _MISSING)
            if v is _MISSING:
                continue
            need = len(k) + (ld if v is None else len(v) + lu)
            if size + need > limit:
                items[k] = v  # unpop: it leaves first next time
                pos -= 1
                full = True
                break
            if v is None:
                append(destroy)
                append(k)
            else:
                append(update)
                append(k)
                append(v)
            size += need
            n += 1
        if items:
            self._order, self._pos = order, pos
        else:
            self._order, self._pos = [], 0
        return size, n, full

    def unpop(self, key: bytes, value: bytes | None) -> None:
        """Put back the message `pop` just returned (it did not fit): it leaves first next."""
        self._pos -= 1
        self._items[key] = value
