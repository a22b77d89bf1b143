"""The daemons a lab runs in its namespaces, behind one interface: conntrackd-py (`DaemonProc`),
the real conntrackd as the reference (`Conntrackd`) and keepalived (`Keepalived`).

Each writes its configuration and its files into its own `workdir`, starts its process with
`Netns.popen` (so it dies with the lab) and answers `pid`, `alive()`, `kill()` (SIGKILL: a
crash) and `stop()` (SIGTERM, then SIGKILL). The two sync daemons also answer
`external_count()`, `internal_count()`, `bytes_sent()` and `ready()`, so a test or a benchmark
can drive either one the same way. This module must not write outside a daemon's workdir, and
it never starts a daemon in the root namespace.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any, ClassVar

from .netns import Netns, terminate
from .topology import SYNC_GROUP, ClusterTopology

#: the keepalived notify script operators install (package data of conntrackd_py; the file
#: config/keepalived/notify.sh of a source checkout is a link to it)
NOTIFY_SCRIPT = ("conntrackd_py", "keepalived/notify.sh")


def notify_script() -> bytes:
    """The shipped keepalived notify script, read as package data."""
    package, name = NOTIFY_SCRIPT
    return resources.files(package).joinpath(name).read_bytes()


class LabDaemon(abc.ABC):
    """A daemon process in a lab namespace, its files in `workdir`."""

    kind: ClassVar[str]
    #: seconds between SIGTERM and SIGKILL in `stop()`
    grace: ClassVar[float] = 5.0

    def __init__(self, ns: Netns, workdir: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.ns, self.workdir = ns, workdir
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int:
        """The daemon's pid (`ip netns exec` execs it: the same process)."""
        assert self.proc is not None, f"{self.kind} in {self.ns.name} was never started"
        return self.proc.pid

    @abc.abstractmethod
    def start(self) -> None:
        """Start the process (again, after `kill` or `stop`), with the same files."""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, leaving its lock and socket files behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, self.grace)


class SyncDaemon(LabDaemon):
    """A conntrack replication daemon: ours or the reference."""

    @abc.abstractmethod
    def external_count(self) -> int:
        """Entries in the external cache (the peers' flows)."""

    @abc.abstractmethod
    def internal_count(self) -> int:
        """Entries in the internal cache (this node's flows)."""

    @abc.abstractmethod
    def bytes_sent(self) -> int:
        """Bytes sent on the sync link since the start."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """The daemon sees its peers and says it is in sync (as far as it can tell)."""


# --- conntrackd-py itself ---------------------------------------------------------------------

_DAEMON_YAML = """
node: {{id: {node}, name: {name}}}
general:
  mode: {general_mode}
  lock_file: {dir}/conntrackd-py.lock
  control_socket: {dir}/ctl.sock
logging: {{level: {log_level}, target: file, file: {dir}/daemon.log}}
netlink: {{rcvbuf: {rcvbuf}}}
filters:
  addresses: {{ignore: [{ignore}]}}
