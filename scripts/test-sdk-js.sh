#!/usr/bin/env bash
# Test tier 3b: guestd driven by the real E2B JS SDK (npm e2b, pinned in tests/sdk-js/package.json)
# in debug mode, one freshly started guestd per test file (node's built-in test runner).
#
#   scripts/test-sdk-js.sh [node --test args...]   e.g. scripts/test-sdk-js.sh --test-name-pattern=stdin
#
# Needs node >= 20.18.1 and the npm registry (first run only; the modules are cached under
# ${GUESTD_TEST_CACHE:-$HOME/.cache/guestd-test}). Run as root: some tests create a user. Where
# node is too old, prints why and skips the tier.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

status=0
reason="$(scripts/sdk-js.sh 2>&1 >/dev/null)" || status=$?
if [ "$status" -eq 3 ]; then
    echo "JS SDK tier skipped: $reason"
    exit 0
elif [ "$status" -ne 0 ]; then
    echo "$reason" >&2
    exit "$status"
fi

cargo build --bins
GUESTD_BIN="$(cargo metadata --format-version 1 --no-deps | node -e \
    'let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => console.log(JSON.parse(s).target_directory))')/debug/guestd"
export GUESTD_BIN
export E2B_DEBUG=true
GUESTD_TEST_LOG_DIR="${GUESTD_TEST_LOG_DIR:-$(mktemp -d -t guestd-sdk-js-XXXXXX)}"
export GUESTD_TEST_LOG_DIR
echo "guestd logs: $GUESTD_TEST_LOG_DIR"

node --test --test-concurrency=1 --test-timeout=120000 "$@" tests/sdk-js/
