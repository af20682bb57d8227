#!/usr/bin/env bash
# Creates (once) the Python venv the SDK test tier runs in, and prints its python path on stdout.
#
#   venv:  ${GUESTD_TEST_CACHE:-$HOME/.cache/guestd-test}/venv
#   pins:  tests/sdk/requirements.txt (e2b, connectrpc, pytest and their whole closure)
#
# Idempotent: pip runs only when the stamp file for the current requirements hash (and python
# version) is missing, so a second run costs a few milliseconds. Everything pip says goes to
# stderr; stdout carries only the interpreter path, for `GUESTD_TEST_PYTHON=$(scripts/sdk-venv.sh)`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/tests/sdk/requirements.txt"
cache="${GUESTD_TEST_CACHE:-$HOME/.cache/guestd-test}"
venv="$cache/venv"
python="$venv/bin/python"

mkdir -p "$cache"
# Two test runs starting at once must not pip-install into the same venv concurrently.
exec 9>"$cache/venv.lock"
flock 9

# The stamp covers the pins and the interpreter that built the venv: a new python3 needs a new venv.
hash="$( { cat "$requirements"; python3 --version; } | sha256sum | cut -d' ' -f1)"
stamp="$venv/.guestd-requirements-$hash"

if [[ ! -f "$stamp" ]] || ! "$python" -c '' 2>/dev/null; then
    echo "sdk-venv: building $venv from $requirements" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    touch "$stamp"
fi

echo "$python"
