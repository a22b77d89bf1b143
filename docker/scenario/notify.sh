#!/bin/bash
# keepalived notify script of the compose scenario, after conntrackd's primary-backup.sh:
#   primary: commit the external cache to the kernel (-c), flush the internal cache (-f
#            internal), resync it with the kernel (-R) and send a bulk update to the peer (-B);
#   backup:  purge after the purge timeout (-t) and ask the peer for a resync (-n);
#   fault:   purge after the purge timeout (-t).
# Output goes to the container's log (PID 1's stdout), with timestamps.
exec >>/proc/1/fd/1 2>&1
CONF=${CONNTRACKD_PY_CONFIG:-/etc/conntrackd-py/conntrackd-py.yaml}
log() { printf '%s notify: %s\n' "$(date +%T.%3N)" "$*"; }
ctl() {
  local rc=0
  conntrackd-py -C "$CONF" "$@" || rc=$?
  log "conntrackd-py $* -> $rc"
}
log "state $1"
case "$1" in
  primary) ctl -c; ctl -f internal; ctl -R; ctl -B ;;
  backup) ctl -t; ctl -n ;;
  fault) ctl -t ;;
  *) log "unknown state '$1'"; exit 1 ;;
esac
log "state $1 done"
