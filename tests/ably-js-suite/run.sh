#!/usr/bin/env bash
# ably-js's own mocha suite (2.26.0, packaged offline) against Tern, gated by
# tests/ably-js-suite/known-failures.txt. The suite comes from $ABLY_JS_SUITE or
# ../shared/ably-js-suite next to the repository; without either it says SKIPPED and
# exits 0. Arguments go to run.mjs (see its header: file names, --jobs, --update-known).
#
# The suite is an oracle and read-only: it is copied to target/ably-js-suite (its tests
# write output next to themselves) and `npm ci` runs there only when its lockfile changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
source_dir="${ABLY_JS_SUITE:-$repo/../shared/ably-js-suite}"

if [ "${1:-}" = "--update-known" ]; then
  exec node "$here/run.mjs" "$@"
fi
if [ ! -f "$source_dir/package.json" ]; then
  echo "ably-js suite: SKIPPED (no suite at \$ABLY_JS_SUITE or $repo/../shared/ably-js-suite)"
  exit 0
fi
source_dir="$(cd "$source_dir" && pwd)"
echo "ably-js suite: running from $source_dir"

suite="$repo/target/ably-js-suite"
mkdir -p "$suite"
# A fresh copy of everything but the installed modules and the outputs, writable (the
# source is read-only, and the suite writes junit/ and private-api-usage/ inside itself).
find "$suite" -mindepth 1 -maxdepth 1 ! -name node_modules -exec chmod -R u+w {} + -exec rm -rf {} +
(cd "$source_dir" && find . -mindepth 1 -maxdepth 1 ! -name node_modules ! -name junit ! -name private-api-usage \
  -exec cp -R {} "$suite/" \;)
chmod -R u+w "$suite"

stamp="$suite/node_modules/.tern-installed-lock.json"
if [ ! -f "$stamp" ] || ! cmp -s "$suite/package-lock.json" "$stamp"; then
  echo "ably-js suite: npm ci"
  (cd "$suite" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$suite/package-lock.json" "$stamp"
fi

# The gate's own rules and the echo stand-in's answers first (a second, no server needed).
node --test "$here/known.test.mjs" "$here/echo-server.test.mjs" >/dev/null || { node --test "$here/known.test.mjs" "$here/echo-server.test.mjs"; exit 1; }

export TERN_BIN="${TERN_BIN:-$repo/target/debug/tern}"
if [ ! -x "$TERN_BIN" ]; then
  echo "ably-js suite: no tern binary at $TERN_BIN (cargo build -p tern-server, or set TERN_BIN)"
  exit 1
fi
exec node "$here/run.mjs" --suite "$suite" "$@"