sync:
  mode: {mode}
  external_cache: {external_cache}
  peer_timeout: {peer_timeout}
  auth: {auth}
  channels:
    - multicast: {{group: {group}, port: {port}, interface: {iface}, source: {sync_ip}}}
{extra}
"""


class DaemonProc(SyncDaemon):
    """conntrackd-py running in a lab namespace, with its files in `workdir`.

    Authenticated by default, as production requires: the key is `key`, or else the namespace's
    lab's cluster key (`Netns.sync_key`: every daemon of one lab shares it), written to
    `workdir/sync.key` (mode 0600). `auth=False` runs without a key and says so in the config
    (`sync.auth.required: false`). `ignore_addresses` is `filters.addresses.ignore` (JSON
    strings are YAML scalars, so any address or network text goes in as is).
    """

    kind = "conntrackd-py"
    grace = 10.0

    def __init__(self, ns: Netns, workdir: str, node: int, sync_ip: str, *,
                 iface: str = "sync0", group: str = SYNC_GROUP, port: int = 3780,
                 mode: str = "ftfw", key: bytes | None = None, auth: bool = True,
                 external_cache: bool = True, peer_timeout: float = 5.0,
                 log_level: str = "info", rcvbuf: int = 64 << 20, extra: str = "",
                 general_mode: str = "sync",
                 ignore_addresses: Sequence[str] = ("127.0.0.0/8", "::1")) -> None:
        super().__init__(ns, workdir)
        self.node = node
        if key is not None and not auth:
            raise ValueError("a key with auth=False")
        self.key_file: str | None = None
        if auth:
            self.key_file = os.path.join(workdir, "sync.key")
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as f:
                f.write((key if key is not None else ns.sync_key).hex() + "\n")
            os.chmod(self.key_file, 0o600)  # an existing file keeps its mode through O_CREAT
            auth_yaml = f"{{key_files: [{self.key_file}]}}"
        else:
            auth_yaml = "{required: false}"
        self.conf = os.path.join(workdir, "conntrackd-py.yaml")
        with open(self.conf, "w") as f:
            f.write(_DAEMON_YAML.format(
                node=node, name=f"{ns.name}", dir=workdir, mode=mode, group=group, port=port,
                iface=iface, sync_ip=sync_ip, auth=auth_yaml, log_level=log_level,
                external_cache="true" if external_cache else "false",
                peer_timeout=peer_timeout, rcvbuf=rcvbuf, extra=extra,
                general_mode=general_mode,
                ignore=", ".join(json.dumps(a) for a in ignore_addresses)))
        self.socket = os.path.join(workdir, "ctl.sock")
        self.log = os.path.join(workdir, "daemon.log")
        self.start()

    def start(self, timeout: float = 15.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        proc = self.ns.popen(sys.executable, "-m", "conntrackd_py.cli", "-C", self.conf,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.proc = proc
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"conntrackd-py in {self.ns.name} exited: {err}"
                                   f"{self.read_log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"conntrackd-py in {self.ns.name} did not start")
            time.sleep(0.005)

    def read_log(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def call(self, cmd: str, **args: Any) -> Any:
        from conntrackd_py.ctlclient import ControlClient
        with ControlClient(self.socket) as c:
            return c.call(cmd, **args)

    def cli(self, *flags: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """The command line, as keepalived's notify script would run it."""
        return self.ns.run(sys.executable, "-m", "conntrackd_py.cli", "-C", self.conf, *flags,
                           check=check, timeout=120)

    def stats(self, kind: str | None = None) -> dict[str, Any]:
        return dict(self.call("stats", kind=kind))

    def external_keys(self, origin: int | None = None) -> set[str]:
        return set(self.call("dump", cache="external", origin=origin))

    def external_count(self) -> int:
        return int(self.stats("cache")["cache"]["external"])

    def internal_count(self) -> int:
        return int(self.stats("cache")["cache"]["internal"])

    def sync_counters(self) -> dict[str, int]:
        return dict(self.stats("sync")["sync"]["counters"])

    def bytes_sent(self) -> int:
        return int(self.sync_counters()["bytes_sent"])

    def ready(self) -> bool:
        peers = self.stats("sync")["sync"]["peers"]
        return bool(peers) and all(p["up"] for p in peers.values()) and bool(
            self.call("in_sync")["in_sync"])


# --- the reference: the real conntrackd -------------------------------------------------------

_CONNTRACKD_CONF = """
Sync {{
    Mode {mode} {{ {mode_opts} }}
    Multicast {{
        IPv4_address {group}
        Group {port}
        IPv4_interface {sync_ip}
        Interface {iface}
        SndSocketBuffer 8388608
        RcvSocketBuffer 8388608
        Checksum on
    }}
    Options {{ TCPWindowTracking Off }}
}}
General {{
    HashSize 262144
    HashLimit 4194304
    LogFile {dir}/conntrackd.log
    LockFile {dir}/conntrackd.lock
    UNIX {{ Path {dir}/conntrackd.ctl }}
    NetlinkBufferSize 67108864
    NetlinkBufferSizeMaxGrowth 134217728
    Filter From Userspace {{
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address {sync_ip}
        }}
    }}
}}
"""


