#!/usr/bin/env bash
# Provide the two local base images the deployment test builds on, when no registry can
# supply python:3.11-slim, redis or prom/prometheus:
#   rlrt-base:bookworm   Debian bookworm (minbase) + python3, python3-venv, tini, the host's CA bundle
#   rlrt-infra:bookworm  the same + Debian's redis-server and prometheus (compose's redis and prometheus)
# Both come from one `debootstrap --variant=minbase` root file system and `docker import`.
# The tarballs are cached under $RLRT_DEPLOY_CACHE and re-imported when the engine lacks them.
# Needs root, debootstrap and a Debian mirror (the host's apt sources).
set -euo pipefail
CACHE="${RLRT_DEPLOY_CACHE:-$HOME/.cache/rlrt-deploy}"
BASE="${RLRT_BASE_IMAGE:-rlrt-base:bookworm}"
INFRA="${RLRT_INFRA_IMAGE:-rlrt-infra:bookworm}"
MIRROR="${DEBIAN_MIRROR:-$(grep -hoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | head -1 || true)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
mkdir -p "$CACHE"

have() { docker image inspect "$1" >/dev/null 2>&1; }

rootfs_tar() {  # $1 tarball, $2 base tarball to start from (else debootstrap), $3 packages to add
    local tar="$1" from="${2:-}" extra="${3:-}" root
    [[ -s "$tar" ]] && return 0
    root="$(mktemp -d "$CACHE/rootfs.XXXX")"
    trap 'umount "$root/proc" 2>/dev/null || true; rm -rf "$root"' RETURN
    if [[ -n "$from" ]]; then
        tar -C "$root" --numeric-owner -xf "$from"
    else
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
            "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; return 1; }
        # the host's CA bundle, so pip inside build steps trusts what the host trusts
        cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    fi
    if [[ -n "$extra" ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
        cp /etc/resolv.conf "$root/etc/resolv.conf"
        mount -t proc proc "$root/proc"
        { chroot "$root" apt-get update -q && chroot "$root" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends $extra; } >>"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; return 1; }
        umount "$root/proc"
        rm -f "$root/usr/sbin/policy-rc.d"
        : > "$root/etc/resolv.conf"
    fi
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    tar -C "$root" --numeric-owner -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
}

import() {  # $1 image, $2 tarball
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$2" "$1" >/dev/null
    echo "imported $1 from $2" >&2
}

if ! have "$BASE"; then
    rootfs_tar "$CACHE/base-$SUITE.tar"
    import "$BASE" "$CACHE/base-$SUITE.tar"
fi
if ! have "$INFRA"; then
    rootfs_tar "$CACHE/base-$SUITE.tar"
    rootfs_tar "$CACHE/infra-$SUITE.tar" "$CACHE/base-$SUITE.tar" "redis-server prometheus"
    import "$INFRA" "$CACHE/infra-$SUITE.tar"
fi
