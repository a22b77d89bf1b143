"""Typed readers for composed YAML nodes: the machinery under `config.py`.

Owns composing untrusted YAML text into nodes (`compose_untrusted`: nesting, values and alias
expansion bounded as it composes, so any text costs time and memory linear in its length and
no reader below recurses deeper than MAX_DEPTH), turning those nodes into checked Python values
(ints in range, sizes, durations, addresses, lists, dataclass sections) and finding where a key
sits in the file, so an error can name its line. It knows nothing of the conntrackd-py schema
(that is `config.py`) and never constructs arbitrary Python objects from YAML: only the safe
scalar types are built.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar, cast

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.parser import Parser as EventParser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

YNode = yaml.Node
Parser = Callable[[YNode, str], Any]
T = TypeVar("T")


class Invalid(Exception):
    """A problem at key path `key`; the caller adds the file name and the line of `key`."""

    def __init__(self, key: str, problem: str, mark: yaml.Mark | None = None) -> None:
        super().__init__(key, problem)
        self.key, self.problem, self.mark = key, problem, mark


# --- composing untrusted text ------------------------------------------------------------------

#: Nesting deeper than this is refused while composing: a schema path is at most six levels
#: deep, and PyYAML's composer recurses once per level (10000 levels was a RecursionError).
MAX_DEPTH = 64
#: Values that aliases may add to the document when expanded. Aliases share nodes, but every
#: reader after the composer walks them expanded: nested aliases of a 500-byte "billion laughs"
#: ran 27.9 s into a MemoryError. Real configs alias a channel's few keys.
MAX_ALIAS_VALUES = 100_000
#: Values in a whole document, aliases expanded: three filter lists of 65536 entries fit.
#: It bounds the cost of any accepted text (about 25 us a value, on libyaml's events).
MAX_VALUES = 200_000

class _Bounds(Composer):
    """A YAML composer (events -> nodes, safe tags resolved as yaml.SafeLoader does) that
    refuses, as it composes: nesting deeper than MAX_DEPTH (aliases expanded, so a chain of
    aliases cannot build depth either), more than MAX_VALUES values, alias expansion beyond
    MAX_ALIAS_VALUES, aliases inside their own anchor and redefined anchors. So the cost of
    any text is bounded and linear in its length, and the readers after it, which recurse
    over the expanded tree, need no guard against cycles or recursion depth. Its nodes are
    the plain PyYAML ones. The events come from either parser below."""

    peek_event: Callable[[], Any]  # the event parser's, mixed in below
    dispose: Callable[[], None]

    def __init__(self) -> None:
        Composer.__init__(self)
        self._depth = 0  # nodes open above the one being composed
        self._values = 0  # values in the document so far, every alias expanded
        self._aliased = 0  # of those, the ones aliases added
        self._tallest: list[int] = [0]  # per open node: the height of its tallest child
        #: id(anchored node) -> (values, height) of it expanded, once complete
        self._anchored: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: YNode | None, index: Any) -> YNode | None:
        event: Any = self.peek_event()
        mark = cast(yaml.Mark, event.start_mark)
        if isinstance(event, AliasEvent):
            node = super().compose_node(parent, index)
            done = self._anchored.get(id(node))
            if done is None:
                raise Invalid("", f"the alias *{event.anchor} is inside its own anchor "
                              f"&{event.anchor}", mark)
            size, height = done
            self._values += size
            self._aliased += size
            if self._aliased > MAX_ALIAS_VALUES:
                raise Invalid("", f"YAML aliases expand to more than {MAX_ALIAS_VALUES} "
                              "values here (nested aliases); write the values out instead",
                              mark)
            self._check(self._depth + height, mark)
            self._tallest[-1] = max(self._tallest[-1], height)
            return node
        if event.anchor is not None and event.anchor in self.anchors:
            first = self.anchors[event.anchor].start_mark.line + 1
            raise Invalid("", f"the anchor &{event.anchor} is defined twice (first on line "
                          f"{first})", mark)
        self._values += 1
        self._check(self._depth + 1, mark)
        start = self._values - 1
        self._depth += 1
        self._tallest.append(0)
        node = super().compose_node(parent, index)
        self._depth -= 1
        height = 1 + self._tallest.pop()
        self._tallest[-1] = max(self._tallest[-1], height)
        if event.anchor is not None:
            self._anchored[id(node)] = (self._values - start, height)
        return node

    def _check(self, depth: int, mark: yaml.Mark) -> None:
        if depth > MAX_DEPTH:
            raise Invalid("", f"nested deeper than {MAX_DEPTH} levels", mark)
        if self._values > MAX_VALUES:
            raise Invalid("", f"more than {MAX_VALUES} values in one file (aliases "
                          "expanded); a config needs far fewer", mark)


class _PyLoader(_Bounds, Reader, Scanner, EventParser, Resolver):
    """Events from PyYAML's pure-Python scanner and parser."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        EventParser.__init__(self)
        _Bounds.__init__(self)
        Resolver.__init__(self)


