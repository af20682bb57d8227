#!/usr/bin/env bash
# Builds the static x86_64-unknown-linux-musl guestd (release profile: fat LTO, one codegen
# unit, stripped; linked at a fixed address, see .cargo/config.toml), checks that it is
# statically linked and prints its size.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
rustup target add "$target" >/dev/null
# Always ./target, whatever CARGO_TARGET_DIR says: the micro-VM, container and bench scripts take
# the binary from there.
cargo build --locked --release --target "$target" --target-dir target --bin guestd
bin="target/$target/release/guestd"
kind=$(file -b "$bin")
case "$kind" in
  *"statically linked"*) ;;
  *"static-pie linked"*)
    echo "error: $bin is static-pie, not linked at a fixed address (RUSTFLAGS in the environment replaces .cargo/config.toml's relocation-model=static): $kind" >&2
    exit 1 ;;
  *) echo "error: $bin is not statically linked: $kind" >&2; exit 1 ;;
esac
case "$kind" in
  *"not stripped"*) echo "error: $bin is not stripped: $kind" >&2; exit 1 ;;
esac
size=$(stat -c %s "$bin")
echo "$bin: $kind"
echo "size: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f MiB", s / 1048576 }'))"