class Conntrackd(SyncDaemon):
    """The real conntrackd (Debian's 1.4.7) in a lab namespace: our reference for behaviour
    and speed. It has no authentication. Its files live in `workdir`; it stops with the lab
    (or `stop()`)."""

    kind = "conntrackd"
    #: conntrackd.h's request codes for "-s" and "-s cache"
    STATS, STATS_CACHE = 21, 29

    def __init__(self, ns: Netns, workdir: str, sync_ip: str, *, iface: str = "sync0",
                 mode: str = "FTFW", mode_opts: str = "", group: str = SYNC_GROUP,
                 port: int = 3780) -> None:
        super().__init__(ns, workdir)
        self.conf = os.path.join(workdir, "conntrackd.conf")
        self.socket = os.path.join(workdir, "conntrackd.ctl")
        with open(self.conf, "w") as f:
            f.write(_CONNTRACKD_CONF.format(mode=mode, mode_opts=mode_opts, group=group,
                                            port=port, sync_ip=sync_ip, iface=iface,
                                            dir=workdir))
        self.start()

    def start(self) -> None:
        proc = self.ns.popen("conntrackd", "-C", self.conf, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.proc = proc
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"conntrackd did not start in {self.ns.name}")
            time.sleep(0.005)

    def ctl(self, *flags: str, timeout: float = 120) -> str:
        return self.ns.run("conntrackd", "-C", self.conf, *flags, timeout=timeout).stdout

    def ask(self, code: int) -> str:
        """One request on conntrackd's UNIX socket (a native int), its answer's text: cheaper
        than a `conntrackd -s` process per poll (~10 ms of CPU each)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.socket)
            s.sendall(struct.pack("=i", code))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def _objects(self, which: str) -> int:
        m = re.search(rf"cache:{which}\s+active objects:\s+(\d+)", self.ask(self.STATS_CACHE))
        return int(m.group(1)) if m else 0

    def external_count(self) -> int:
        return self._objects("external")

    def internal_count(self) -> int:
        return self._objects("internal")

    def bytes_sent(self) -> int:
        m = re.search(r"(\d+) Bytes sent", self.ask(self.STATS))
        return int(m.group(1)) if m else 0

    def ready(self) -> bool:
        return True  # no peer state to ask for; callers wait past its 1 s alive interval


# --- keepalived ---------------------------------------------------------------------------------

_KEEPALIVED_CONF = """
global_defs {{
    router_id {name}
    vrrp_version 3
    script_user root
    enable_script_security
    vrrp_garp_master_repeat 2{fifo}
}}
vrrp_instance FW {{
    state BACKUP
    interface lan0
    virtual_router_id 51
    priority {priority}
    advert_int {advert}
    track_interface {{
        lan0
        wan0
    }}
    virtual_ipaddress {{
{vips}
    }}
    notify_master "{notify} primary"
    notify_backup "{notify} backup"
    notify_fault "{notify} fault"
}}
"""


class Keepalived(LabDaemon):
    """keepalived (VRRPv3) in a firewall namespace, moving both VIPs of a ClusterTopology and
    running the shipped notify script (`notify_script()`) against `daemon` (None: no
    replication). Each notification's start and end go to `workdir/notify.log`.

    With `notify_fifo` keepalived also writes its state changes to that FIFO
    (`vrrp_notify_fifo`, lines like `INSTANCE "FW" MASTER 150`) and the notify script runs no
    conntrackd-py command: the daemon follows the FIFO itself.
    """

    kind = "keepalived"

    def __init__(self, ns: Netns, workdir: str, topo: ClusterTopology, priority: int,
                 daemon: DaemonProc | None, advert: float = 0.2,
                 notify_fifo: str | None = None) -> None:
        super().__init__(ns, workdir)
        shipped = os.path.join(workdir, "conntrackd-py-notify.sh")
        with open(shipped, "wb") as f:
            f.write(notify_script())
        os.chmod(shipped, 0o755)
        notify = os.path.join(workdir, "notify.sh")
        bindir = os.path.dirname(sys.executable)
        self.events = os.path.join(workdir, "notify.log")
        with open(notify, "w") as f:
            f.write("#!/bin/sh\n"
                    f'echo "$(date +%s.%N) start $1" >> {self.events}\n')
            if daemon is not None and notify_fifo is None:
                cli = os.path.join(bindir, "conntrackd-py")
                if not os.access(cli, os.X_OK):
                    cli = shutil.which("conntrackd-py") or cli
                f.write(f"CONNTRACKD_PY_CONFIG={daemon.conf} CONNTRACKD_PY={cli} "
                        f"{shipped} \"$1\" >> {workdir}/notify.out 2>&1\n")
            f.write(f'echo "$(date +%s.%N) done $1" >> {self.events}\n')
        os.chmod(notify, 0o755)
        a = topo.site
        vips = "\n".join(f"        {v}" for v in (
            f"10.{a}.1.1/24 dev lan0", f"10.{a}.2.1/24 dev wan0"))
        self.conf = os.path.join(workdir, "keepalived.conf")
        with open(self.conf, "w") as f:
            f.write(_KEEPALIVED_CONF.format(
                name=ns.name, priority=priority, advert=advert, vips=vips, notify=notify,
                fifo="" if notify_fifo is None else f"\n    vrrp_notify_fifo {notify_fifo}"))
        self.start()

    def start(self) -> None:
        w = self.workdir
        self.started = time.time()
        with open(f"{w}/keepalived.log", "a") as log:
            self.proc = self.ns.popen(
                "keepalived", "-n", "-l", "-D", "-P", "-f", self.conf, "-p", f"{w}/k.pid",
                "-r", f"{w}/vrrp.pid", "-c", f"{w}/chk.pid", "--no-syslog",
                stdout=log, stderr=subprocess.STDOUT)

    def notifications(self) -> list[tuple[float, str, str]]:
        try:
            with open(self.events) as f:
                return [(float(t), what, state) for t, what, state in
                        (line.split() for line in f if line.strip())]
        except FileNotFoundError:
            return []

    def is_master(self) -> bool:
        """Master since the last start(), with the notify script's MASTER actions done."""
        n = [x for x in self.notifications() if x[1] == "done" and x[0] >= self.started]
        return bool(n) and n[-1][2] == "primary"

    def kill(self) -> None:
        super().kill()
        # keepalived's VRRP child may outlive the parent for a moment
        with contextlib.suppress(OSError, ValueError), open(
                os.path.join(self.workdir, "vrrp.pid")) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)