_LOADERS: list[Callable[[str], _Bounds]] = [_PyLoader]
if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _CLoader(_Bounds, CParser, Resolver):
        """Events from libyaml's parser: a fifth of the pure-Python cost on long lists (the
        composing, ours, is Python either way: _Bounds comes first in the MRO)."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _Bounds.__init__(self)
            Resolver.__init__(self)

    _LOADERS.insert(0, _CLoader)


def compose_untrusted(text: str, *, pure: bool = False) -> YNode | None:
    """The YAML node tree of `text` (None when empty), built only from safe tags, nesting and
    aliases bounded. Raises Invalid (with a mark) for the bounds, yaml.YAMLError for bad YAML;
    nothing else for any text. `pure`: use PyYAML's own parser even where libyaml is there
    (tests hold both to the same bounds)."""
    loader = (_PyLoader if pure else _LOADERS[0])(text)
    try:
        node: YNode | None = loader.get_single_node()
        return node
    finally:
        loader.dispose()


# --- structure --------------------------------------------------------------------------------

def f(parse: Parser, default: Any = MISSING, *, factory: Callable[[], Any] | None = None,
      need: str = "") -> Any:
    """A dataclass field read from YAML by `parse`; `need` explains a required key."""
    md = {"parse": parse, "need": need}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(metadata=md) if default is MISSING else field(default=default, metadata=md)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def short(text: str) -> str:
    """Text from the file as an error shows it: a hostile megabyte stays out of the log, and
    control characters (YAML escapes like "\\e") out of the terminal."""
    text = text if len(text) <= 60 else text[:50] + "..."
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def show(node: YNode) -> str:
    """The value as the user wrote it: quoted if it is a string."""
    if isinstance(node, ScalarNode):
        text = short(str(node.value))
        return repr(text) if node.tag.endswith(":str") else text or "null"
    return "a mapping" if isinstance(node, MappingNode) else "a list"


def hint(word: str, options: Any) -> str:
    if len(word) > 60:  # no option is that long; difflib's cost grows with it
        return ""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_null(node: YNode) -> bool:
    return isinstance(node, ScalarNode) and node.tag.endswith(":null")


def scalar(node: YNode, path: str) -> Any:
    if not isinstance(node, ScalarNode):
        raise Invalid(path, f"expected a single value, got {show(node)}")
    try:
        return SafeConstructor().construct_object(node)
    except (ValueError, LookupError, ArithmeticError):
        # a timestamp-shaped 2024-02-30, `!!bool maybe` (a KeyError in PyYAML), an integer
        # past Python's digit limit: let the caller reject the text
        return str(node.value)


def mapping(node: YNode | None, path: str) -> dict[str, tuple[YNode, YNode]]:
    """Key -> (key node, value node); an empty or null section is an empty mapping."""
    if node is None or is_null(node):
        return {}
    if not isinstance(node, MappingNode):
        what = "the top level must be a mapping of sections" if not path else \
            "expected a mapping of keys"
        raise Invalid(path, f"{what}, got {show(node)}", node.start_mark)
    out: dict[str, tuple[YNode, YNode]] = {}
    for k, v in _pairs(node, path):
        out[str(k.value)] = (k, v)
    return out


_MERGE = "tag:yaml.org,2002:merge"


def _pairs(node: MappingNode, path: str) -> list[tuple[YNode, YNode]]:
    """The (key, value) pairs with YAML merge keys (`<<: *base`) expanded, lowest priority
    first: merged mappings, the earlier of them winning, then the mapping's own keys.
    Unlike SafeConstructor.flatten_mapping this leaves the (possibly shared) nodes alone."""
    own: list[tuple[YNode, YNode]] = []
    merged: list[tuple[YNode, YNode]] = []
    seen: dict[str, YNode] = {}
    for k, v in node.value:
        if not isinstance(k, ScalarNode):
            raise Invalid(path, "keys must be plain words", k.start_mark)
        if k.tag == _MERGE:
            sources = v.value if isinstance(v, SequenceNode) else [v]
            for src in reversed(sources):
                if not isinstance(src, MappingNode):
                    raise Invalid(path, "a merge key (<<) takes a mapping or a list of them",
                                  k.start_mark)
                merged += _pairs(src, path)
            continue
        if k.value in seen:
            raise Invalid(join(path, short(str(k.value))), "appears twice (first on line "
                          f"{seen[k.value].start_mark.line + 1})", k.start_mark)
        seen[k.value] = k
        own.append((k, v))
    return merged + own


def build(cls: type[T], node: YNode | None, path: str, extra: dict[str, Any] | None = None) -> T:
    """A dataclass from a mapping: fields made with `f` are its keys; others come from `extra`."""
    pairs = mapping(node, path)
    spec = {x.name: x for x in fields(cls) if "parse" in x.metadata}  # type: ignore[arg-type]
    for key, (knode, _) in pairs.items():
        if key not in spec:
            why = hint(key, spec) or f"; expected one of: {', '.join(spec)}"
            raise Invalid(join(path, short(key)), f"unknown key{why}", knode.start_mark)
    kwargs = dict(extra or {})
    for name, fld in spec.items():
        if name in pairs:
            kwargs[name] = fld.metadata["parse"](pairs[name][1], join(path, name))
        elif fld.default is MISSING and fld.default_factory is MISSING:
            raise Invalid(join(path, name), f"is required: {fld.metadata['need']}",
                          node.start_mark if node is not None else None)
    return cls(**kwargs)


def section(cls: type[T], check: Callable[[T, str], None] | None = None) -> Parser:
    """A parser for a nested dataclass; `check(obj, path)` adds rules across its fields."""
    def parse(node: YNode, path: str) -> T:
        obj = build(cls, node, path)
        if check is not None:
            check(obj, path)
        return obj
    return parse


def sec(cls: type[Any]) -> Any:
    """A field holding a whole section, all defaults when absent."""
    return f(section(cls), factory=cls)


def line_of(root: YNode | None, key: str) -> int | None:
    """The line of key path `key` (like "sync.channels[0].udp.bind") in the tree, or of its
    closest parent that is written in the file. It walks only that path: an index of every
    path in the file would cost the length of each path per value (a 1 MB key above 200000
    values would be 200 GB)."""
    node, mark = root, None
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", key):
        if isinstance(node, SequenceNode) and part[0] == "[":
            i = int(part[1:-1])
            if i >= len(node.value):
                break
            node = node.value[i]
            mark = node.start_mark
        elif isinstance(node, MappingNode) and part[0] != "[":
            hit = next((kv for kv in node.value
                        if isinstance(kv[0], ScalarNode) and kv[0].value == part), None)
            if hit is None:
                break
            mark, node = hit[0].start_mark, hit[1]
        else:
            break
    return mark.line + 1 if mark is not None else None


# --- values -----------------------------------------------------------------------------------

def integer(lo: int, hi: int) -> Parser:
    def parse(node: YNode, path: str) -> int:
        v = scalar(node, path)
        if type(v) is not int or not lo <= v <= hi:
            raise Invalid(path, f"expected an integer {lo}..{hi}, got {show(node)}")
        return v
    return parse


def boolean(node: YNode, path: str) -> bool:
    v = scalar(node, path)
    if type(v) is not bool:
        raise Invalid(path, f"expected true or false, got {show(node)}")
    return v


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(positive: bool = False, hi: float = math.inf) -> Parser:
    """Seconds as a number, or a string like '200ms', '1.5s', '5m', '1h'; at most `hi`."""
    def parse(node: YNode, path: str) -> float:
        v, secs = scalar(node, path), None
        if isinstance(v, int | float) and not isinstance(v, bool):
            secs = float(v) if isinstance(v, float) or abs(v) < 1 << 64 else math.inf
        elif isinstance(v, str) and (m := _DURATION.fullmatch(v.strip())):
            secs = float(m[1]) * _SECONDS[m[2]]
        if secs is None or not math.isfinite(secs) or secs < 0:
            raise Invalid(path, "expected a duration: seconds, or a string like '200ms', "
                          f"'1s', '5m', got {show(node)}")
        if positive and secs == 0:
            raise Invalid(path, "must be longer than 0")
        if secs > hi:
            raise Invalid(path, f"{secs:.10g}s is longer than the maximum, {hi:.10g}s")
        return secs
    return parse


def number(lo: float, hi: float) -> Parser:
    """A plain number (integer or decimal) in lo..hi."""
    def parse(node: YNode, path: str) -> float:
        v = scalar(node, path)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and (
            isinstance(v, float) or abs(v) < 1 << 64)
        if not ok or not lo <= float(v) <= hi:
            raise Invalid(path, f"expected a number {lo:g}..{hi:g}, got {show(node)}")
        return float(v)
    return parse


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMG])(?:I?B)?|B)?", re.IGNORECASE)


def size(lo: int, hi: int = 1 << 30) -> Parser:
    """Bytes as an integer, or a string like '8MiB', '8M', '512k' (K/M/G are powers of 1024)."""
    def parse(node: YNode, path: str) -> int:
        v, n = scalar(node, path), None
        if type(v) is int:
            n = v
        elif isinstance(v, str) and (m := _SIZE.fullmatch(v.strip())):
            exact = float(m[1]) * 1024 ** (" KMG".index(m[2].upper()) if m[2] else 0)
            n = int(exact) if exact.is_integer() else None
        if n is None:
            raise Invalid(path, "expected a size: bytes, or a string like '8MiB', '8M', "
                          f"'512KiB', got {show(node)}")
        if not lo <= n <= hi:
            raise Invalid(path, f"expected a size between {lo} and {hi} bytes, got {n}")
        return n
    return parse


def choice(*options: str) -> Parser:
    def parse(node: YNode, path: str) -> str:
        v = scalar(node, path)
        if not isinstance(v, str) or v not in options:
            raise Invalid(path, f"expected one of {', '.join(map(repr, options))}, got "
                          f"{show(node)}{hint(str(node.value), options)}")
        return v
    return parse


def string(node: YNode, path: str) -> str:
    """Any non-empty scalar, as written (so `interface: 1234` is the string '1234')."""
    if not isinstance(node, ScalarNode) or is_null(node) or node.value == "":
        raise Invalid(path, f"expected a non-empty string, got {show(node)}")
    return str(node.value)


def any_string(node: YNode, path: str) -> str:
    return "" if isinstance(node, ScalarNode) and node.value == "" else string(node, path)


def optional(parse: Parser) -> Parser:
    """`null` (or `~`, or nothing) means None."""
    return lambda node, path: None if is_null(node) else parse(node, path)


def listof(item: Parser, *, min_len: int = 0, max_len: int = 1 << 16,
           key: Callable[[Any], Any] = lambda v: v) -> Parser:
    """A tuple; entries whose `key` repeats an earlier one are errors."""
    def parse(node: YNode, path: str) -> tuple[Any, ...]:
        if not isinstance(node, SequenceNode) and not is_null(node):
            raise Invalid(path, f"expected a list, got {show(node)}")
        values = node.value if isinstance(node, SequenceNode) else []
        out = tuple(item(n, f"{path}[{i}]") for i, n in enumerate(values))
        if not min_len <= len(out) <= max_len:
            want = f"at least {min_len}" if len(out) < min_len else f"at most {max_len}"
            raise Invalid(path, f"needs {want} entries, got {len(out)}")
        first: dict[Any, int] = {}  # a dict, not a list scan: 20k addresses took 25.6 s
        for i, v in enumerate(out):
            j = first.setdefault(key(v), i)
            if j != i:
                raise Invalid(f"{path}[{i}]", f"repeats {path}[{j}]")
        return out
    return parse


def ip(node: YNode, path: str) -> str:
    """An IPv4 or IPv6 address, in canonical form."""
    try:
        return str(ipaddress.ip_address(string(node, path)))
    except ValueError:
        raise Invalid(path, f"{show(node)} is not an IPv4 or IPv6 address") from None


def unicast(node: YNode, path: str) -> str:
    addr = ip(node, path)
    if ipaddress.ip_address(addr).is_multicast:
        raise Invalid(path, f"{addr!r} is a multicast address; expected a unicast one")
    return addr


def multicast(node: YNode, path: str) -> str:
    text = string(node, path)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if addr is None or not addr.is_multicast:
        raise Invalid(path, f"{short(text)!r} is not a multicast address (224.0.0.0/4 or ff00::/8)")
    return str(addr)


def network(node: YNode, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address (as a /32 or /128) or a CIDR network without host bits."""
    text = string(node, path)
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        try:
            why = f" (did you mean '{ipaddress.ip_network(text, strict=False)}'?)"
        except ValueError:
            why = ""
    raise Invalid(path, f"{short(text)!r} is not an address or CIDR network like 10.0.0.0/8 or "
                  f"fd00::/64{why}")


