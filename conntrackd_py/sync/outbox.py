"""The flow messages waiting to be packed into datagrams.

`Outbox`, the live changes: a coalescing queue. Per key only the latest state waits (an
update replaces the waiting update, a destroy replaces it too, and the reverse), and keys
leave in the order they first entered. Draining is O(1) per message: the keys are listed once
per pass and looked up as they go, so a dict is never popped from its front (which degrades
on large dicts).

`Snapshot`, a full resync or an ALARM refresh: the internal cache's flows as they were when
it began, updates only, which live changes `discard` from (the live message they queue
carries fresher state). It is drained a datagram's worth at a time into FLOW_BATCH contents
with C-speed passes over slices, no Python step per flow: a full resync of a large table is
the bulk of what a node ever sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import wire

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
        and `unpop` inlined (a burst of live changes drains through here). Returns (new size,
        messages added, True if it stopped because one did not fit)."""
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


class Snapshot:
    __slots__ = ("_gone", "_keys", "_pos", "_values")

    def __init__(self, flows: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]] = ()
                 ) -> None:
        if isinstance(flows, Mapping):  # two lists of references: no tuple per flow
            self._keys, self._values = list(flows), list(flows.values())
        else:
            pairs = list(flows)
            self._keys, self._values = [k for k, _ in pairs], [v for _, v in pairs]
        self._pos = 0
        self._gone: set[bytes] = set()  # keys discarded since it was taken

    def __len__(self) -> int:
        """Flows not drained yet (discarded ones included until they are reached)."""
        return len(self._keys) - self._pos

    def __bool__(self) -> bool:
        return self._pos < len(self._keys)

    def discard(self, key: bytes) -> None:
        """`key` changed after the snapshot: its live message goes instead."""
        if self._pos < len(self._keys):
            self._gone.add(key)

    def take_one(self) -> tuple[bytes, bytes] | None:
        """The next flow alone (one too big for a batch: sent as a plain FLOW_UPDATE)."""
        ks, vs, gone = self._keys, self._values, self._gone
        while self._pos < len(ks):
            i = self._pos
            self._pos += 1
            if ks[i] not in gone:
                kv = ks[i], vs[i]
                self._release()
                return kv
        self._release()
        return None

    def fill(self, room: int, allowance: int) -> tuple[bytes | None, int, bool]:
        """The next flows as one FLOW_BATCH message of at most `room` bytes, at most
        `allowance` flows (-1: no limit). Returns (the message or None, flows in it, True if
        it stopped because the next flow did not fit).

        A guess from the next flow's size, one slice, one C-speed encoding, then a check
        against the exact length and a correction by a flow or two: in a table of flows of
        one size (the usual case) there is no Python step per flow."""
        ks, vs, pos, gone = self._keys, self._values, self._pos, self._gone
        end = len(ks)
        if pos >= end or allowance == 0:
            return None, 0, False
        per = len(ks[pos]) + len(vs[pos]) + wire.BATCH_PAIR_OVERHEAD
        take = min(end - pos, max(1, (room - wire.BATCH_FRAMING_MAX) // per))
        if allowance >= 0:
            take = min(take, allowance)
        keys, vals = ks[pos:pos + take], vs[pos:pos + take]
        idx: list[int] | None = None  # offsets of the flows kept, when some were discarded
        if gone and not gone.isdisjoint(keys):
            idx = [i for i, k in enumerate(keys) if k not in gone]
            keys, vals = [keys[i] for i in idx], [vals[i] for i in idx]
        used = take  # offsets from `pos` passed
        full = False
        msg = _batch(keys, vals)
        while keys and len(msg) > room:  # the guess was too long
            keys.pop()
            vals.pop()
            used = idx.pop() if idx is not None else used - 1
            full = True
            msg = _batch(keys, vals)
        size = len(msg)
        n = len(keys)
        grown = False
        while not full and pos + used < end and n != allowance:  # room left: one more?
            k, v = ks[pos + used], vs[pos + used]
            if k in gone:
                used += 1
                continue
            cost = len(k) + len(v) + wire.BATCH_PAIR_OVERHEAD
            if len(k) > 255 or len(v) > 255:
                cost += (len(k) > 255) + (len(v) > 255)
            if n == 0:
                cost += 3  # the message's framing: fixarray, kind, the list's header
            elif n == 7:
                cost += 2  # 16 items: the list's header grows to 3 bytes
            if size + cost > room:
                full = True
                break
            keys.append(k)
            vals.append(v)
            n += 1
            used += 1
            size += cost
            grown = True
        if grown:
            msg = _batch(keys, vals)
        self._pos = pos + used
        self._release()
        return (msg if n else None), n, full

    def _release(self) -> None:
        if self._pos >= len(self._keys):  # drained: give the memory back now
            self._keys, self._values, self._pos = [], [], 0
            self._gone = set()


def _batch(keys: list[bytes], vals: list[bytes]) -> bytes:
    if not keys:
        return b""
    flat: list[bytes] = [b""] * (2 * len(keys))
    flat[0::2] = keys
    flat[1::2] = vals
    return wire.encode_batch(flat)
