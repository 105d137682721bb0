#!/usr/bin/env bash
# Make a Docker engine answer for the deployment tests and print its DOCKER_HOST.
#
#   eval "$(scripts/deploy/dockerd.sh start)"   # exports DOCKER_HOST (and starts a private dockerd if needed)
#   scripts/deploy/dockerd.sh stop              # stops the private dockerd this script started
#
# An engine that already answers (DOCKER_HOST, or /var/run/docker.sock) is used as it is.
# Otherwise a private dockerd is started with its own data root (kept under
# $RLRT_DEPLOY_CACHE, so built images survive between runs), exec root, socket and pidfile:
# storage driver overlay2 when the kernel lets us mount it, else vfs; iptables rules when
# the sandbox allows them, else none (containers still reach each other on the bridge and
# published ports go through docker-proxy on the loopback).
set -euo pipefail

CACHE="${RLRT_DEPLOY_CACHE:-$HOME/.cache/rlrt-deploy}"
DATA_ROOT="$CACHE/docker"
RUN="${RLRT_DEPLOY_RUN:-/run/rlrt-deploy}"
SOCK="$RUN/docker.sock"
PIDFILE="$RUN/dockerd.pid"
LOG="$CACHE/dockerd.log"

answers() { DOCKER_HOST="$1" timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
    if [[ -n "${DOCKER_HOST:-}" ]] && answers "$DOCKER_HOST"; then echo "export DOCKER_HOST=$DOCKER_HOST"; return; fi
    if [[ -S "$SOCK" ]] && answers "unix://$SOCK"; then echo "export DOCKER_HOST=unix://$SOCK"; return; fi
    if [[ -S /var/run/docker.sock ]] && answers unix:///var/run/docker.sock; then
        echo "export DOCKER_HOST=unix:///var/run/docker.sock"; return
    fi
    command -v dockerd >/dev/null || { echo "dockerd is not installed" >&2; exit 3; }
    [[ "$(id -u)" == 0 ]] || { echo "a private dockerd needs root" >&2; exit 3; }
    mkdir -p "$DATA_ROOT" "$RUN/exec"
    local driver="${RLRT_DOCKER_STORAGE_DRIVER:-}"
    if [[ -z "$driver" ]]; then
        # overlay2 needs an overlay mount on the data root's file system (not on overlayfs itself)
        local t; t="$(mktemp -d "$CACHE/ovl.XXXX")"
        mkdir -p "$t"/{l,u,w,m}
        if mount -t overlay overlay -o "lowerdir=$t/l,upperdir=$t/u,workdir=$t/w" "$t/m" 2>/dev/null; then
            umount "$t/m"; driver=overlay2
        else
            driver=vfs
        fi
        rm -rf "$t"
    fi
    local attempt
    for attempt in iptables no-iptables; do
        local extra=()
        [[ "$attempt" == no-iptables ]] && extra=(--iptables=false --ip-masq=false)
        rm -f "$SOCK" "$PIDFILE"
        # setsid: the daemon outlives this shell and is stopped by `stop` (its pidfile)
        setsid dockerd --host "unix://$SOCK" --data-root "$DATA_ROOT" --exec-root "$RUN/exec" \
            --pidfile "$PIDFILE" --storage-driver "$driver" "${extra[@]}" \
            >>"$LOG" 2>&1 < /dev/null &
        local i
        for i in $(seq 1 60); do
            if answers "unix://$SOCK"; then
                echo "private dockerd ($driver, $attempt) on unix://$SOCK, log $LOG" >&2
                echo "export DOCKER_HOST=unix://$SOCK"; return
            fi
            kill -0 $! 2>/dev/null || break
            sleep 0.5
        done
        kill "$!" 2>/dev/null || true; wait "$!" 2>/dev/null || true
    done
    echo "no container engine could be started; see $LOG" >&2
    tail -20 "$LOG" >&2
    exit 3
}

stop() {
    [[ -f "$PIDFILE" ]] || return 0
    local pid; pid="$(cat "$PIDFILE")"
    kill "$pid" 2>/dev/null || return 0
    # it stops its containers first (10 s grace each, in parallel)
    for _ in $(seq 1 240); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    echo "dockerd $pid did not stop in 120 s" >&2; exit 1
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
