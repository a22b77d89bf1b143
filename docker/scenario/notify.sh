#!/bin/bash
# keepalived notify script of the compose scenario, after conntrackd's primary-backup.sh:
#   primary: commit the external cache to the kernel (-c), flush the internal cache (-f
#            internal), resync it with the kernel (-R) and send a bulk update to the peer (-B);
#   backup:  ask the peer for a resync (-n), then -t;
#   fault:   -t.
# -t is conntrackd's RESET_TIMERS: the kernel table (this node's flows as master, zombies once
# it is backup) is flushed sync.purge_timeout (60 s) later, and a later -c cancels that.
# CTPY_NOTIFY_PURGE=0 leaves -t out.
#
# Only the commit is on the failover's critical path (the stream is stalled until it is done),
# so the client must start fast. CTPY_NOTIFY_CLIENT (from /etc/conntrackd-py/notify.env):
#   socket (default): one short Python process talks to the control socket with the package's
#           own client (conntrackd_py.ctlclient: json and socket only), all the steps over one
#           connection; ~0.05 s to the commit instead of ~0.2-0.8 s per `conntrackd-py` run,
#           which parses the YAML config (PyYAML) just to find the socket;
#   cli:    the `conntrackd-py -C FILE -c` etc. commands, one process per step.
# keepalived does not wait for a notify script before running the next one (a node that goes
# MASTER and back to BACKUP within a second runs both at once): a lock runs them one at a
# time, in order. Output goes to the container's log (PID 1's stdout), with timestamps; the
# `state ... at EPOCH` and `commit ... +N ms` lines give the daemon's share of a failover.
exec >>/proc/1/fd/1 2>&1
T0=$(date +%s.%N)
STATE=${1:-}
# shellcheck disable=SC1091  # written by fw-setup.sh
[ ! -r /etc/conntrackd-py/notify.env ] || . /etc/conntrackd-py/notify.env
CONF=${CONNTRACKD_PY_CONFIG:-/etc/conntrackd-py/conntrackd-py.yaml}
SOCK=${CTPY_NOTIFY_SOCKET:-/run/conntrackd-py.sock}   # = general.control_socket (fw*.yaml)
CLIENT=${CTPY_NOTIFY_CLIENT:-socket}
log() { printf '%s notify: %s\n' "$(date +%T.%3N)" "$*"; }
since() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%d", (b - a) * 1000 }'; }

exec 9>/run/ctpy-notify.lock
flock 9
log "state $STATE at $T0 (client: $CLIENT)"

case "$STATE" in
  primary) steps=(commit flush_internal resync_internal bulk_send); flags=(-c "-f internal" -R -B) ;;
  backup) steps=(request_resync); flags=(-n) ;;
  fault) steps=(); flags=() ;;
  *) log "unknown state '$STATE'"; exit 1 ;;
esac
if [ "${CTPY_NOTIFY_PURGE:-1}" = 1 ] && [ "$STATE" != primary ]; then
  steps+=(purge); flags+=(-t)
fi

if [ "$CLIENT" = cli ]; then
  for f in "${flags[@]}"; do
    rc=0
    # shellcheck disable=SC2086  # "-f internal" is two words
    conntrackd-py -C "$CONF" $f || rc=$?
    log "conntrackd-py $f -> $rc, +$(since) ms"
  done
else
  # The interpreter of the installed conntrackd-py (its venv), isolated (-I: no user site,
  # no PYTHON* variables).
  py=$(sed -n '1s/^#!//p' "$(command -v conntrackd-py)")
  "${py:-python3}" -I - "$SOCK" "$T0" "${steps[@]}" <<'PY'
import sys
import time

sock, t0, steps = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
started = time.time()
from conntrackd_py.ctlclient import ControlClient, ControlError  # noqa: E402

CALLS = {"commit": ("commit", {}), "flush_internal": ("flush", {"cache": "internal"}),
         "resync_internal": ("resync_internal", {}), "bulk_send": ("bulk_send", {}),
         "request_resync": ("request_resync", {"node": None}), "purge": ("purge", {})}


def log(msg):
    now = time.time()
    print(time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d} "
          f"notify: {msg}", flush=True)


rc = 0
try:
    client = ControlClient(sock, timeout=120)
except OSError as e:
    log(f"cannot reach the daemon at {sock}: {e}")
    sys.exit(1)
log(f"client up +{(time.time() - t0) * 1000:.0f} ms (python {(time.time() - started) * 1000:.0f}"
    " ms of it)")
with client:
    for step in steps:
        cmd, args = CALLS[step]
        t = time.time()
        try:
            res = client.call(cmd, **args)
        except (ControlError, OSError) as e:
            log(f"{step} -> FAILED: {e}")
            rc = 1
            continue
        now = time.time()
        if cmd == "commit":
            res = (f"created {res['created']}, updated {res['updated']}, failed {res['failed']}, "
                   f"kernel {res['seconds'] * 1000:.1f} ms" + (f" {res['errors']}" if res["errors"] else ""))
        log(f"{step} -> {res} in {(now - t) * 1000:.1f} ms, +{(now - t0) * 1000:.0f} ms")
sys.exit(rc)
PY
fi
log "state $STATE done, +$(since) ms"
