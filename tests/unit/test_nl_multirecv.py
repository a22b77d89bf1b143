"""MultiReceiver: recvmmsg through ctypes, on a plain socket pair (no kernel table needed)."""

from __future__ import annotations

import socket

import pytest

from conntrackd_py.kernel import nl


def test_many_datagrams_per_call_each_in_its_slot() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        rx = nl.MultiReceiver(b, slots=4, slot_size=64)
        with pytest.raises(BlockingIOError):
            rx.recv()
        sent = [bytes([i]) * (i + 1) for i in range(6)]
        for d in sent:
            a.send(d)
        got: list[bytes] = []
        while len(got) < len(sent):
            lengths = rx.recv()
            assert 1 <= len(lengths) <= (4 if nl._recvmmsg is not None else 1)
            got += [bytes(rx.view[i * 64:i * 64 + n]) for i, n in enumerate(lengths)]
        assert got == sent
        with pytest.raises(BlockingIOError):
            rx.recv()


def test_this_libc_has_recvmmsg() -> None:
    """The fast path is what runs here (the fallback exists for other libcs)."""
    assert nl._recvmmsg is not None
