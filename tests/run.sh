#!/usr/bin/env bash
# Real-SDK interop suites against a built tern (TERN_BIN, default target/debug/tern):
# ably-js via node:test (tests/js) and ably-python via pytest (tests/python).
# Installs the pinned npm and PyPI packages itself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
export TERN_BIN="${TERN_BIN:-$repo/target/debug/tern}"

# mosquitto_pub / mosquitto_sub for the MQTT test (tests/js/test/mqtt.test.mjs), and
# Debian's chromium for the comet browser and status page tests
# (tests/js/test/comet-browser.test.mjs, status-page.test.mjs).
"$here/apt-install.sh" mosquitto_sub mosquitto-clients
"$here/apt-install.sh" "${CHROMIUM:-/usr/bin/chromium}" chromium
# Debian's prometheus: promtool checks a live node's /metrics, and the server scrapes
# `tern dev` to run docs/grafana-dashboard.json's queries (tests/js/test/admin.test.mjs).
"$here/apt-install.sh" promtool prometheus

echo "-- ably-js"
cd "$here/js"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
# Each test file's tern logs (TERN_LOG=warn) go to one file; on a failure, the logs of
# the files that failed are printed, so CI shows what the servers said.
export TERN_TEST_LOGS="${TERN_TEST_LOGS:-$(mktemp -d)}"
rm -f "$TERN_TEST_LOGS"/*.log
report="$(mktemp)"
if ! node --test --test-concurrency=1 test/ | tee "$report"; then
  for file in $(grep -o "location: '[^']*/test/[^':]*" "$report" | sed 's|.*/test/||' | sort -u); do
    log="$TERN_TEST_LOGS/$file.log"
    [ -s "$log" ] || continue
    # A line repeated (same text but for PID and time) is shown once, its repeats counted
    # at the end, so a warning logged every second does not hide the rest.
    echo "-- tern's log during $file (last 200 distinct lines of $(wc -l < "$log"))"
    awk '{ key = $0; sub(/^\[[0-9]+\] [^ ]+ +/, "", key)
           if (key in seen) { seen[key]++; next } seen[key] = 0; print }
         END { for (key in seen) if (seen[key]) print "  (repeated " seen[key] " more times) " key }' "$log" | tail -n 200
  done
  exit 1
fi

echo "-- ably-python"
venv="${INTEROP_VENV:-$repo/target/interop-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/python/requirements.txt"
cd "$here/python"
"$venv/bin/python" -m pytest -q -p no:cacheprovider .
