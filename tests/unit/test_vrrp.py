"""keepalived's notify FIFO lines and the steps each transition runs (pure, no FIFO)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from conntrackd_py.vrrp import MAX_LINE, STEPS, Follower, Step, Transition, parse_line


def test_parses_instance_and_group_lines_as_keepalived_writes_them() -> None:
    assert parse_line(b'INSTANCE "VI_1" MASTER 100') == Transition("INSTANCE", "VI_1",
                                                                   "MASTER", 100)
    assert parse_line(b'GROUP "VG_1" BACKUP 0\n') == Transition("GROUP", "VG_1", "BACKUP", 0)
    assert parse_line(b'INSTANCE "VI_1" MASTER_RX_LOWER_PRI 100') == Transition(
        "INSTANCE", "VI_1", "MASTER_RX_LOWER_PRI", 100)
    assert parse_line(b'INSTANCE "with space" FAULT 5') == Transition(
        "INSTANCE", "with space", "FAULT", 5)


def test_other_lines_are_not_transitions() -> None:
    for line in (b"", b"VS [192.168.201.15]:tcp:80 UP",
                 b"RS [1.2.3.4]:tcp:80 [192.168.201.15]:tcp:80 DOWN",
                 b'INSTANCE VI_1 MASTER 100', b'INSTANCE "VI_1 MASTER 100', b'INSTANCE "" MASTER 1',
                 b'INSTANCE "VI_1" MASTER -1', b'INSTANCE "VI_1" MASTER 100 extra',
                 b'INSTANCE "VI_1"', b'INSTANCE "VI_1" 42 1', b"\xff\xfe",
                 b'INSTANCE "VI_1" MASTER 1' + b"0" * MAX_LINE):
        assert parse_line(line) is None, line


@given(st.binary(max_size=600))
def test_any_bytes_parse_or_are_refused(line: bytes) -> None:
    t = parse_line(line)
    assert t is None or (t.kind in ("INSTANCE", "GROUP") and t.name and t.state.isupper())


def test_steps_are_primary_backup_sh() -> None:
    assert STEPS["MASTER"] == (Step.COMMIT, Step.FLUSH, Step.RESYNC_INTERNAL, Step.BULK_SEND)
    assert STEPS["BACKUP"] == (Step.PURGE, Step.REQUEST_RESYNC)
    assert STEPS["FAULT"] == (Step.PURGE,)


def test_follower_acts_once_per_role_and_only_on_named_instances() -> None:
    f = Follower(frozenset({"VI_1"}))
    assert f.decide(Transition("INSTANCE", "VI_2", "MASTER", 100)) == ()
    assert f.decide(Transition("INSTANCE", "VI_1", "BACKUP", 100)) == STEPS["BACKUP"]
    assert f.decide(Transition("INSTANCE", "VI_1", "MASTER_PRIORITY", 90)) == ()
    assert f.decide(Transition("INSTANCE", "VI_1", "MASTER", 100)) == STEPS["MASTER"]
    assert f.decide(Transition("INSTANCE", "VI_1", "MASTER", 100)) == ()  # reload repeats
    assert f.decide(Transition("INSTANCE", "VI_1", "FAULT", 100)) == STEPS["FAULT"]
    assert f.decide(Transition("INSTANCE", "VI_1", "STOP", 100)) == ()
    assert f.decide(Transition("INSTANCE", "VI_1", "FAULT", 100)) == STEPS["FAULT"]


def test_a_sync_group_and_its_instances_run_the_steps_once() -> None:
    f = Follower()
    assert f.decide(Transition("GROUP", "VG", "MASTER", 0)) == STEPS["MASTER"]
    assert f.decide(Transition("INSTANCE", "VI_1", "MASTER", 100)) == ()
    assert f.decide(Transition("INSTANCE", "VI_2", "MASTER", 100)) == ()
    assert f.decide(Transition("GROUP", "VG", "BACKUP", 0)) == STEPS["BACKUP"]


def test_lines_split_across_reads_and_overlong_ones_are_handled() -> None:
    import trio
    import trio.testing

    from conntrackd_py.vrrp import read_transitions

    got: list[Transition] = []
    ignored: list[int] = []

    async def main() -> None:
        send, recv = trio.testing.memory_stream_one_way_pair()
        for chunk in (b'INSTANCE "VI_1" BAC', b'KUP 100\nVS [1.2.3.4]:tcp:80 UP\n',
                      b"x" * (MAX_LINE + 10), b"y" * 10, b'\nGROUP "G" MASTER 0\n'):
            await send.send_all(chunk)
        await send.aclose()
        async for t in read_transitions(recv, lambda: ignored.append(1)):
            got.append(t)

    trio.run(main)
    assert got == [Transition("INSTANCE", "VI_1", "BACKUP", 100),
                   Transition("GROUP", "G", "MASTER", 0)]
    assert len(ignored) == 2  # the VS line and the overlong one


def test_the_fifo_is_made_with_its_directory_and_a_regular_file_refused(tmp_path: Path) -> None:
    import os
    import stat

    import pytest

    from conntrackd_py.vrrp import open_fifo

    path = tmp_path / "run" / "keepalived.fifo"
    fd = open_fifo(str(path))
    try:
        st = os.stat(path)
        assert stat.S_ISFIFO(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # keepalived's end
        os.write(w, b'INSTANCE "X" MASTER 1\n')
        os.close(w)
        assert os.read(fd, 100) == b'INSTANCE "X" MASTER 1\n'
    finally:
        os.close(fd)
    (tmp_path / "plain").write_text("")
    with pytest.raises(OSError, match="not a FIFO"):
        open_fifo(str(tmp_path / "plain"))


class _Ops:
    """The Ops a transition calls, recording each; `resync_internal` fails as a kernel dump
    does when the netlink socket errors, `commit` as a refused command."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def commit(self) -> object:
        from conntrackd_py.ctlclient import ControlError
        self.calls.append("commit")
        raise ControlError("cannot open a netlink socket")

    def flush_caches(self, which: str) -> object:
        self.calls.append(f"flush {which}")
        return None

    async def resync_internal(self) -> object:
        self.calls.append("resync")
        raise OSError(105, "No buffer space available")

    def bulk_send(self) -> object:
        self.calls.append("bulk_send")
        return None

    def __getattr__(self, name: str) -> object:  # the Ops a MASTER line does not call
        raise AssertionError(name)


def test_a_failing_step_is_counted_and_the_next_steps_still_run() -> None:
    import trio

    from conntrackd_py.commands import Ops
    from conntrackd_py.vrrp import run_transition

    f, ops = Follower(), _Ops()
    trio.run(run_transition, f, Transition("INSTANCE", "VI_1", "MASTER", 100), cast(Ops, ops))
    assert ops.calls == ["commit", "flush both", "resync", "bulk_send"]
    assert f.failed_steps == 2
    assert f.transitions == 1
