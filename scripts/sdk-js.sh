#!/usr/bin/env bash
# Installs (once) the pinned E2B JS SDK for the JS SDK tier and links it into tests/sdk-js.
#
#   modules: ${GUESTD_TEST_CACHE:-$HOME/.cache/guestd-test}/sdk-js-<hash of the lock>/node_modules
#   pins:    tests/sdk-js/package.json + package-lock.json (e2b and its whole closure)
#   link:    tests/sdk-js/node_modules -> the modules above (git ignores it)
#
# Needs node >= 20.18.1 (the SDK's own `engines`); installs Debian's nodejs and npm when node is
# missing. Exits 3 with the reason on stderr when this machine's node is too old, so the caller can
# say the tier is skipped and why. Idempotent: npm runs only when the lock's hash is new.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tier="$root/tests/sdk-js"
cache="${GUESTD_TEST_CACHE:-$HOME/.cache/guestd-test}"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "sdk-js: installing nodejs and npm" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
fi
need=20.18.1
have="$(node --version | sed 's/^v//')"
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
    echo "node $have is older than $need, the oldest the pinned e2b accepts (its engines field)" >&2
    exit 3
fi

hash="$( { cat "$tier/package.json" "$tier/package-lock.json"; node --version; } | sha256sum | cut -c1-16)"
dir="$cache/sdk-js-$hash"
mkdir -p "$cache"
exec 9>"$cache/sdk-js.lock"
flock 9
if [[ ! -f "$dir/.installed" ]]; then
    echo "sdk-js: installing the pinned SDK into $dir" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$tier/package.json" "$tier/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
    touch "$dir/.installed"
fi
ln -sfn "$dir/node_modules" "$tier/node_modules"
