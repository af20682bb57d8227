#!/usr/bin/env bash
# Test tier 3: guestd driven by the real E2B Python SDK (e2b==2.63.0) and an independent Connect
# client (connectrpc), plus the descriptor comparison with the SDK's embedded protos.
#
#   scripts/test-sdk.sh [pytest args...]     e.g. scripts/test-sdk.sh -k pty -x
#
# Needs python3 with venv and the package registry (first run only; the venv is cached under
# ${GUESTD_TEST_CACHE:-$HOME/.cache/guestd-test}). Run as root: some tests create a user.
# guestd's log goes to ${GUESTD_TEST_LOG_DIR:-a fresh temp dir}; its path is printed at start.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

GUESTD_TEST_PYTHON="$(scripts/sdk-venv.sh)"
export GUESTD_TEST_PYTHON

cargo build --bins
GUESTD_BIN="$(cargo metadata --format-version 1 --no-deps \
    | "$GUESTD_TEST_PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/guestd"
export GUESTD_BIN

cargo test --test descriptors

"$GUESTD_TEST_PYTHON" -m pytest -q tests/sdk "$@"
