"""The kernel conntrack table as the daemon reads and writes it: dump, get, flush, commit.

This module owns the kernel's rules for writing entries (batching, masters before RELATED,
EEXIST answered by an update, the result accounting). Message bytes come from codec.py and
the socket exchange from nl.py; no cache or replication logic lives here.
"""

from __future__ import annotations

import errno
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..flow import (
    Entry,
    Flow,
    Tuple,
    flow_from_lists,
    masters_first,
    masters_first_entries,
)
from . import codec
from .nl import KernelError, Requester

COMMIT_BATCH = 256


@dataclass
class CommitResult:
    """What a commit did: counts, and the errnos of the failures by name."""

    created: int = 0
    updated: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    #: of `seconds`, encoding the requests ahead of sending (the packed path)
    encode_seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.created + self.updated + self.failed

    def summary(self) -> str:
        s = f"created {self.created}, updated {self.updated}, failed {self.failed}"
        if self.errors:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in self.errors.most_common()) + ")"
        return s + f" in {self.seconds:.3f} s"


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


class Table:
    """One namespace's conntrack table (the current one when `netns_name` is None)."""

    def __init__(self, netns_name: str | None = None, batch: int = COMMIT_BATCH) -> None:
        self.netns_name = netns_name
        self.batch = batch
        self._req = Requester(netns_name)

    def close(self) -> None:
        self._req.close()

    @property
    def port_id(self) -> int:
        """The netlink port id of this table's socket: the events its changes cause carry it."""
        return int(self._req.sock.getsockname()[0])

    async def dump(self, family: int = 0) -> list[Flow]:
        flows: list[Flow] = []

        def take(batch: list[tuple[codec.EventType, Flow]]) -> None:
            flows.extend(f for _, f in batch)

        await self._req.dump(take, family)  # type: ignore[arg-type]
        return flows

    async def dump_into(self, on_flows: Callable[[list[Flow]], None], family: int = 0) -> int:
        """Dump without holding the whole table in a list: `on_flows` gets each chunk."""

        def take(batch: list[tuple[codec.EventType, Flow]]) -> None:
            on_flows([f for _, f in batch])

        return await self._req.dump(take, family)  # type: ignore[arg-type]

    async def get(self, zone: int, orig: Tuple) -> Flow | None:
        found: list[Flow] = []
        req = self._req
        async with req._lock:
            seq = req.next_seq()
            req.sock.send(codec.encode_get(zone, orig, seq))
            while True:
                n = await req._recv()
                for msg in codec.iter_messages(req._view, n):
                    if msg.type == codec.CT_NEW:
                        found.append(codec.decode_flow(req._view, msg.start, msg.end))
                    elif msg.type == codec.NLMSG_ERROR:
                        err = codec.error_code(req._view, msg)
                        if err == errno.ENOENT:
                            return None
                        if err:
                            raise KernelError(err, "conntrack get")
                        return found[0] if found else None

    async def delete(self, zone: int, orig: Tuple) -> bool:
        """Delete one entry; False if it did not exist."""
        err = await self._req.request(lambda seq: codec.encode_delete(zone, orig, seq))
        if err == errno.ENOENT:
            return False
        if err:
            raise KernelError(err, "conntrack delete")
        return True

    async def flush(self, match: Callable[[Flow], bool] | None = None) -> int:
        """Flush everything (returns -1: the kernel does not count), or the matching flows."""
        if match is None:
            err = await self._req.request(lambda seq: codec.encode_flush(seq))
            if err:
                raise KernelError(err, "conntrack flush")
            return -1
        doomed = [f for f in await self.dump() if match(f)]
        deleted = 0
        for i in range(0, len(doomed), self.batch):
            chunk = doomed[i:i + self.batch]
            seq = self._req.next_seq(len(chunk))
            msgs = [codec.encode_delete(f.zone, f.orig, seq + j) for j, f in enumerate(chunk)]
            deleted += sum(1 for e in await self._req.transact(msgs, seq) if e == 0)
        return deleted

    async def shorten_timeouts(self, seconds: int,
                               match: Callable[[Flow], bool] | None = None) -> int:
        """Make every (matching) entry expire within `seconds`; returns how many."""
        doomed = [f for f in await self.dump()
                  if f.timeout > seconds and (match is None or match(f))]
        changed = 0
        for i in range(0, len(doomed), self.batch):
            chunk = doomed[i:i + self.batch]
            seq = self._req.next_seq(len(chunk))
            msgs = [codec.encode_create(f, seq + j, timeout=seconds, update=True,
                                        be_liberal=False) for j, f in enumerate(chunk)]
            changed += sum(1 for e in await self._req.transact(msgs, seq) if e == 0)
        return changed

    # --- commit -------------------------------------------------------------------------
    # A commit is a list of prepared creates (family, message body, the item it came from),
    # sent in batches by `_commit_steps`; async and blocking callers drive the same steps.

    async def commit(self, flows: Iterable[Flow], *, be_liberal: bool = True) -> CommitResult:
        """Create the flows in the kernel; existing entries are updated instead.

        Masters go before RELATED flows (a RELATED entry's master must exist first). Timeouts
        are taken as given: the caller has already reduced them by the time since last seen.
        A flow whose values do not encode is skipped and counted as failed ("unencodable"),
        never the whole commit.
        """
        t0 = time.perf_counter()
        res = CommitResult()
        prepared, bad = self._prepare_flows(flows, be_liberal)
        if bad:  # values no create can carry: failed before reaching the kernel
            res.failed += bad
            res.errors["unencodable"] += bad
        steps = self._commit_steps(prepared, res, be_liberal)
        try:
            request = next(steps)
            while True:
                request = steps.send(await self._req.transact(*request, quiet=True))
        except StopIteration:
            pass
        res.seconds = time.perf_counter() - t0
        return res

    def commit_entries_blocking(self, entries: Sequence[Entry], *,
                                be_liberal: bool = True) -> tuple[CommitResult, int]:
        """Commit cache entries (`ExternalCache.commit_entries`: unpacked key and value lists,
        in order; masters are put before RELATED entries here) without an event loop, for the
        daemon's forked commit process. Entries of the common shape are encoded straight from
        the lists (`codec.create_body_packed`), the rest through Flows. Returns the result and
        the number of entries that did not decode or encode (skipped, never the commit)."""
        t0 = time.perf_counter()
        res = CommitResult()
        prepared, bad = self._prepare_entries(entries, be_liberal)
        res.encode_seconds = time.perf_counter() - t0
        steps = self._commit_steps(prepared, res, be_liberal)
        try:
            request = next(steps)
            while True:
                request = steps.send(self._req.transact_blocking(*request, quiet=True))
        except StopIteration:
            pass
        res.seconds = time.perf_counter() - t0
        return res, bad

    @staticmethod
    def _prepare_flows(flows: Iterable[Flow], be_liberal: bool) -> tuple[list[Prepared], int]:
        """Masters first; a flow whose values do not encode is left out (and counted)."""
        prepared: list[Prepared] = []
        bad = 0
        for f in masters_first(list(flows)):
            try:
                prepared.append((f.orig.family, codec.create_body(f, be_liberal=be_liberal), f))
            except ValueError:  # codec.EncodeError: this entry only
                bad += 1
        return prepared, bad

    @staticmethod
    def _prepare_entries(entries: Sequence[Entry], be_liberal: bool
                         ) -> tuple[list[Prepared], int]:
        """Masters first (`masters_first_entries`, linear); each entry encoded from its lists
        when it has the common shape, else through a Flow; one that does not decode or encode
        is left out (and counted)."""
        prepared: list[Prepared] = []
        append = prepared.append
        packed = codec.create_body_packed
        create_body = codec.create_body
        bad = 0
        for item in masters_first_entries(list(entries)):
            k, v = item
            try:
                fb = packed(k, v, be_liberal=be_liberal)
                if fb is None:
                    f = flow_from_lists(k, v)
                    append((f.orig.family, create_body(f, be_liberal=be_liberal), f))
                else:
                    append((fb[0], fb[1], item))
            except (ValueError, TypeError, IndexError):  # PackError, EncodeError; not lists
                bad += 1
        return prepared, bad

    @staticmethod
    def _update_body(item: Flow | Entry, be_liberal: bool) -> tuple[int, bytes] | None:
        """(family, body) of the update for an entry that exists (EEXIST), or None if it
        cannot be made (a value that passed the create's fast path but is no Flow)."""
        try:
            f = item if isinstance(item, Flow) else flow_from_lists(*item)
            return f.orig.family, codec.create_body(f, be_liberal=be_liberal, update=True)
        except (ValueError, TypeError):  # PackError, codec.EncodeError; not lists
            return None

    def _commit_steps(self, prepared: list[Prepared], res: CommitResult, be_liberal: bool
                      ) -> Generator[tuple[list[bytes], int], list[int], None]:
        """The commit as batches of requests: yields (messages, first seq), is sent back their
        errnos. Only each batch's last request asks for an ACK (`transact(quiet=True)`); an
        entry that exists already (EEXIST) is updated instead."""
        request = codec.create_request
        for i in range(0, len(prepared), self.batch):
            chunk = prepared[i:i + self.batch]
            seq = self._req.next_seq(len(chunk))
            last = len(chunk) - 1
            errs = yield [request(fam, body, seq + j, ack=j == last)
                          for j, (fam, body, _) in enumerate(chunk)], seq
            existing: list[Flow | Entry] = []
            for (_, _, item), err in zip(chunk, errs, strict=True):
                if err == 0:
                    res.created += 1
                elif err == errno.EEXIST:
                    existing.append(item)
                else:
                    res.failed += 1
                    res.errors[_errname(err)] += 1
            bodies = []
            for item in existing:
                fb = self._update_body(item, be_liberal)
                if fb is None:  # this entry only: the commit goes on
                    res.failed += 1
                    res.errors["unencodable"] += 1
                else:
                    bodies.append(fb)
            if bodies:
                seq = self._req.next_seq(len(bodies))
                last = len(bodies) - 1
                updates = [request(fam, body, seq + j, update=True, ack=j == last)
                           for j, (fam, body) in enumerate(bodies)]
                for err in (yield updates, seq):
                    if err == 0:
                        res.updated += 1
                    else:
                        res.failed += 1
                        res.errors[_errname(err)] += 1


#: a create ready to send: family, message body, and what it was made from (for an update)
Prepared = tuple[int, bytes, Any]


__all__ = ["CommitResult", "KernelError", "Table"]
