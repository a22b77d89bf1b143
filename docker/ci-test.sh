#!/usr/bin/env bash
# CI step for the docker part: runs the compose failover test (tests/docker, pytest marker
# `docker`) when a Docker engine with Compose is usable, and says why it skipped otherwise.
#
#   docker/ci-test.sh            # from anywhere; uses the checkout's .venv
#
# Exit status: pytest's when the test ran (0 = both modes behaved: replication on survives,
# off dies), 0 with a `SKIPPED:` line when Docker is unusable here (no docker command, `docker
# info` fails, no Compose). CTPY_REQUIRE_DOCKER=1 turns that skip into a failure (exit 1).
# Takes ~1 min with the base image cached (image build, one run per mode); the first build of
# the base image (debootstrap) takes a few minutes more.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-.venv/bin/python}

skip() {
  echo "SKIPPED: docker compose failover test (tests/docker): $*"
  [ "${CTPY_REQUIRE_DOCKER:-0}" != 1 ] || { echo "CTPY_REQUIRE_DOCKER=1: failing instead"; exit 1; }
  exit 0
}
command -v docker >/dev/null 2>&1 || skip "the docker command is not installed"
if ! info=$(timeout 60 docker info 2>&1); then
  skip "\`docker info\` failed: $(printf '%s\n' "$info" | grep -v '^ *$' | tail -n 2 | tr '\n' ' ')"
fi
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 \
  || skip "neither 'docker compose' nor 'docker-compose' is installed"

echo "docker compose failover test: $(docker version -f 'engine {{.Server.Version}}' 2>/dev/null)"
CTPY_REQUIRE_DOCKER=1 timeout 900 "$PY" -m pytest -m docker tests/docker -v -rA --durations=0
