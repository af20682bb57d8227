#!/usr/bin/env bash
# Runs every test tier of guestd on a fresh machine. Installs what it needs, idempotently;
# heavy artefacts are cached under ${GUESTD_TEST_CACHE:-~/.cache/guestd-test}.
#
#   1. format + lints            cargo fmt --check, cargo clippy -D warnings
#   2. unit + in-process tests   cargo test (real server on 127.0.0.1:0, gRPC and Connect)
#   3. SDK tiers                 the pinned E2B Python and JS SDKs drive freshly started guestds
#   4. static build              x86_64-unknown-linux-musl, stripped, checked static
#   5. micro-VM tier             guestd as PID 1 in a QEMU (TCG) guest, driven over hybrid vsock
#   6. container tier            guestd baked into images, driven from the host with the SDK
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain and system packages"
rustup component add clippy rustfmt >/dev/null 2>&1 || true
rustup target add x86_64-unknown-linux-musl >/dev/null
# sudo: the SDK tier checks that a sudoer's `sudo` works under guestd; unshare (util-linux):
# the PID-1 test; file: the static-build check.
missing=()
for tool in sudo:sudo unshare:util-linux file:file; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

step "format and lints"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings

step "Python venv for the SDK tiers"
GUESTD_TEST_PYTHON=$(scripts/sdk-venv.sh)
export GUESTD_TEST_PYTHON

step "unit and in-process integration tests"
cargo test --locked

step "SDK tier (e2b Python SDK against a fresh guestd)"
scripts/test-sdk.sh

step "JS SDK tier (npm e2b against fresh guestds)"
scripts/test-sdk-js.sh

step "static musl build"
scripts/build-static.sh

step "micro-VM tier (QEMU TCG guest, hybrid vsock)"
scripts/test-microvm.sh

step "container tier (images from packaging/, SDK from the host)"
scripts/test-containers.sh
