"""Hostile config input (#13): whatever the text, `load`/`loads` end in a Config or a
ConfigError (OSError for an unreadable file), and the cost of a text is linear in its size.

The bombs below are refused while composing, before anything walks the expanded tree; the
assertions are on the outcome (ConfigError naming the line), never on a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conntrackd_py import config_parse
from conntrackd_py.config import MAX_FILE_SIZE, Config, ConfigError, load, loads
from conntrackd_py.config_parse import MAX_ALIAS_VALUES, MAX_DEPTH, Invalid, compose_untrusted

BASE = ("node: {id: 1}\nsync:\n  auth: {required: false}\n"
        "  channels: [{multicast: {group: 225.0.0.50}}]\n")


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        loads(text, "hostile.yaml")
    return e.value


def laughs(levels: int, width: int = 9) -> str:
    """The classic "billion laughs": each level an anchored list of `width` aliases of the
    one before, so the last expands to about 9 * width**levels values."""
    lines = ["a0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def aliased_values(levels: int, width: int) -> int:
    """What the aliases of `laughs(levels, width)` add, each list counted as a value too."""
    size, total = 10, 0  # a0: the list and its 9 lols
    for _ in range(levels):
        total += width * size
        size = 1 + width * size
    return total


# --- aliases ----------------------------------------------------------------------------------

def test_a_500_byte_billion_laughs_is_refused_naming_the_line() -> None:
    text = laughs(9)
    assert len(text) < 500
    e = refused(text)
    assert e.problem.startswith(f"YAML aliases expand to more than {MAX_ALIAS_VALUES} values")
    assert e.filename == "hostile.yaml"
    # the aliases pass the bound at level 5 (line 6); the error points there
    assert aliased_values(4, 9) <= MAX_ALIAS_VALUES < aliased_values(5, 9)
    assert e.line == 6
    assert e.key == ""


def test_aliases_below_the_bound_still_work_and_count_expanded() -> None:
    # three levels: 9**4 = 6561 values, well below the bound: the document composes
    node = compose_untrusted(laughs(3))
    assert node is not None
    # merge keys with aliases (the documented use) load as before
    c = loads(BASE.replace("channels: [{multicast: {group: 225.0.0.50}}]",
                           "channels: [{multicast: &m {group: 225.0.0.50, ttl: 3}},"
                           " {multicast: {<<: *m, group: 225.0.0.51}}]"))
    assert [ch.multicast.ttl for ch in c.sync.channels if ch.multicast] == [3, 3]


def test_the_alias_bound_counts_values_not_alias_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_parse, "MAX_ALIAS_VALUES", 1000)  # the rule, at a cheaper size
    # one alias of a list just above the bound: a single alias event, too many values
    n = 1000
    text = "a: &a [" + ", ".join(["1"] * n) + "]\nb: *a\n"
    e = refused(text)
    assert e.problem.startswith("YAML aliases expand to more than 1000 values")
    assert e.line == 2
    # the same list written once, without an alias, is only a long list (refused by the
    # schema, not by the alias bound)
    e = refused("a: [" + ", ".join(["1"] * n) + "]\n")
    assert "aliases" not in e.problem


@pytest.mark.parametrize("text", [
    "a: &a [*a]\n",
    "node: &n {id: 1, x: *n}\n",
    "a: &a {b: [1, {c: *a}]}\n",
])
def test_an_alias_inside_its_own_anchor_is_refused(text: str) -> None:
    e = refused(text)
    assert "is inside its own anchor" in e.problem
    assert e.line == 1


def test_undefined_and_duplicate_anchors_are_config_errors() -> None:
    assert "undefined alias" in str(refused("a: *nope\n"))
    e = refused("a: &x 1\nb: &x 2\n")
    assert (e.problem, e.line) == ("the anchor &x is defined twice (first on line 1)", 2)


# --- nesting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "node: {id: 1}\nx: " + "[" * 10000 + "]" * 10000 + "\n",
    "node: {id: 1}\nx: " + "{a: " * 10000 + "1" + "}" * 10000 + "\n",
    "node: {id: 1}\ngeneral:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(10000)),
    "- " * 10000 + "x\n",
])
def test_nesting_10000_levels_deep_is_a_config_error_not_a_recursion_error(text: str) -> None:
    e = refused(text)
    # ours, or libyaml's own bound (1000 levels) when it parses the events
    assert e.problem in (f"nested deeper than {MAX_DEPTH} levels",
                         "not valid YAML: exceeded maximum nesting depth")
    assert e.line is not None


@pytest.mark.parametrize("link", ["a{i}: &a{i} [*a{j}]", "a{i}: &a{i} {{<<: *a{j}, k{i}: 1}}",
                                  "a{i}: &a{i} {{k: *a{j}}}"])
def test_a_chain_of_aliases_cannot_build_depth_either(link: str) -> None:
    # each link is shallow in the text; expanded, the last is 200 levels deep, and everything
    # after the composer (merge keys, the key index, the schema) recurses over the expansion
    lines = ["a0: &a0 {k: 1}"] + [link.format(i=i, j=i - 1) for i in range(1, 200)]
    e = refused("\n".join(lines) + "\n")
    assert e.problem == f"nested deeper than {MAX_DEPTH} levels"
    assert e.line is not None
    assert e.line < 200


def test_nesting_is_bounded_exactly_at_max_depth() -> None:
    assert compose_untrusted("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    # through an alias: the anchored list is MAX_DEPTH - 1 deep, the alias one level down
    deep = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert compose_untrusted(f"- &a {deep}\n- *a\n") is not None
    with pytest.raises(Invalid, match="nested deeper"):
        compose_untrusted(f"- &a {deep}\n- [*a]\n")
    with pytest.raises(Invalid, match="nested deeper"):
        compose_untrusted("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


def test_a_deep_config_file_is_a_config_error_from_load(tmp_path: Path) -> None:
    # what SIGHUP reads: load(), not loads()
    p = tmp_path / "deep.yaml"
    p.write_text("node: {id: 1}\nx: " + "[" * 10000 + "]" * 10000 + "\n")
    with pytest.raises(ConfigError, match=rf"nest.* \({p}:2\)"):
        load(p)
    p.write_text("node: {id: 1}\nx: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(ConfigError, match=rf"^nested deeper than {MAX_DEPTH} levels \({p}:2\)$"):
        load(p)


def test_values_in_a_document_are_bounded_aliases_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_parse, "MAX_VALUES", 1000)
    e = refused("a: [" + ",".join(["1"] * 1000) + "]\n")
    assert e.problem.startswith("more than 1000 values in one file")
    assert e.line == 1
    e = refused("a: &a [" + ",".join(["1"] * 600) + "]\nb: *a\n")
    assert e.problem.startswith("more than 1000 values in one file")
    assert e.line == 2
    assert compose_untrusted("a: [" + ",".join(["1"] * 990) + "]\n") is not None


# --- size -------------------------------------------------------------------------------------

def test_20k_filter_addresses_load_and_a_late_repeat_names_both_entries() -> None:
    addrs = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(20000)]
    text = BASE + "filters:\n  addresses:\n    ignore:\n" + "".join(f"    - {a}\n" for a in addrs)
    # one load (the pure-Python YAML scanner takes ~0.1 ms a line): the repeat is found only
    # after every entry was read and compared
    e = refused(text + "    - 10.0.5.0/24\n")
    assert e.key == "filters.addresses.ignore[20000]"
    assert e.problem == "repeats filters.addresses.ignore[5]"
    assert e.line == 7 + 20000 + 1


def test_a_file_larger_than_the_bound_is_refused_before_parsing(tmp_path: Path) -> None:
    p = tmp_path / "huge.yaml"
    with open(p, "wb") as fh:
        fh.write(BASE.encode())
        fh.write(b"#" * (MAX_FILE_SIZE + 1 - len(BASE)))
    assert os.path.getsize(p) == MAX_FILE_SIZE + 1
    with pytest.raises(ConfigError, match=r"larger than 4 MiB"):
        load(p)


def test_a_huge_value_is_shown_shortened_in_the_error() -> None:
    e = refused(BASE + "  purge_timeout: '" + "9" * 5000 + "'\n")
    assert e.key == "sync.purge_timeout"
    assert len(str(e)) < 300


@pytest.mark.parametrize(("text", "key"), [
    ("node: {id: !!bool maybe}\n", "node.id"),  # a KeyError inside PyYAML's constructor
    ("node: {id: !!int 0x}\n", "node.id"),
    ("node: {id: !!float x}\n", "node.id"),
    ("node: {id: !!timestamp 2024-13-45}\n", "node.id"),
    ("node: {id: " + "9" * 5000 + "}\n", "node.id"),  # past Python's int digit limit
    (BASE + "  peer_timeout: " + "9" * 400 + "\n", "sync.peer_timeout"),
    (BASE + "  limits: {resend_ratio: " + "9" * 400 + "}\n", "sync.limits.resend_ratio"),
    ("node: {id: !!binary 'not base64!'}\n", ""),
    ("node: {id: !!python/object:os.system 1}\n", ""),
    ("node: {id: !!set {1: null}}\n", "node.id"),
    ("? [a, b]\n: 1\n", ""),
    ("node: {id: 1}\n---\nnode: {id: 2}\n", ""),
])
def test_odd_scalars_and_tags_are_config_errors(text: str, key: str) -> None:
    assert refused(text).key == key


# --- any input --------------------------------------------------------------------------------

def outcome(text: str) -> Config | ConfigError:
    """The Config, or the ConfigError (any other exception fails the test)."""
    try:
        return loads(text, "fuzz.yaml")
    except ConfigError as e:
        err = e
    assert err.problem
    assert err.filename == "fuzz.yaml"
    return err


YAMLISH = st.lists(st.sampled_from(
    [*"{}[]:,-?&*!|>'\"#%@`~ \t\n.0123456789", "node", "id", "sync", "auth", "&a", "*a", "<<",
     "!!str", "!!int", "\n  ", "\n- "]),
    max_size=120).map("".join)


@given(YAMLISH)
def test_any_yamlish_text_loads_or_raises_config_error(text: str) -> None:
    outcome(text)


@given(st.text(max_size=300))
def test_any_text_loads_or_raises_config_error(text: str) -> None:
    outcome(text)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_in_a_file_load_or_raise_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_bytes(data)
        err = None
        try:
            load(p)
        except ConfigError as e:
            err = e
        assert err is None or err.filename == str(p)


def _schema_words(cls: type[Any], out: set[str]) -> set[str]:
    for fld in dataclasses.fields(cls):
        out.add(fld.name)
        for t in (fld.default_factory,):  # sections are made by their class
            if isinstance(t, type) and dataclasses.is_dataclass(t):
                _schema_words(t, out)
    return out


WORDS = sorted(_schema_words(Config, set()) | {"multicast", "udp", "group", "accept", "ignore"})
SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["225.0.0.50", "10.0.0.1", "fd00::1", "ff02::1", "eth0", "5s",
                              "8MiB", "ftfw", "sync", "stats", "tcp", "ESTABLISHED"]))
DOCS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(WORDS) | st.text(max_size=8), inner, max_size=5),
    max_leaves=30)


@given(st.dictionaries(st.sampled_from(WORDS), DOCS, max_size=6))
def test_random_documents_over_the_schema_words_load_or_raise_config_error(
        doc: dict[str, Any]) -> None:
    outcome(yaml.safe_dump(doc))


@given(DOCS, st.sampled_from(["node", "general", "sync", "sync.auth", "sync.limits",
                              "sync.ftfw", "filters", "filters.addresses", "metrics"]),
       st.sampled_from(WORDS))
def test_a_valid_config_with_one_random_value_loads_or_raises_config_error(
        value: Any, section: str, key: str) -> None:
    doc: dict[str, Any] = yaml.safe_load(BASE)
    where = doc
    for part in section.split("."):
        where = where.setdefault(part, {})
    where[key] = value
    got = outcome(yaml.safe_dump(doc))
    if isinstance(got, ConfigError):
        assert got.key == "" or got.line is not None


@given(st.integers(1, 12), st.integers(2, 12))
def test_generated_alias_bombs_are_refused_or_composed_with_bounded_expansion(
        levels: int, width: int) -> None:
    text = laughs(levels, width)
    expanded = aliased_values(levels, width)
    err = None
    try:
        compose_untrusted(text)
    except Invalid as e:
        err = e
    if expanded > MAX_ALIAS_VALUES:
        assert err is not None
        assert "aliases expand" in err.problem
    else:
        assert err is None


def test_compose_untrusted_is_what_the_entry_points_use() -> None:
    # a guard for the tests above: loads goes through the bounded composer
    assert config_parse.compose_untrusted is compose_untrusted
    e = refused("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert "nested deeper" in e.problem


def test_a_megabyte_key_above_many_values_costs_its_size_once() -> None:
    # an index of every key path would hold the key once per value (here 50k copies, 50 GB)
    # (an explicit key: YAML limits implicit ones to 1024 characters)
    text = "? " + "k" * 1_000_000 + "\n: [" + ",".join(["1"] * 50_000) + "]\n"
    e = refused(text)
    assert e.key == "k" * 50 + "..."
    assert e.problem.startswith("unknown key; expected one of: node, general")
    assert len(str(e)) < 300


@pytest.mark.parametrize("text", [
    "node: {id: 1}\n" + "x" * 100_000 + ": 1\n",
    BASE + "  channels: [{multicast: {group: '" + "1" * 100_000 + "'}}]\n",
    BASE.replace("225.0.0.50", "2" * 100_000),
    BASE + "  mode: " + "f" * 100_000 + "\n",
    BASE + "filters: {addresses: {ignore: ['" + "1" * 100_000 + "']}}\n",
])
def test_huge_keys_and_values_are_shortened_in_errors(text: str) -> None:
    assert len(str(refused(text))) < 400


@pytest.mark.parametrize("text", [
    'node: {id: 1, "\\e[31m": 1}\n',
    'node: {id: !!int "\\e[2J"}\n',
    'node: {id: 1}\n"\\x07\\e]0;owned\\x07": 1\n',
])
def test_control_characters_from_the_file_are_escaped_in_errors(text: str) -> None:
    e = refused(text)
    assert "\x1b" not in str(e)
    assert "\x07" not in str(e)
    assert "\\x1b" in str(e)


# --- both event parsers (libyaml's where PyYAML has it, PyYAML's own otherwise) ---------------

def compose_error(text: str, pure: bool) -> Invalid:
    with pytest.raises(Invalid) as e:
        compose_untrusted(text, pure=pure)
    return e.value


@pytest.mark.parametrize("pure", [False, True], ids=["libyaml", "pure"])
def test_both_parsers_hold_the_same_bounds(pure: bool) -> None:
    e = compose_error(laughs(9), pure)
    assert e.problem.startswith("YAML aliases expand")
    assert e.mark is not None
    assert e.mark.line + 1 == 6
    assert "inside its own anchor" in compose_error("a: &a [*a]\n", pure).problem
    assert "defined twice" in compose_error("a: &x 1\nb: &x 2\n", pure).problem
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    assert compose_error(deep, pure).problem == f"nested deeper than {MAX_DEPTH} levels"
    chain = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 100))
    assert "nested deeper" in compose_error(chain, pure).problem
    node = compose_untrusted(BASE, pure=pure)
    assert node is not None
    assert node.value[0][0].value == "node"


@given(YAMLISH)
def test_the_pure_parser_too_raises_only_yaml_errors_or_bounds(text: str) -> None:
    with contextlib.suppress(Invalid, yaml.YAMLError):  # anything else fails the test
        compose_untrusted(text, pure=True)
