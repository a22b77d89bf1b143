"""-E: the clients watching the caches' changes, fed without ever slowing the daemon.

This module owns the listeners' channels: each change goes to every listener as a
`remote.watch_item`; a listener that does not keep up loses items (its channel is full), one
that went away is dropped; `on_active` tells the owner when the first listener came and the
last one left (the daemon hooks the tracker's `on_change` only while someone listens). It
must not decide what a change is (remote.py, the tracker) nor ever block.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

import trio

from .remote import watch_item

#: items a listener may lag behind before it loses some
BUFFER = 10000


class Watchers:
    def __init__(self, on_active: Callable[[bool], None], buffer: int = BUFFER) -> None:
        self.on_active = on_active
        self.buffer = buffer
        #: the listeners; empty: nobody watches (the pump then passes no callback at all)
        self.channels: list[trio.MemorySendChannel[object]] = []

    def notify(self, event: str, origin: int | None, key: bytes, value: bytes | None) -> None:
        item = watch_item(event, origin, key, value)
        for ch in list(self.channels):
            try:
                ch.send_nowait(item)
            except trio.WouldBlock:
                pass  # a slow watcher loses items rather than slowing the daemon
            except trio.BrokenResourceError:
                self.channels.remove(ch)
        if not self.channels:
            self.on_active(False)

    def internal(self, event: str, key: bytes, value: bytes | None) -> None:
        """The tracker's `on_change`: a change of the internal cache."""
        self.notify(event, None, key, value)

    async def listen(self) -> AsyncGenerator[object, None]:
        """Every change while the caller listens: `remote.watch_item`s."""
        send, recv = trio.open_memory_channel[object](self.buffer)
        self.channels.append(send)
        self.on_active(True)
        try:
            async for item in recv:
                yield item
        finally:
            if send in self.channels:
                self.channels.remove(send)
            if not self.channels:
                self.on_active(False)
