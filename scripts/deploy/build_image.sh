#!/usr/bin/env bash
# Build the CPU image (rlrt:cpu) on whatever this machine offers.
#   scripts/deploy/build_image.sh [tag...]      (default tags: rlrt:cpu)
# Base image: $BASE_IMAGE if set; else python:3.11-slim when the engine has it or can pull
# it; else the locally built Debian bookworm base (scripts/deploy/base_image.sh).
# Python packages: from deploy/docker/wheels/, filled by scripts/deploy/wheelhouse.sh with
# this machine's pip configuration, so the build itself needs no network (PIP_OFFLINE=1);
# RLRT_IMAGE_ONLINE=1 builds from the indexes instead (TORCH_INDEX_URL, PyPI).
# Needs DOCKER_HOST (or the default socket) to reach an engine: see scripts/deploy/dockerd.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
tags=("$@"); ((${#tags[@]})) || tags=(rlrt:cpu)
PY="${PYTHON:-python3}"

base="${BASE_IMAGE:-}"
if [[ -z "$base" ]]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        base=python:3.11-slim
    else
        echo "python:3.11-slim cannot be pulled: using a locally built Debian bookworm base" >&2
        scripts/deploy/base_image.sh
        base="${RLRT_BASE_IMAGE:-rlrt-base:bookworm}"
    fi
fi
args=(--build-arg "BASE_IMAGE=$base")
if [[ "${RLRT_IMAGE_ONLINE:-0}" == 1 ]]; then
    [[ -n "${TORCH_INDEX_URL+x}" ]] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
else
    scripts/deploy/wheelhouse.sh "$PY"
    args+=(--build-arg PIP_OFFLINE=1)
fi
tag_args=(); for t in "${tags[@]}"; do tag_args+=(-t "$t"); done
echo "docker build ${args[*]} ${tag_args[*]}" >&2
# The build stage is tagged too (rlrt-build:cpu): its layers are the expensive ones (torch),
# and a tagged stage survives the prune below, which drops what earlier builds left behind.
docker build -q -f deploy/docker/Dockerfile.cpu "${args[@]}" --target build -t rlrt-build:cpu . >/dev/null
docker build -q -f deploy/docker/Dockerfile.cpu "${args[@]}" "${tag_args[@]}" .
docker image prune -f >/dev/null
