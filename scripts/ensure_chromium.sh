#!/usr/bin/env bash
# Headless Chromium for the run explorer's page test (tests/test_explore_e2e.py): installs
# Debian's `chromium` with apt-get when no Chromium is on PATH. Never fails the build: where it
# cannot install one, it says so and the test skips, naming the missing binary.
set -uo pipefail
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then echo "browser: $(command -v "$b")"; exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "browser: no chromium and no apt-get; tests/test_explore_e2e.py will skip" >&2; exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "browser: chromium missing and apt-get needs root; tests/test_explore_e2e.py will skip" >&2; exit 0
  fi
fi
log="${TMPDIR:-/tmp}/rlrt-chromium-install.log"
echo "browser: installing Debian's chromium (log: $log)"
if { $sudo apt-get install -y -qq chromium || { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium; }; } \
    >"$log" 2>&1 && command -v chromium >/dev/null 2>&1; then
  echo "browser: $(command -v chromium)"
else
  tail -5 "$log" >&2
  echo "browser: could not install chromium; tests/test_explore_e2e.py will skip" >&2
fi
exit 0
