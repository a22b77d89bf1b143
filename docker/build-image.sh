#!/usr/bin/env bash
# Build the conntrackd-py image from this checkout, with nothing downloaded inside the build:
# the package and its dependencies are turned into wheels on the host (docker/pkg/ and
# docker/wheels/), and the Dockerfile installs them with `pip install --no-index`.
#
#   docker/build-image.sh                     # tag conntrackd-py:local
#   IMAGE=conntrackd-py:1.0 docker/build-image.sh
#   BASE_IMAGE=debian:bookworm-slim docker/build-image.sh
#
# BASE_IMAGE defaults to the local debootstrap image (docker/build-base.sh) when it exists, and
# to the public debian:bookworm-slim otherwise. PYTHON is the host interpreter used to build the
# wheels (default: the checkout's .venv, else python3); dependency wheels are fetched for the
# image's Python (PY_VERSION, 3.11 on bookworm) whatever the host's version is.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$PWD
REPO=$(cd .. && pwd)

IMAGE=${IMAGE:-conntrackd-py:local}
LOCAL_BASE=conntrackd-py-base:bookworm
if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then BASE_IMAGE=$LOCAL_BASE
  else BASE_IMAGE=debian:bookworm-slim; fi
fi
PY_VERSION=${PY_VERSION:-3.11}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
case "$(docker info -f '{{.Architecture}}' 2>/dev/null || uname -m)" in
  x86_64|amd64) ARCH=x86_64 ;;
  aarch64|arm64) ARCH=aarch64 ;;
  *) ARCH=$(uname -m) ;;
esac

log() { printf 'build-image: %s\n' "$*" >&2; }
start=$(date +%s)

# Wheels: the package itself into pkg/ (reproducible, so an unchanged checkout hits Docker's
# layer cache), its dependencies into wheels/ as binary wheels for the image's Python and
# architecture (a layer of their own, cached while they do not change).
rm -rf "$HERE/wheels" "$HERE/pkg"
mkdir -p "$HERE/wheels" "$HERE/pkg"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp -a "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/conntrackd_py" "$build/"
find "$build" -name __pycache__ -prune -exec rm -rf {} +
isolation=--no-build-isolation   # offline when the host has setuptools and wheel
"$PYTHON" -c 'import setuptools, wheel' 2>/dev/null || isolation=
"$PYTHON" -m pip wheel -q --no-deps $isolation -w "$HERE/pkg" "$build"
pyv=${PY_VERSION/./}
"$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --abi "cp$pyv" --platform "manylinux2014_$ARCH" \
  --platform "manylinux_2_17_$ARCH" --platform "manylinux_2_28_$ARCH" --platform any \
  -d "$HERE/wheels" "$HERE"/pkg/conntrackd_py-*.whl
rm -f "$HERE"/wheels/conntrackd_py-*.whl
log "wheels: $(cd "$HERE" && printf '%s\n' pkg/*.whl wheels/*.whl | sed -E 's,^[a-z]+/,,; s/-(py2|py3|cp3).*//' | tr '\n' ' ')"

old=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
log "docker build $IMAGE FROM $BASE_IMAGE"
docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" "$HERE" 2>&1 >/dev/null \
  | { grep -v -E 'legacy builder is deprecated|Install the buildx|docs.docker.com/go/buildx|^$' || true; } >&2
# the image this tag named before, now untagged: removed unless something still uses it
if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
  docker rmi "$old" >/dev/null 2>&1 || true
fi
log "built $IMAGE in $(( $(date +%s) - start ))s"
