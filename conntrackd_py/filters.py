"""Which flows a node tracks and replicates: the configured filters as one predicate.

Owns the policy only (protocols, addresses, TCP states, and always the sync link's own
traffic); it sees config dataclasses and Flows, never YAML or sockets. `build_filter(cfg)` is
the daemon's predicate for a configuration (at start and on SIGHUP).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .flow import Flow, Tuple

if TYPE_CHECKING:
    from .config import Config, ListFilter

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


#: (host addresses as raw bytes, networks per address length as (mask, network ints) groups)
Compiled = tuple[frozenset[bytes], dict[int, tuple[tuple[int, frozenset[int]], ...]]]


def _compile(nets: list[Net]) -> Compiled:
    """Single hosts as their raw bytes (what events carry: one set lookup, no conversion; the
    usual conntrackd.conf lists only hosts), other networks as integers per address length
    (4 or 16 bytes) grouped by netmask: matching an event's raw address bytes then needs no
    ipaddress objects (they were a fifth of the ingest cost), and one set lookup per distinct
    prefix length, not a scan of every network (20k filter networks would cost 20k
    comparisons per flow)."""
    hosts: set[bytes] = set()
    groups: dict[int, dict[int, set[int]]] = {4: {}, 16: {}}
    for n in nets:
        if n.prefixlen == n.max_prefixlen:
            hosts.add(n.network_address.packed)
            continue
        size = 4 if n.version == 4 else 16
        groups[size].setdefault(int(n.netmask), set()).add(int(n.network_address))
    # sorted only for a deterministic order: any match is a match
    return frozenset(hosts), {
        size: tuple((mask, frozenset(addrs)) for mask, addrs in sorted(by_mask.items()))
        for size, by_mask in groups.items() if by_mask}


def _matcher(nets: list[Net]) -> Callable[[bytes, bytes], bool]:
    """(a, b) -> whether either address is in `nets`, fastest for what `nets` holds."""
    hosts, groups = _compile(nets)
    if not groups:
        return lambda a, b: a in hosts or b in hosts

    def either(a: bytes, b: bytes) -> bool:
        if a in hosts or b in hosts:
            return True
        for addr in (a, b):
            by_mask = groups.get(len(addr))
            if by_mask:
                x = int.from_bytes(addr, "big")
                for mask, addrs in by_mask:
                    if x & mask in addrs:
                        return True
        return False
    return either


def build(protocols: tuple[str, tuple[int, ...]] | None = None,
          addresses: tuple[str, tuple[Net, ...]] | None = None,
          tcp_states: tuple[str, tuple[int, ...]] | None = None,
          sync_ports: Iterable[int] = (),
          sync_addrs: Iterable[str] = ()) -> Callable[[Flow], bool]:
    """A predicate: True = track and replicate the flow.

    Each filter is (policy, items) with policy "accept" (only these) or "ignore" (all but
    these). An address filter looks at the original source and the reply source, as
    conntrackd's does: a port forward to an ignored VIP is replicated (its reply comes from the
    inside server), a flow from or to one of the firewall's own ignored addresses is not. With
    "accept", a flow of an address family that no listed network has is dropped (conntrackd
    too). Flows of the sync protocol itself (UDP to one of `sync_ports`, or between `sync_addrs`)
    are always ignored: replicating them would feed the link its own traffic.
    """
    checks: list[Callable[[Flow], bool]] = []
    if protocols is not None:
        pol, protos = protocols
        pset = frozenset(protos)
        checks.append((lambda f: f.orig.proto in pset) if pol == "accept"
                      else (lambda f: f.orig.proto not in pset))
    if addresses is not None:
        pol, nets = addresses
        either = _matcher(list(nets))

        def addr_hit(f: Flow) -> bool:
            # conntrackd's rule (filter.c, ct_filter_check): a flow's real endpoints are the
            # original source and the *reply* source. The original destination of a DNAT'd
            # flow is the address it was sent to (a VIP that operators list as ignored), not
            # the server that answers; the reply destination of a SNAT'd flow is likewise the
            # firewall's rewritten address.
            return either(f.orig.src, f.reply.src)

        checks.append(addr_hit if pol == "accept" else (lambda f: not addr_hit(f)))
    if tcp_states is not None:
        pol, states = tcp_states
        sset = frozenset(states)

        def state_ok(f: Flow) -> bool:
            if f.orig.proto != 6 or f.state is None:
                return True
            return (f.state in sset) == (pol == "accept")

        checks.append(state_ok)
    sync_set = frozenset(ipaddress.ip_address(a).packed for a in sync_addrs)
    ports = frozenset(sync_ports)
    if ports or sync_set:
        def not_sync(f: Flow) -> bool:
            o: Tuple = f.orig
            # the sync protocol's own datagrams: its port *and* a sync-link address, so a
            # client flow that happens to use the same port is still replicated
            if o.proto == 17 and (o.dport in ports or o.sport in ports) and (
                    o.src in sync_set or o.dst in sync_set):
                return False
            return not (o.src in sync_set and o.dst in sync_set)

        checks.append(not_sync)
    if not checks:
        return lambda f: True
    if len(checks) == 1:
        return checks[0]
    return lambda f: all(c(f) for c in checks)


def build_filter(cfg: Config) -> Callable[[Flow], bool]:
    """The configured filters (cfg.filters) as one predicate; with ignore_sync_link, the sync
    channels' own ports and addresses (general.mode sync only) are ignored too."""
    from .transport import channel_specs  # the channels as opened: one reading of the config

    f = cfg.filters
    specs = channel_specs(cfg.sync.channels) if cfg.general.mode == "sync" else []
    sync_addrs: list[str] = []
    for s in specs:
        sync_addrs += [a for a in (s.source, s.bind, *s.peers) if a]
    ports = {s.port for s in specs}
    sync_addrs += [s.group for s in specs if s.group]

    def listed(lf: ListFilter) -> tuple[str, tuple[Any, ...]] | None:
        return (lf.policy, tuple(lf.items)) if lf.items else None

    return build(
        protocols=listed(f.protocols), addresses=listed(f.addresses),
        tcp_states=listed(f.tcp_states),
        sync_ports=ports if f.ignore_sync_link else (),
        sync_addrs=sync_addrs if f.ignore_sync_link else (),
    )
