#!/usr/bin/env bash
# Tern from a real browser: Debian's Chromium (headless) driven by playwright-core.
# Installs what it needs on a fresh machine: the chromium package (apt, as root or with
# sudo) and the pinned npm packages. TERN_BIN defaults to target/debug/tern.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export TERN_BIN="${TERN_BIN:-$here/../../target/debug/tern}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
"$here/../apt-install.sh" "$CHROMIUM" chromium
cd "$here"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
node --test --test-concurrency=1 test/
