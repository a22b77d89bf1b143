#!/bin/bash
# Firewall setup for the compose failover scenario, run by the image's entrypoint
# (mounted as /docker-entrypoint.d/10-fw-setup.sh) before keepalived and conntrackd-py start.
#
# 1. Names the interfaces after their role, found by subnet (Docker numbers them eth0..ethN
#    in an order it does not promise): lan0 (clients), wan0 (servers), sync0 (sync link).
# 2. Writes the nftables ruleset: forward policy drop except `ct state established,related`
#    and new SYNs to the service; SNAT to the server-side VIP (which moves with the
#    client-side VIP, so a taken-over NAT mapping stays valid); input policy drop except
#    VRRP, the sync link and established traffic (so the new master's own stack never
#    answers a taken-over stream with a RST before the commit lands).
# 3. Writes keepalived.conf: one VRRP instance on lan0 carrying both VIPs, notify script
#    calling conntrackd-py (notify.sh; its settings CTPY_NOTIFY_* go to
#    /etc/conntrackd-py/notify.env).
# 4. Writes the sync link's key, CTPY_SYNC_KEY (hex, the same for both firewalls; the
#    failover test makes one per run), to /etc/conntrackd-py/sync.key, mode 0600: the daemon
#    refuses to start a sync mode without a key (sync.auth.required is true by default).
set -euo pipefail
: "${NET:?}" "${FW_ID:?}" "${VRRP_PRIORITY:?}" "${SERVICE_PORT:?}"
if [ -z "${CTPY_SYNC_KEY:-}" ]; then
  echo "fw-setup: CTPY_SYNC_KEY is not set: both firewalls need the same sync key (hex), e.g." \
    "export CTPY_SYNC_KEY=\$(od -An -tx1 -N32 /dev/urandom | tr -d ' \\n')" >&2
  exit 1
fi
(umask 077 && printf '%s\n' "$CTPY_SYNC_KEY" >/etc/conntrackd-py/sync.key)
ADVERT_INT=${ADVERT_INT:-0.2}
LAN_VIP=$NET.1.254
WAN_VIP=$NET.2.254

rename() {  # rename <prefix> <name>: the interface holding an address in <prefix>.0/24
  local dev
  dev=$(ip -o -4 addr show | awk -v p="$1." 'index($4, p) == 1 { print $2; exit }')
  [ -n "$dev" ] || { echo "fw-setup: no interface in $1.0/24" >&2; exit 1; }
  [ "$dev" = "$2" ] && return
  ip link set dev "$dev" down
  ip link set dev "$dev" name "$2"
  ip link set dev "$2" up
}
rename "$NET.1" lan0
rename "$NET.2" wan0
rename "$NET.3" sync0
ip route replace 224.0.0.0/4 dev sync0   # multicast sync traffic leaves on the sync link
ip route del default 2>/dev/null || true  # nothing leaves through Docker's gateways

# Only our own table is replaced: Docker's DNS rules in this namespace stay.
cat >/etc/conntrackd-py/nftables.conf <<NFT
table inet fw
delete table inet fw
table inet fw {
    chain input {
        type filter hook input priority 0; policy drop;
        iif lo accept
        ct state established,related accept
        iifname "sync0" accept
        iifname "lan0" ip protocol 112 accept   # VRRP
        ip protocol icmp accept
    }
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" ct state new tcp dport $SERVICE_PORT \
            tcp flags & (syn | ack | fin | rst) == syn accept
        iifname "lan0" oifname "wan0" ct state new icmp type echo-request accept
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" snat ip to $WAN_VIP
    }
}
NFT

# keepalived (enable_script_security) runs only root-owned scripts in root-owned directories;
# the mounted checkout may belong to anyone, so the notify script is copied.
install -m 0755 /scenario/notify.sh /usr/local/sbin/ctpy-notify
# keepalived does not pass the container's environment to its scripts: the notify script's
# settings (see notify.sh) go to a file it reads.
printf 'CTPY_NOTIFY_CLIENT=%q\nCTPY_NOTIFY_PURGE=%q\n' "${CTPY_NOTIFY_CLIENT:-socket}" \
  "${CTPY_NOTIFY_PURGE:-1}" >/etc/conntrackd-py/notify.env
mkdir -p /etc/keepalived
cat >/etc/keepalived/keepalived.conf <<KA
global_defs {
    router_id fw$FW_ID
    vrrp_version 3
    script_user root
    enable_script_security
    vrrp_garp_master_repeat 3
}
vrrp_instance FW {
    state BACKUP
    interface lan0
    virtual_router_id 51
    priority $VRRP_PRIORITY
    advert_int $ADVERT_INT
    track_interface {
        wan0
        sync0
    }
    virtual_ipaddress {
        $LAN_VIP/24 dev lan0
        $WAN_VIP/24 dev wan0
    }
    notify_master "/usr/local/sbin/ctpy-notify primary"
    notify_backup "/usr/local/sbin/ctpy-notify backup"
    notify_fault "/usr/local/sbin/ctpy-notify fault"
}
KA
echo "fw-setup: fw$FW_ID lan0/wan0/sync0 ready, VIPs $LAN_VIP $WAN_VIP, priority $VRRP_PRIORITY" >&2
