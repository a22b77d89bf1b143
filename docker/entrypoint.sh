#!/bin/bash
# conntrackd-py container entrypoint.
#
# 1. runs the scripts in /docker-entrypoint.d/*.sh (in name order; for site setup),
# 2. loads /etc/conntrackd-py/nftables.conf if it exists,
# 3. starts the daemon: `conntrackd-py -C $CONNTRACKD_PY_CONFIG`, or with the arguments given
#    when they are flags (a command that is not a flag, e.g. `bash`, is run instead),
# 4. when /etc/keepalived/keepalived.conf exists, starts keepalived too, once the daemon answers
#    on its control socket (so keepalived's notify scripts can reach it), and stops the
#    container when either of the two exits. SIGTERM stops keepalived first (it gives up the
#    VIPs at once), then the daemon.
# CONNTRACKD_PY_DISABLE=1 runs keepalived alone (a firewall without state replication).
set -euo pipefail
CONFIG=${CONNTRACKD_PY_CONFIG:-/etc/conntrackd-py/conntrackd-py.yaml}
KEEPALIVED_CONF=${KEEPALIVED_CONF:-/etc/keepalived/keepalived.conf}
log() { printf '%s entrypoint: %s\n' "$(date +%T.%3N)" "$*" >&2; }

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$@"
fi
[ $# -gt 0 ] || set -- -C "$CONFIG"

for f in /docker-entrypoint.d/*.sh; do
  [ -r "$f" ] || continue
  log "running $f"
  bash "$f"
done
if [ -r /etc/conntrackd-py/nftables.conf ]; then
  log "loading /etc/conntrackd-py/nftables.conf"
  nft -f /etc/conntrackd-py/nftables.conf
fi

if [ ! -r "$KEEPALIVED_CONF" ]; then
  [ "${CONNTRACKD_PY_DISABLE:-0}" != 1 ] || { log "nothing to run"; exit 1; }
  exec conntrackd-py "$@"
fi

pids=()
stop() {
  trap - TERM INT
  log "stopping"
  [ -z "${kpid:-}" ] || kill -TERM "$kpid" 2>/dev/null || true
  [ -z "${dpid:-}" ] || { sleep 0.2; kill -TERM "$dpid" 2>/dev/null || true; }
}
trap stop TERM INT

if [ "${CONNTRACKD_PY_DISABLE:-0}" != 1 ]; then
  conntrackd-py "$@" &
  dpid=$!
  pids+=("$dpid")
  # wait (bounded) until the daemon answers on its control socket
  for _ in $(seq 100); do
    conntrackd-py "$@" -s runtime >/dev/null 2>&1 && break
    kill -0 "$dpid" 2>/dev/null || { wait "$dpid" || rc=$?; log "daemon exited (${rc:-0})"; exit "${rc:-1}"; }
    sleep 0.1
  done
  log "conntrackd-py running (pid $dpid)"
else
  log "CONNTRACKD_PY_DISABLE=1: no conntrackd-py"
fi
keepalived --dont-fork --log-console --log-detail --use-file "$KEEPALIVED_CONF" &
kpid=$!
pids+=("$kpid")
log "keepalived running (pid $kpid)"

rc=0
wait -n "${pids[@]}" || rc=$?
log "a process exited ($rc); stopping the others"
stop
wait || true
exit "$rc"
