"""reload.py: what SIGHUP applies at once, what it names as needing a restart."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from conntrackd_py.config import loads
from conntrackd_py.reload import log_import, reloaded

BASE = ("node: {id: 1}\n"
        "sync:\n  auth: {required: false}\n"
        "  channels: [{multicast: {group: 225.0.0.50}}]\n")


def test_logging_and_filters_apply_at_once_node_and_sync_need_a_restart() -> None:
    running = loads(BASE)
    new = loads(BASE.replace("id: 1", "id: 2").replace("225.0.0.50", "225.0.0.51")
                + "logging: {level: debug}\nfilters:\n  protocols: {ignore: [icmp]}\n")
    cfg, needs_restart = reloaded(running, new)
    assert needs_restart == ["node", "sync"]
    assert (cfg.logging, cfg.filters) == (new.logging, new.filters)
    assert (cfg.node, cfg.sync) == (running.node, running.sync)  # not applied


def test_an_unchanged_file_needs_no_restart() -> None:
    cfg, needs_restart = reloaded(loads(BASE), loads(BASE))
    assert (cfg, needs_restart) == (loads(BASE), [])


def test_the_import_warning_is_logged_again_only_when_it_changed(
        caplog: pytest.LogCaptureFixture) -> None:
    plain = loads(BASE)
    imported = dataclasses.replace(plain, import_warning="approximated: X",
                                   import_notes=("Filter (line 3): user space",))
    caplog.set_level(logging.INFO, logger="conntrackd_py.reload")
    log_import(plain, None)
    assert caplog.records == []  # a native YAML file: nothing to say
    log_import(imported, None)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "approximated: X"),
        (logging.INFO, "None: Filter (line 3): user space")]
    caplog.clear()
    log_import(imported, imported)  # SIGHUP, the same warning: quiet
    assert caplog.records == []
    log_import(dataclasses.replace(imported, import_warning="approximated: Y"), imported)
    assert caplog.records[0].getMessage() == "approximated: Y"


def test_stats_and_metrics_changes_are_named_not_pretended() -> None:
    # their listener, writer process and sinks are built at start: a reload that copied the
    # new settings into the running config would claim what the daemon does not do
    running = loads(BASE)
    new = loads(BASE + "metrics: {listen: '127.0.0.1:9101'}\n")
    cfg, needs_restart = reloaded(running, new)
    assert needs_restart == ["metrics"]
    assert cfg.metrics == running.metrics
