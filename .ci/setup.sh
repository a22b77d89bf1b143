#!/usr/bin/env bash
# Everything a fresh Debian machine needs to run and test conntrackd-py (idempotent, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
# nfdump: the IPFIX collector (nfcapd) the accounting export's live test runs; ulogd2: the
# reference IPFIX exporter the ipfix bench compares with
pkgs=(conntrack conntrackd nftables iproute2 keepalived python3-venv nfdump ulogd2)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the packaged daemons where an init system runs; the lab runs its own copies
# inside namespaces only, so stop any that the package started in this (root) namespace.
for svc in conntrackd keepalived ulogd2; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# the install carries the lab (a top-level package beside conntrackd_py: tests, bench, demo) and
# the notify script as package data; fail here, not in the middle of a test run, if it did not
.venv/bin/python -c 'import lab, lab.programs, conntrackd_py.cli; lab.notify_script()'
