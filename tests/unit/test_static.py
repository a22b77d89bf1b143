"""Static checks as tests: ruff and mypy --strict over the package, the lab, the tests and the
benchmarks. They run inside the README's one test command, so CI (which runs exactly that
command) fails on a lint or type error as it fails on a broken behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = ["conntrackd_py", "lab", "tests", "bench"]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def _trees() -> list[str]:
    return [t for t in TREES if (ROOT / t).is_dir()]


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_static_checks_pass(tool: str) -> None:
    if tool == "ruff":
        res = _run("ruff", "check", *_trees())
    else:
        res = _run("mypy", "--strict", *_trees())
    assert res.returncode == 0, f"{tool} found problems:\n{res.stdout}{res.stderr}"
