"""watchers.py: every listener gets each change; a slow one loses items, never the daemon's
time; the owner hears when the first listener came and the last one left. (A listener whose
client vanished is dropped by the daemon test's watch: its generator closes.)"""

from __future__ import annotations

import trio
import trio.testing

from conntrackd_py.remote import watch_item
from conntrackd_py.watchers import Watchers


async def test_changes_reach_every_listener_and_a_slow_one_loses_items() -> None:
    active: list[bool] = []
    w = Watchers(active.append, buffer=2)
    fast: list[object] = []
    slow = w.listen()
    assert w.channels == []  # nothing listens until the generator runs

    async def drain() -> None:
        async for item in w.listen():
            fast.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert (len(w.channels), active) == (1, [True])
        slow_task = trio.Event()
        slow_items: list[object] = []

        async def lagging() -> None:
            slow_items.append(await slow.__anext__())  # registers, takes one item, then waits
            slow_task.set()
            await trio.sleep_forever()

        nursery.start_soon(lagging)
        await trio.testing.wait_all_tasks_blocked()
        assert len(w.channels) == 2
        for i in range(5):  # never blocks, whoever lags
            w.notify("update", 2, bytes([i]), b"v")
            await trio.testing.wait_all_tasks_blocked()
        w.internal("destroy", b"k", None)
        await trio.testing.wait_all_tasks_blocked()
        assert fast == [*(watch_item("update", 2, bytes([i]), b"v") for i in range(5)),
                        watch_item("destroy", None, b"k", None)]
        assert slow_task.is_set()
        assert slow_items == [watch_item("update", 2, b"\x00", b"v")]
        nursery.cancel_scope.cancel()
    await slow.aclose()
    assert w.channels == []
    assert active[-1] is False  # the last listener left