_IFNAME = re.compile(r"[^/:\s]{1,15}")


def ifname(node: YNode, path: str) -> str:
    name = string(node, path)
    if not _IFNAME.fullmatch(name):
        raise Invalid(path, f"{short(name)!r} is not an interface name (1-15 characters, no '/', "
                      "':' or spaces)")
    return name


def socket_path(node: YNode, path: str) -> str:
    name = string(node, path)
    if len(os.fsencode(name)) > 107:
        raise Invalid(path, "a UNIX socket path may be at most 107 bytes long")
    return name


def netns(node: YNode, path: str) -> str:
    name = string(node, path)
    if "/" in name or name in (".", ".."):
        raise Invalid(path, f"{short(name)!r} is not a namespace name (as in `ip netns add NAME`)")
    return name


def listen(node: YNode, path: str) -> str:
    """ADDRESS:PORT with a literal address, IPv6 in brackets."""
    text = string(node, path)
    m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text)
    try:
        addr = ipaddress.ip_address(m[1] or m[3]) if m else None
    except ValueError:
        addr = None
    if not m or addr is None or (addr.version == 6) != bool(m[1]) \
            or not 1 <= int(m[2] or m[4]) <= 65535:
        raise Invalid(path, f"expected ADDRESS:PORT like '127.0.0.1:9477' or '[::1]:9477', "
                      f"got {show(node)}")
    return text
