#!/usr/bin/env bash
# A base image made here, for machines that reach Debian's package mirror but no image registry:
# debootstrap a minimal bookworm, add Python 3.11 (venv) and gcc, and `docker import` the tree.
#
#   bash scripts/base_image.sh [TAG]        # default pagedserve-base:bookworm
#
# Idempotent: does nothing when the image exists (FORCE=1 rebuilds it). Needs root, debootstrap and
# a running dockerd. The mirror is the one apt already uses (MIRROR= overrides it).
set -euo pipefail

TAG=${1:-pagedserve-base:bookworm}
SUITE=bookworm

if [[ -z "${FORCE:-}" ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base_image: $TAG exists"
    exit 0
fi

# The first URI apt's sources name (deb822 `URIs:` lines, then one-line `deb URL ...`) whose path
# does or does not end in -security ($1: "security" or "main").
mirror_from_apt() {
    local uris
    uris=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
           grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}')
    if [[ $1 == security ]]; then
        grep -m1 -- '-security' <<<"$uris" || echo http://deb.debian.org/debian-security
    else
        grep -m1 -v -- '-security' <<<"$uris" || echo http://deb.debian.org/debian
    fi
}
MIRROR=${MIRROR:-$(mirror_from_apt main)}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(mirror_from_apt security)}

ROOTFS=$(mktemp -d /tmp/pagedserve-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "base_image: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >/tmp/pagedserve-debootstrap.log 2>&1 \
    || { tail -n 30 /tmp/pagedserve-debootstrap.log; exit 1; }

# Python with venv (pip comes from the wheels), certificates, and a C compiler: the executor builds
# kernels/cpu for the CPU it runs on at first use. Updates and security fixes from the mirrors.
cat >"$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES
chroot "$ROOTFS" /usr/bin/env DEBIAN_FRONTEND=noninteractive bash -euc '
    apt-get update
    apt-get upgrade -y
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates gcc libc6-dev
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/*
    ln -sf /usr/bin/python3 /usr/local/bin/python
' >/tmp/pagedserve-base-apt.log 2>&1 || { tail -n 30 /tmp/pagedserve-base-apt.log; exit 1; }

echo "base_image: importing $TAG"
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
docker run --rm "$TAG" python3 -c \
    "import sys, venv; print('base_image: $TAG has Python', sys.version.split()[0])"
