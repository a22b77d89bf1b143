#!/usr/bin/env bash
# Build the local base image for docker/Dockerfile where no image registry is reachable:
# a minimal Debian root file system made with debootstrap, loaded with `docker import`.
#
#   docker/build-base.sh                 # builds conntrackd-py-base:bookworm unless it exists
#   FORCE=1 docker/build-base.sh         # rebuild even if the image exists
#   DEBIAN_MIRROR=http://... docker/build-base.sh   # mirror (default: taken from the host's apt)
#
# The image is cached: it is rebuilt only when it is missing or was built from another package
# list (the list's hash is stored in the image label org.conntrackd-py.base-packages).
# Needs root (debootstrap, chroot) and a Docker engine; installs debootstrap via apt if missing.
set -euo pipefail

IMAGE=${BASE_IMAGE:-conntrackd-py-base:bookworm}
SUITE=${SUITE:-bookworm}
PACKAGES=python3,python3-venv,conntrack,nftables,iproute2,keepalived,procps,ca-certificates
KEY=$(printf '%s %s' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-16)

log() { printf 'build-base: %s\n' "$*" >&2; }

if [ -z "${FORCE:-}" ] && have=$(docker image inspect -f \
     '{{ index .Config.Labels "org.conntrackd-py.base-packages" }}' "$IMAGE" 2>/dev/null) \
   && [ "$have" = "$KEY" ]; then
  log "$IMAGE is up to date (cached), nothing to do"
  exit 0
fi

# The Debian mirror: the first apt source (deb822 or one-line format) that serves $SUITE.
host_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    case "$f" in
      *.sources)
        awk -v suite="$SUITE" '
          function flush() { if (uris != "" && ok && !done) { split(uris, u, " "); print u[1]; done = 1 }
                             uris = ""; ok = 0 }
          /^[ \t]*$/ { flush(); next }
          /^[ \t]*#/ { next }
          /^Enabled:[ \t]*no/ { uris = ""; ok = 0; skip = 1 }
          /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
          /^Types:/ { if ($0 !~ /(^|[ \t])deb([ \t]|$)/) skip = 1; else skip = 0 }
          /^Suites:/ { if (!skip) for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
          END { flush() }' "$f"
        ;;
      *)
        awk -v suite="$SUITE" '
          $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                        if ($(i + 1) == suite) { print $i; exit } }' "$f"
        ;;
    esac
  done | head -n1
}

MIRROR=${DEBIAN_MIRROR:-$(host_mirror)}
if [ -z "$MIRROR" ]; then
  log "no apt source for '$SUITE' found in /etc/apt/sources.list*; set DEBIAN_MIRROR=URL"
  exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap \
    >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
fi

ROOT=$(mktemp -d /var/tmp/conntrackd-py-rootfs.XXXXXX)
cleanup() {
  # debootstrap may leave /proc or /sys mounted in the chroot on failure
  for m in proc sys dev/pts dev; do umount -l "$ROOT/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$ROOT"
  rm -f "$ROOT.log"
}
trap cleanup EXIT

log "debootstrap $SUITE from $MIRROR into $ROOT (packages: $PACKAGES)"
start=$(date +%s)
debootstrap --variant=minbase --components=main --include="$PACKAGES" \
  "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -n 30 "$ROOT.log" >&2; exit 1; }

# Slim it down: no apt lists or caches, docs or man pages, and no services started by packages.
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* \
       "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/var/log/*.log \
       "$ROOT"/tmp/* "$ROOT"/var/tmp/*
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOT/etc/apt/sources.list"
: >"$ROOT/etc/machine-id"

log "importing as $IMAGE"
tar -C "$ROOT" --numeric-owner -c . | docker import \
  --change "LABEL org.conntrackd-py.base-packages=$KEY" \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$IMAGE" >/dev/null
log "built $IMAGE in $(( $(date +%s) - start ))s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
