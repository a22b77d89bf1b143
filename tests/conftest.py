"""Shared fixtures: the namespace lab for kernel and cluster tests, and its leak check."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lab import FirewallTopology, Lab, firewall_topology, reap_namespaces


@pytest.fixture
def require_root() -> None:
    """Kernel tests need root for namespaces; elsewhere they skip, but never quietly in CI."""
    if os.geteuid() != 0:
        reason = "needs root: creates network namespaces and reads conntrack tables"
        if os.environ.get("CI"):
            pytest.fail(f"kernel test cannot run in CI without root ({reason})")
        pytest.skip(reason)


@pytest.fixture
def lab(require_root: None) -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def fw_topo(lab: Lab) -> FirewallTopology:
    return firewall_topology(lab)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_namespaces() -> Iterator[None]:
    yield
    leaked = reap_namespaces()
    if leaked:
        pytest.fail(f"tests leaked network namespaces (now deleted): {', '.join(leaked)}")
