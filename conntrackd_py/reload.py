"""SIGHUP: what a reload of the configuration changes in a running daemon.

This module owns the rule: logging and filters (and a conntrackd.conf import's warning) take
effect at once; a change to node, general, netlink, sync, stats, metrics or keepalived is named
as needing a restart and not applied (their sockets, tasks, writer process and identity are
built at start). It also owns the import warning's log lines
(once at start, again on SIGHUP only when it changed). It is pure: the daemon reads the file,
builds the filter and applies the result.
"""

from __future__ import annotations

import dataclasses
import logging

from .config import Config

log = logging.getLogger(__name__)

#: the sections a running daemon cannot change: their sockets, tasks and identity are built
#: at start
RESTART_SECTIONS = ("node", "general", "netlink", "sync", "stats", "metrics", "keepalived")


def reloaded(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration to run after SIGHUP read `new`, and the sections whose change is
    not applied (a restart applies them)."""
    needs_restart = [name for name in RESTART_SECTIONS
                     if getattr(new, name) != getattr(running, name)]
    return dataclasses.replace(running, logging=new.logging, filters=new.filters,
                               import_warning=new.import_warning,
                               import_notes=new.import_notes), needs_restart


def log_import(cfg: Config, running: Config | None) -> None:
    """A conntrackd.conf read natively: its one-line warning (again on SIGHUP only when it
    changed), each note at INFO."""
    if cfg.import_warning is None or (
            running is not None and running.import_warning == cfg.import_warning):
        return
    log.warning("%s", cfg.import_warning)
    for note in cfg.import_notes:
        log.info("%s: %s", cfg.path, note)
