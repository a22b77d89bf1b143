#!/bin/sh
# keepalived notify script for conntrackd-py (the sequence of conntrackd's primary-backup.sh).
#   keepalived.conf:  notify_master "/etc/conntrackd-py/notify.sh primary"  (etc.)
# Shipped as package data of conntrackd_py (conntrackd_py/keepalived/notify.sh; in a source
# checkout config/keepalived/notify.sh links to it); install it with e.g.
#   python3 -c "import importlib.resources as r; print(r.files('conntrackd_py') / 'keepalived/notify.sh')"
# MASTER: commit the peer's flows first (-c blocks until the kernel has them all), then
#         flush the internal cache, resync it from the kernel and send it to the peer in bulk.
#         Keep the firewall's forward/input policy drop with nf_conntrack_tcp_loose=0: packets
#         that arrive on the VIP before the commit ends are dropped (and retransmitted by the
#         hosts) instead of being answered with RSTs or picked up as new flows.
# BACKUP: -t: flush the kernel table (this node's flows from when it was master, zombies now)
#         after sync.purge_timeout unless a commit (-c) comes first (conntrackd's RESET_TIMERS);
#         -n: ask the peer for a full resync.
# FAULT:  -t, the same scheduled flush.
CONF=${CONNTRACKD_PY_CONFIG:-/etc/conntrackd-py/conntrackd-py.yaml}
BIN=${CONNTRACKD_PY:-conntrackd-py}
run() {
    "$BIN" -C "$CONF" "$@" || logger -t conntrackd-py-notify "conntrackd-py $* failed ($?)" 2>/dev/null
}
case "$1" in
    primary|master|MASTER)
        run -c
        run -f internal
        run -R
        run -B
        ;;
    backup|BACKUP)
        run -t
        run -n
        ;;
    fault|FAULT)
        run -t
        ;;
    *)
        echo "usage: $0 primary|backup|fault" >&2
        exit 1
        ;;
esac
