"""conntrackd 1.4.7's client outputs, from our structured records: `-i`/`-e` lines, their XML
(`-x`), the `-s [KIND]` layouts, and `-o json`'s flow records.

Scripts written for conntrackd parse these texts; the layouts are copied from its real
outputs (captured in tests/data/conntrackd_outputs/, compared byte for byte by the tests), not
from its source. This module owns formatting only: it must do no I/O, and it imports
`flow` (for decoding a raw dump row) lazily, since `-c`/`-f` must not pay for it.

A raw dump row is `[origin or None, key hex, value hex]` plus, when the daemon sends it,
the seconds since the entry entered its cache (conntrackd's `[active since Ns]`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .flow import Flow, Tuple

__all__ = ["dump_json", "dump_text", "dump_xml", "event_line", "flow_line", "flow_record",
           "flow_xml", "stats_text", "watch_text"]

#: libnetfilter_conntrack's state names, by protocol number (what conntrackd prints)
_STATES: Mapping[int, tuple[str, ...]] = {
    6: ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
        "TIME_WAIT", "CLOSE", "LISTEN"),
    132: ("NONE", "CLOSED", "COOKIE_WAIT", "COOKIE_ECHOED", "ESTABLISHED", "SHUTDOWN_SENT",
          "SHUTDOWN_RECD", "SHUTDOWN_ACK_SENT", "HEARTBEAT_SENT", "HEARTBEAT_ACKED"),
    33: ("NONE", "REQUEST", "RESPOND", "PARTOPEN", "OPEN", "CLOSEREQ", "CLOSING", "TIMEWAIT"),
}
_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 58: "icmpv6", 132: "sctp",
          136: "udplite"}
_PORTS = frozenset({6, 17, 33, 132, 136})
_SEEN_REPLY, _ASSURED = 0x2, 0x4


def _state(f: Flow) -> str | None:
    names = _STATES.get(f.orig.proto)
    if names is None or f.state is None:
        return None
    return names[f.state] if 0 <= f.state < len(names) else str(f.state)


def _addr(a: bytes) -> str:
    from socket import AF_INET, AF_INET6, inet_ntop
    return inet_ntop(AF_INET if len(a) == 4 else AF_INET6, a)


def _tuple_text(t: Tuple) -> str:
    s = f"src={_addr(t.src)} dst={_addr(t.dst)} "
    if t.proto in _PORTS:
        return f"{s}sport={t.sport} dport={t.dport} "
    if t.proto == 47:
        return f"{s}srckey=0x{t.sport:x} dstkey=0x{t.dport:x} "
    if t.proto in (1, 58):
        return f"{s}type={t.icmp_type} code={t.icmp_code} id={t.icmp_id} "
    return s


def _head(p: int) -> str:
    return f"{_NAMES.get(p, 'unknown'):<8} {p} "


def _body(f: Flow, reply: bool = True) -> str:
    """An entry's fields after its protocol columns, each followed by a space; without the
    reply tuple when `reply` is false (conntrackd's external cache has none)."""
    state = _state(f)
    out = state + " " if state is not None else ""
    out += _tuple_text(f.orig)
    if not f.status & _SEEN_REPLY:
        out += "[UNREPLIED] "
    if reply:
        out += _tuple_text(f.reply)
    if f.status & _ASSURED:
        out += "[ASSURED] "
    out += f"mark={f.mark} "
    if f.secmark:
        out += f"secmark={f.secmark} "
    if f.zone:
        out += f"zone={f.zone} "
    if f.helper:
        out += f"helper={f.helper} "
    return out


def flow_line(f: Flow, origin: int | None = None, active: int | None = None,
              reply: bool = True) -> str:
    """One `conntrackd -i`/`-e` line (conntrackd: no timeout, no use= column; its `-e` lines
    have no reply tuple: `reply=False`)."""
    out = _head(f.orig.proto) + _body(f, reply)
    if origin is not None:
        out += f"[node={origin}] "  # ours: which peer the flow came from (external cache)
    if active is not None:
        return out + f"[active since {active}s]"
    return out.rstrip(" ")


def event_line(event: str, f: Flow | None, orig: Tuple, origin: int | None = None) -> str:
    """One `-E` line as `conntrack -E` prints it: the event right-aligned in 9 columns, then
    the entry with its timeout. A destroyed entry is known by its key alone (its original
    tuple): the rest of its line is left out."""
    head = f"{'[' + event.upper() + ']':>9} " + _head(orig.proto)
    tail = f"[node={origin}]" if origin is not None else ""
    if f is None:
        return (head + _tuple_text(orig) + tail).rstrip(" ")
    return (head + f"{f.timeout} " + _body(f) + tail).rstrip(" ")


def watch_text(item: object) -> str:
    """A `watch` stream item as an `-E` line: a structured change `[event, where, origin,
    key hex, value hex or None]` formatted here; a text line (an older daemon) as it is."""
    from .flow import PackError, unpack_flow, unpack_key
    if not isinstance(item, list) or len(item) != 5:
        return str(item)
    event, _where, origin, key, value = item
    try:
        kb = bytes.fromhex(key)
        _zone, orig = unpack_key(kb)
        f = unpack_flow(kb, bytes.fromhex(value)) if isinstance(value, str) else None
    except (PackError, ValueError, TypeError):
        return f"[{str(event).upper()}] undecodable entry, key {str(key)[:80]}"
    return event_line(str(event), f, orig, origin if isinstance(origin, int) else None)


def _xml_tuple(t: Tuple, direction: str) -> str:
    l3 = ('<layer3 protonum="2" protoname="ipv4">' if len(t.src) == 4
          else '<layer3 protonum="10" protoname="ipv6">')
    out = (f'<meta direction="{direction}">{l3}<src>{_addr(t.src)}</src>'
           f'<dst>{_addr(t.dst)}</dst></layer3>'
           f'<layer4 protonum="{t.proto}" protoname="{_NAMES.get(t.proto, "unknown")}">')
    if t.proto in _PORTS:
        out += f"<sport>{t.sport}</sport><dport>{t.dport}</dport>"
    return out + "</layer4></meta>"


#: the reply direction of an entry of conntrackd's external cache (it replicates none)
_NO_REPLY = ('<meta direction="reply"><layer3 protonum="0" protoname="unknown"><src></src>'
             '<dst></dst></layer3><layer4 protonum="0" protoname="unknown"></layer4></meta>')


def flow_xml(f: Flow, reply: bool = True) -> str:
    """One `conntrackd -i -x` element, on one line as conntrackd prints it (`-e -x`:
    `reply=False`, conntrackd's empty reply direction)."""
    ind = '<meta direction="independent">'
    state = _state(f)
    if state is not None:
        ind += f"<state>{state}</state>"
    ind += f"<mark>{f.mark}</mark>"
    if f.secmark:
        ind += f"<secmark>{f.secmark}</secmark>"
    if f.zone:
        ind += f"<zone>{f.zone}</zone>"
    if f.ct_id:
        ind += f"<id>{f.ct_id}</id>"
    if f.status & _ASSURED:
        ind += "<assured/>"
    if not f.status & _SEEN_REPLY:
        ind += "<unreplied/>"
    if f.helper:
        ind += f"<helper>{f.helper}</helper>"
    back = _xml_tuple(f.reply, "reply") if reply else _NO_REPLY
    return f"<flow>{_xml_tuple(f.orig, 'original')}{back}{ind}</meta></flow>"


def _tuple_record(t: Tuple) -> dict[str, Any]:
    rec: dict[str, Any] = {"src": _addr(t.src), "dst": _addr(t.dst)}
    if t.proto in _PORTS or t.proto == 47:
        rec["sport"], rec["dport"] = t.sport, t.dport
    elif t.proto in (1, 58):
        rec["type"], rec["code"], rec["id"] = t.icmp_type, t.icmp_code, t.icmp_id
    return rec


def flow_record(f: Flow, origin: int | None = None, active: int | None = None
                ) -> dict[str, Any]:
    """`-o json`: one flow's fields, named."""
    c = f.counters
    return {
        "family": "ipv4" if len(f.orig.src) == 4 else "ipv6",
        "proto": _NAMES.get(f.orig.proto, str(f.orig.proto)), "protonum": f.orig.proto,
        "state": _state(f), "original": _tuple_record(f.orig), "reply": _tuple_record(f.reply),
        "status": f.status, "assured": bool(f.status & _ASSURED),
        "unreplied": not f.status & _SEEN_REPLY, "timeout": f.timeout, "mark": f.mark,
        "zone": f.zone, "helper": f.helper or None,
        "counters": None if c is None else {
            "orig_packets": c.orig_packets, "orig_bytes": c.orig_bytes,
            "reply_packets": c.reply_packets, "reply_bytes": c.reply_bytes},
        "origin_node": origin, "active_since_s": active,
    }


def _decoded(rows: Iterable[Sequence[Any]], proto: int | None, nat: str | None
             ) -> tuple[list[tuple[Flow, int | None, int | None]], int]:
    """Flows of raw dump rows, filtered as the daemon's text dump filters; and how many rows
    did not describe a flow."""
    from .flow import PackError, unpack_flow
    out: list[tuple[Flow, int | None, int | None]] = []
    bad = 0
    for row in rows:
        try:
            origin, key, value = row[0], bytes.fromhex(row[1]), bytes.fromhex(row[2])
            active = row[3] if len(row) > 3 and isinstance(row[3], int) else None
            f = unpack_flow(key, value)
        except (PackError, ValueError, TypeError, IndexError):
            bad += 1
            continue
        if proto is not None and f.orig.proto != proto:
            continue
        snat, dnat = f.is_snat, f.is_dnat
        if (nat == "src" and not snat) or (nat == "dst" and not dnat) or (
                nat == "any" and not (snat or dnat)):
            continue
        out.append((f, origin if isinstance(origin, int) else None, active))
    return out, bad


def dump_text(rows: Iterable[Sequence[Any]], proto: int | None = None,
              nat: str | None = None, full: bool = False) -> tuple[list[str], int]:
    """conntrackd's lines: an external flow (a row with an origin) without its reply tuple,
    as conntrackd shows its external cache; with `full` (ours), every tuple and the origin
    node."""
    flows, bad = _decoded(rows, proto, nat)
    return [flow_line(f, o if full else None, a, reply=full or o is None)
            for f, o, a in flows], bad


def dump_xml(rows: Iterable[Sequence[Any]], proto: int | None = None,
             nat: str | None = None, full: bool = False) -> tuple[list[str], int]:
    flows, bad = _decoded(rows, proto, nat)
    return [flow_xml(f, reply=full or o is None) for f, o, _ in flows], bad


def dump_json(rows: Iterable[Sequence[Any]], proto: int | None = None,
              nat: str | None = None) -> tuple[list[dict[str, Any]], int]:
    flows, bad = _decoded(rows, proto, nat)
    return [flow_record(f, o, a) for f, o, a in flows], bad


# --- -s: conntrackd's layouts over our snapshot (the daemon's `stats` JSON) ---------------------

def _g(d: Any, *path: str, default: Any = 0) -> Any:
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return default
        d = d[p]
    return d


def _u12(n: Any) -> str:
    return f"{int(n):>12}"


def _cache_block(name: str, active: int, created: int, updated: int, destroyed: int) -> str:
    return (f"cache {name}:\n"
            f"current active connections:\t{_u12(active)}\n"
            f"connections created:\t\t{_u12(created)}\tfailed:\t{_u12(0)}\n"
            f"connections updated:\t\t{_u12(updated)}\tfailed:\t{_u12(0)}\n"
            f"connections destroyed:\t\t{_u12(destroyed)}\tfailed:\t{_u12(0)}\n\n")


def _channels(s: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(kind word, device, counters) of each sync channel."""
    out = []
    for ch in _g(s, "link", "channels", default=[]) or []:
        name = str(ch.get("channel", ""))
        word = {"multicast": "multicast", "udp": "UDP", "tcp": "TCP"}.get(
            name.split(" ", 1)[0], "multicast")
        dev = name.rsplit(" on ", 1)[1] if " on " in name else name
        out.append((word, dev, ch))
    return out


def _traffic(ch: Mapping[str, Any]) -> str:
    return (f"{int(ch.get('bytes_sent', 0)):>20} Bytes sent "
            f"{int(ch.get('bytes_received', 0)):>20} Bytes recv\n"
            f"{int(ch.get('sent', 0)):>20} Pckts sent "
            f"{int(ch.get('received', 0)):>20} Pckts recv\n"
            f"{int(ch.get('send_errors', 0)):>20} Error send "
            f"{0:>20} Error recv\n\n")


def _active_link(s: Mapping[str, Any]) -> str:
    active = _g(s, "link", "active", default="")
    for word, dev, ch in _channels(s):
        if ch.get("channel") == active:
            return f"{word} traffic (active device={dev}):\n" + _traffic(ch)
    return ""


def _general(s: Mapping[str, Any]) -> str:
    ev = _g(s, "cache", "kernel_events", default={}) or {}
    sync = _g(s, "sync", "counters", default={}) or {}
    out = _cache_block("internal", _g(s, "cache", "internal"), _g(ev, "new"),
                       _g(ev, "update"), _g(ev, "destroy"))
    out += _cache_block("external", _g(s, "cache", "external"), 0,
                        _g(sync, "flows_received"), 0)
    acc = _g(s, "accounting", default={}) or {}
    out += (f"traffic processed:\n{int(_g(acc, 'bytes')):>20} Bytes      "
            f"{int(_g(acc, 'packets')):>20} Pckts\n\n")
    if _g(s, "sync", default=None) is not None:
        out += _active_link(s)
        out += (f"message tracking:\n{int(_g(sync, 'malformed')):>20} Malformed msgs "
                f"{int(_g(sync, 'lost')):>20} Lost msgs\n\n")
    return out


def _network(s: Mapping[str, Any]) -> str:
    c = _g(s, "sync", "counters", default={}) or {}
    # conntrackd's "Malformed messages" is the total of the lines below it. Ours: a datagram
    # that does not decode (header and payload are decoded at once: "Malformed header"), a
    # refused MAC (no line of its own in conntrackd: in the total only), and datagrams longer
    # than the MTU plus slack, which the transport drops before the engine sees them
    oversize = sum(int(_g(ch, "oversize")) for _, _, ch in _channels(s))
    malformed, bad_mac = int(_g(c, "malformed")), int(_g(c, "bad_mac"))
    rows = (("Malformed messages:", malformed + bad_mac + oversize),
            ("Wrong protocol version:", _g(c, "unknown_kind")),
            ("Malformed header:", malformed), ("Malformed payload:", 0),
            ("Bad message type:", 0), ("Truncated message:", 0),
            ("Bad message size:", oversize))
    out = "network statistics:\n\trecv:\n"
    out += "".join(f"\t\t{k}\t{int(v):>20}\n" for k, v in rows)
    out += f"\tsend:\n\t\tMalformed messages:\t{0:>20}\n\n"
    out += ("sequence tracking statistics:\n\trecv:\n"
            f"\t\tPackets lost:\t\t{int(_g(c, 'lost')):>20}\n"
            f"\t\tPackets before:\t\t{int(_g(c, 'replayed')):>20}\n\n")
    return out + _active_link(s)


def _cache_ext(name: str, active: int, created: int, updated: int, deleted: int) -> str:
    return (f"cache:{name}\tactive objects:\t\t{_u12(active)}\n"
            f"\tactive/total entries:\t\t{_u12(active)}/{_u12(active)}\n"
            f"\tcreation OK/failed:\t\t{_u12(created)}/{_u12(0)}\n"
            f"\t\tno memory available:\t{_u12(0)}\n"
            f"\t\tno space left in cache:\t{_u12(0)}\n"
            f"\tupdate OK/failed:\t\t{_u12(updated)}/{_u12(0)}\n"
            f"\t\tentry not found:\t{_u12(0)}\n"
            f"\tdeletion created/failed:\t{_u12(deleted)}/{_u12(0)}\n"
            f"\t\tentry not found:\t{_u12(0)}\n\n")


def _cache(s: Mapping[str, Any]) -> str:
    ev = _g(s, "cache", "kernel_events", default={}) or {}
    sync = _g(s, "sync", "counters", default={}) or {}
    return (_cache_ext("internal", _g(s, "cache", "internal"), _g(ev, "new"), _g(ev, "update"),
                       _g(ev, "destroy"))
            + _cache_ext("external", _g(s, "cache", "external"), 0,
                         _g(sync, "flows_received"), 0))


def _runtime(s: Mapping[str, Any]) -> str:
    ev = _g(s, "cache", "kernel_events", default={}) or {}
    tr = _g(s, "cache", "tracker", default={}) or {}
    rt = _g(s, "runtime", default={}) or {}
    out = f"daemon uptime: {int(float(_g(rt, 'uptime_s')) // 60)} min\n\n"
    out += ("netlink stats:\n"
            f"\tevents received:\t{int(_g(ev, 'events')):>20}\n"
            f"\tevents filtered:\t{int(_g(tr, 'ignored')):>20}\n"
            f"\tevents unknown type:\t\t{_u12(0)}\n"
            f"\tcatch event failed:\t\t{_u12(_g(ev, 'malformed'))}\n"
            f"\tdump unknown type:\t\t{_u12(0)}\n"
            f"\tnetlink overrun:\t\t{_u12(_g(ev, 'overruns'))}\n"
            f"\tflush kernel table:\t\t{_u12(0)}\n"
            f"\tresync with kernel table:\t{_u12(_g(tr, 'dumps'))}\n"
            f"\tcurrent buffer size (in bytes):\t{_u12(_g(ev, 'rcvbuf'))}\n\n")
    out += ("runtime stats:\n"
            f"\tchild process failed:\t\t{_u12(0)}\n"
            f"\t\tchild process segfault:\t{_u12(0)}\n"
            f"\t\tchild process termsig:\t{_u12(0)}\n"
            f"\tselect failed:\t\t\t{_u12(0)}\n"
            f"\twait failed:\t\t\t{_u12(0)}\n"
            f"\tlocal read failed:\t\t{_u12(_g(s, 'control', 'errors'))}\n"
            f"\tlocal unknown request:\t\t{_u12(_g(s, 'control', 'bad_requests'))}\n\n")
    return out


def _link(s: Mapping[str, Any]) -> str:
    active = _g(s, "link", "active", default="")
    out = ""
    for word, dev, ch in _channels(s):
        status = "RUNNING" if ch.get("up") else "DOWN"
        role = "ACTIVE" if ch.get("channel") == active else "BACKUP"
        out += f"{word} traffic device={dev} status={status} role={role}:\n" + _traffic(ch)
    return out


def _queue(s: Mapping[str, Any]) -> str:
    depth = int(_g(s, "sync", "counters", "resend_queue_depth"))
    return ("allocated queue nodes:\t\t" + _u12(0) + "\n\n"
            + "".join(f"queue {name}:\ncurrent elements:\t\t{_u12(n)}\n"
                      f"maximum elements:\t\t{_u12(m)}\nnot enough space errors:\t{_u12(0)}\n\n"
                      for name, n, m in (("txqueue", 0, 2147483647), ("errorq", 0, 128),
                                         ("rsqueue", depth, 131072))))


def _rsqueue(s: Mapping[str, Any]) -> str:
    # conntrackd lists each queued object's sequence number; ours are not per object
    return f"resent queue (len={int(_g(s, 'sync', 'counters', 'resend_queue_depth'))})\n"


#: conntrackd's `-s` word -> (the daemon's stats kind to ask for, its layout)
STATS_LAYOUTS: Mapping[str, tuple[str | None, Any]] = {
    "ct": (None, _general), "network": ("network", _network), "cache": (None, _cache),
    "runtime": (None, _runtime), "link": ("link", _link), "queue": ("sync", _queue),
    "rsqueue": ("sync", _rsqueue), "process": ("control", lambda s: ""),
    "expect": ("control", lambda s: ""),
}


def stats_text(word: str, snapshot: Mapping[str, Any]) -> str:
    """`conntrackd -s WORD`'s text (WORD one of STATS_LAYOUTS) for the daemon's snapshot."""
    return str(STATS_LAYOUTS[word][1](snapshot))
