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


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")])
def test_runs_of_one_length_go_as_one_gso_send_and_arrive_as_datagrams(
        family: int, host: str) -> None:
    """Datagrams of one length (a shorter last one allowed) leave in one UDP_SEGMENT send;
    the receiver gets them one by one, byte for byte; other lengths break the run."""
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((host, 0))
        rx.settimeout(2)
        sender = nl.MultiSender(tx, (host, rx.getsockname()[1]), slots=8)
        run = [bytes([i]) * 1000 for i in range(10)] + [b"short"]
        datagrams = [*run, b"x" * 700, b"y" * 900, b"z" * 700]
        assert sender.send(datagrams, 0) == 11  # the whole run, its short tail included
        assert sender.gso
        i = 11
        while i < len(datagrams):
            i += sender.send(datagrams, i)
        assert [rx.recv(4096) for _ in datagrams] == datagrams
        # a run longer than one GSO send allows is cut at the limit
        many = [b"m" * 1400] * 100
        n = sender.send(many, 0)
        assert n == min(nl.GSO_MAX_SEGMENTS, nl.GSO_MAX_BYTES // 1400)
        assert [rx.recv(4096) for _ in range(n)] == many[:n]


def test_gso_refused_falls_back_to_sendmmsg_for_good() -> None:
    """A socket sending without UDP checksums (SO_NO_CHECK) cannot use GSO: the kernel refuses
    (EINVAL), the sender falls back to sendmmsg and stops trying."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2)
        tx.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK
        sender = nl.MultiSender(tx, ("127.0.0.1", rx.getsockname()[1]), slots=8)
        datagrams = [b"d" * 1000] * 5
        sent = 0
        while sent < len(datagrams):
            sent += sender.send(datagrams, sent)
        assert not sender.gso
        assert [rx.recv(4096) for _ in datagrams] == datagrams


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")])
def test_the_senders_address_comes_with_each_datagram(family: int, host: str) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as rx_sock, \
            socket.socket(family, socket.SOCK_DGRAM) as a, \
            socket.socket(family, socket.SOCK_DGRAM) as b:
        rx_sock.bind((host, 0))
        rx_sock.setblocking(False)
        a.bind((host, 0))
        b.bind((host, 0))
        rx = nl.MultiReceiver(rx_sock, slots=8, slot_size=2048, names=True)
        for _ in range(3):  # one sender: the burst's fast path
            a.sendto(b"a", rx_sock.getsockname())
        assert rx.sources(len(rx.recv())) == [host] * 3
        for s in (a, b, a):  # mixed senders: one by one
            s.sendto(b"x", rx_sock.getsockname())
        lengths = rx.recv()
        assert rx.sources(len(lengths)) == [host] * 3
        assert rx.sources(0) == []


def test_sources_without_names_are_unknown() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx_sock, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx_sock.bind(("127.0.0.1", 0))
        rx_sock.setblocking(False)
        rx = nl.MultiReceiver(rx_sock, slots=4, slot_size=2048)
        tx.sendto(b"x", rx_sock.getsockname())
        assert rx.sources(len(rx.recv())) == [None]


async def test_transport_drops_datagrams_above_the_limit_and_names_senders() -> None:
    import trio

    from conntrackd_py.transport import ChannelSpec, Transport
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tp = Transport([ChannelSpec(port=port, peers=("127.0.0.1",), bind="127.0.0.1")],
                   max_datagram=1500)
    got: list[tuple[list[bytes], list[str | None]]] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tp.receive_loop, 0, lambda b, s: got.append((b, s)),
                               trio.current_time)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                for d in (b"a" * 100, b"b" * 2000, b"c" * 1500):
                    tx.sendto(d, ("127.0.0.1", port))
            with trio.fail_after(5):
                while sum(len(b) for b, _ in got) < 2:  # noqa: ASYNC110 (plain state)
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        tp.close()
    datagrams = [d for b, _ in got for d in b]
    assert [len(d) for d in datagrams] == [100, 1500]
    assert [s for _, ss in got for s in ss] == ["127.0.0.1"] * 2
    assert tp.channels[0].stats.oversize == 1
    assert tp.channels[0].stats.received == 2


@pytest.mark.parametrize(("spec_kw", "named"), [
    ({"group": "225.0.0.50", "interface": "nope0"}, "interface 'nope0'"),
    ({"peers": ("192.0.2.8",), "bind": "192.0.2.9"}, "address 192.0.2.9"),
])
def test_a_channel_that_cannot_open_names_what_to_fix(spec_kw: dict[str, object],
                                                      named: str) -> None:
    from conntrackd_py.transport import ChannelSpec, open_channel
    with pytest.raises(OSError, match=named):
        open_channel(ChannelSpec(port=3999, **spec_kw))  # type: ignore[arg-type]
