"""The docker-compose failover scenario, run for real: docker/failover-test.sh.

Two firewall containers (own network namespaces, own conntrack tables) share two VIPs through
keepalived and replicate their state with conntrackd-py; a TCP stream through the VIPs must
survive a hard failure of the active one with no reset and no lost byte, and must not survive
it when replication is off (the test has teeth).

Needs a Docker engine with Compose. Skipped, with the reason, when `docker info` fails; set
CTPY_REQUIRE_DOCKER=1 to make that a failure instead. The base image is built once with
debootstrap (docker/build-base.sh, needs root and a Debian mirror; cached) unless BASE_IMAGE
names another one, e.g. debian:bookworm-slim where a registry is reachable. SKIP_BUILD=1 tests
the image CTPY_IMAGE (default conntrackd-py:local) as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.docker

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"
RUN_TIMEOUT = 240  # one failover run: start, stream, fail over, drain, tear down


def _run(argv: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=DOCKER_DIR, env={**os.environ, **env}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                          check=False)


def _tail(out: str, n: int = 60) -> str:
    return "\n".join(out.splitlines()[-n:])


@pytest.fixture(scope="module")
def image() -> str:
    """Builds (or finds cached) the base image and the conntrackd-py image from this checkout."""
    problem = None
    if shutil.which("docker") is None:
        problem = "the docker command is not installed"
    else:
        info = _run(["docker", "info"], timeout=60)
        if info.returncode != 0:
            problem = f"`docker info` failed: {_tail(info.stdout, 5)}"
    if problem is not None:
        if os.environ.get("CTPY_REQUIRE_DOCKER") == "1":
            pytest.fail(f"docker test required but cannot run: {problem}")
        pytest.skip(f"no usable Docker engine: {problem}")
    tag = os.environ.get("CTPY_IMAGE", "conntrackd-py:local")
    if os.environ.get("SKIP_BUILD") == "1":  # test the image as it is
        return tag
    if not os.environ.get("BASE_IMAGE"):
        base = _run(["./build-base.sh"], timeout=900)
        assert base.returncode == 0, f"docker/build-base.sh failed:\n{_tail(base.stdout)}"
    build = _run(["./build-image.sh"], timeout=600, IMAGE=tag)
    assert build.returncode == 0, f"docker/build-image.sh failed:\n{_tail(build.stdout)}"
    return tag


def _failover(image: str, replication: str) -> tuple[int, str, dict[str, Any]]:
    res = _run(["./failover-test.sh"], timeout=RUN_TIMEOUT, REPLICATION=replication,
               SKIP_BUILD="1", CTPY_IMAGE=image)
    m = re.findall(r"stream result: (\{.*\})", res.stdout)
    return res.returncode, res.stdout, (json.loads(m[-1]) if m else {})


def _timing(out: str) -> dict[str, Any]:
    """failover-test.sh's `takeover timing: {...}` line (ms from the stream's last echo)."""
    m = re.findall(r"takeover timing: (\{.*\})", out)
    return json.loads(m[-1]) if m else {}


def test_stream_survives_failover_with_replication(
        image: str, request: pytest.FixtureRequest) -> None:
    rc, out, result = _failover(image, "on")
    assert rc == 0, f"the stream did not survive the failover (exit {rc}):\n{_tail(out)}"
    assert result.get("errors") == [], _tail(out)
    assert result["received"] == result["sent"], _tail(out)
    timing = {"stall_s": result["max_stall"], **_timing(out)}
    # user properties (not record_property, which warns under junit_family=xunit2)
    request.node.user_properties.extend(timing.items())
    print(f"failover stall {result['max_stall']}s, {result['received']} lines, none lost; "
          f"takeover timing {timing}")


def test_stream_dies_without_replication(image: str) -> None:
    rc, out, result = _failover(image, "off")
    assert rc != 2, f"the failover test could not run (exit 2):\n{_tail(out)}"
    assert rc == 1, f"without replication the stream must not survive (exit {rc}):\n{_tail(out)}"
    assert result.get("errors"), _tail(out)
