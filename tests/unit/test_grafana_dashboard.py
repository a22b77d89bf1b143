"""The Grafana dashboard: valid JSON model, and every metric it queries is one we expose."""

from __future__ import annotations

import functools
import importlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conntrackd_py.metrics import exposition

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parents[1] / "config" / "grafana" / "conntrackd-py-dashboard.json"

# A real Daemon's snapshot comes from test_daemon_shell (tests/ is not a package; pytest's
# default import mode puts this directory on sys.path, but do it here too for other modes).
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
_shell = importlib.import_module("test_daemon_shell")

METRIC = re.compile(r"(?<![\w:])conntrackd_py_[A-Za-z0-9_]*")
COUNTER_FUNCS = re.compile(r"\b(?:rate|irate|increase)\(\s*$")


@functools.cache
def exposed() -> dict[str, str]:
    """Sample name -> family type, over real Daemon snapshots: one with the external cache
    (and every other section), one in direct mode (the direct writes section)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        snaps = [_shell.daemon_snapshot(Path(tmp) / "ext"),
                 _shell.daemon_snapshot(Path(tmp) / "direct", external=False)]
    for snap in snaps:
        text = exposition(functools.partial(lambda s: s, snap))().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[s.name] = fam.type
    return out


def load() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        d: dict[str, Any] = json.load(f)
    return d


def query_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def exprs(d: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in query_panels(d) for t in p["targets"]]


def test_dashboard_is_a_grafana_json_model() -> None:
    d = load()
    assert d["title"]
    assert d["uid"]
    assert d["schemaVersion"] >= 36
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus"
               for i in d["__inputs"])
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert "instance" in variables["instance"]["definition"]

    panels = query_panels(d)
    assert panels
    assert {p["title"] for p in d["panels"] if p["type"] == "row"} >= {
        "Cluster health", "Caches", "Kernel events", "Replication traffic", "Commit",
        "Accounting"}
    ids = [p["id"] for p in d["panels"]] + [p["id"] for p in panels if p not in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], f"panel {p['title']!r} has no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), f"panel {p['title']!r} has an empty expr"


def test_every_metric_in_the_dashboard_is_exposed() -> None:
    d = load()
    names = exposed()
    used = {n for e in exprs(d) for n in METRIC.findall(e)}
    used |= set(METRIC.findall(d["templating"]["list"][1]["definition"]))
    assert used, "no conntrackd_py_ metric found in the dashboard"
    assert used <= names.keys(), f"not exposed by the collector: {sorted(used - names.keys())}"


@pytest.mark.parametrize("expr", exprs(load()))
def test_counters_are_rated_and_gauges_are_not(expr: str) -> None:
    kinds = exposed()
    for m in METRIC.finditer(expr):
        assert m.group() in kinds, f"{m.group()} is not exposed by the collector"
        rated = bool(COUNTER_FUNCS.search(expr[:m.start()]))
        if kinds[m.group()] == "counter":
            assert rated, f"counter {m.group()} needs rate()/increase() in {expr!r}"
        else:
            assert not rated, f"gauge {m.group()} must not be rated in {expr!r}"
        assert expr[m.end():].startswith('{instance=~"$instance"}'), \
            f"{m.group()} is not filtered by $instance in {expr!r}"


def test_every_metric_in_the_alert_rules_is_exposed() -> None:
    import yaml
    rules_file = HERE.parents[1] / "config" / "prometheus" / "conntrackd-py-alerts.yaml"
    doc = yaml.safe_load(rules_file.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 9
    used = {m for r in rules for m in METRIC.findall(r["expr"])}
    assert used
    assert used <= set(exposed()), sorted(used - set(exposed()))
