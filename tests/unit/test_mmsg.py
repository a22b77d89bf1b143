"""MultiReceiver: recvmmsg through ctypes, on a plain socket pair (no kernel table needed)."""

from __future__ import annotations

import socket

import pytest

from conntrackd_py import mmsg as nl


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


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")])
def test_sendmmsg_delivers_every_datagram_in_order(family: int, host: str) -> None:
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((host, 0))
        rx.settimeout(2)
        port = rx.getsockname()[1]
        sender = nl.MultiSender(tx, (host, port), slots=8)
        datagrams = [f"datagram {i}".encode() * (i + 1) for i in range(20)]
        i = 0
        while i < len(datagrams):
            n = sender.send(datagrams, i)
            assert 1 <= n <= 8
            i += n
        assert [rx.recv(4096) for _ in datagrams] == datagrams


def test_sockaddr_layouts() -> None:
    v4 = nl.sockaddr(("10.1.2.3", 3780))
    assert len(v4) == 16
    assert v4[2:8] == b"\x0e\xc4\x0a\x01\x02\x03"
    v6 = nl.sockaddr(("ff02::1", 3780, 0, 7))
    assert len(v6) == 28
    assert v6[2:4] == b"\x0e\xc4"
    assert v6[-4:] == (7).to_bytes(4, "little" if __import__("sys").byteorder == "little"
                                   else "big")
