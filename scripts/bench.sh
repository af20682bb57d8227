#!/usr/bin/env bash
# Benchmarks the static guestd:
#   1. builds it (scripts/build-static.sh: musl, fat LTO, stripped; prints its size);
#   2. runs the Rust bench against it (benches/agent.rs: round trips and stdout throughput over
#      Connect JSON/proto and gRPC, RSS, binary size; a table plus one JSON line);
#   3. starts a fresh guestd and runs ../shared/bench/connect_bench.py against it — the script the
#      E2B envd reference figures were taken with — and prints its JSON.
# Figures only; nothing here fails on a slow result.
#
#   scripts/bench.sh [--quick]     --quick: fewer round trips, 128 MiB instead of 1 GiB
set -euo pipefail
cd "$(dirname "$0")/.."

quick=()
runs=300
tp_bytes=$((1 << 30))
if [[ "${1:-}" == "--quick" ]]; then
  quick=(--quick)
  runs=100
  tp_bytes=$((128 << 20))
fi

step() { printf '\n==> %s\n' "$*"; }

step "static build"
scripts/build-static.sh
bin="$PWD/target/x86_64-unknown-linux-musl/release/guestd"

step "cargo bench --bench agent ${quick[*]}"
GUESTD_BIN="$bin" cargo bench --locked --bench agent -- "${quick[@]}"

step "connect_bench.py (the E2B envd reference script) against a fresh guestd"
shared="$(cd .. && pwd)/shared"
# A free loopback port below the kernel's ephemeral range (the test tiers' helper).
port=$(python3 -c 'import sys; sys.path.insert(0, "tests/common"); from testkit import free_port; print(free_port())')
log=$(mktemp)
"$bin" --listen "127.0.0.1:$port" 2>"$log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
python3 - "$port" "$pid" <<'EOF' || { cat "$log" >&2; exit 1; }
import http.client, os, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 10
while True:
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("guestd exited during startup")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        if status != 204:
            sys.exit(f"GET /health answered {status}, expected 204")
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("guestd did not answer GET /health within 10 s")
        time.sleep(0.02)
EOF
echo "guestd pid $pid on 127.0.0.1:$port; $runs runs, $tp_bytes bytes"
python3 "$shared/bench/connect_bench.py" 127.0.0.1 "$port" "$pid" "$runs" "$tp_bytes"
