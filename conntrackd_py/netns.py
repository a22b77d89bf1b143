"""Enter a named network namespace for the duration of a socket() call.

Sockets belong to the namespace they were created in, so a process can hold netlink and UDP
sockets of another namespace (the tests and the lab do; the daemon normally runs inside its
namespace and never needs this). Python 3.11 lacks os.setns, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def socket_in(name: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    with entered(name):
        return socket.socket(family, type_, proto)
