#!/usr/bin/env bash
# Micro-VM tier: the static guestd as PID 1 of a QEMU micro-VM (TCG, no KVM needed), reached
# from the host through a Firecracker-style hybrid-vsock Unix socket served by
# vhost-device-vsock. The test itself is `tests/microvm/main.rs`; this script prepares what it
# needs, idempotently, and runs it:
#
#   1. host packages   qemu-system-x86, busybox-static, lz4 (apt, only when missing)
#   2. guest kernel    Debian's cloud kernel, unpacked from its .deb (never installed); its
#                      LZ4 payload cut out of the bzImage into an ELF vmlinux QEMU boots directly
#   3. vsock backend   vhost-device-vsock 0.3.0 via `cargo install --locked`
#   4. guest agent     scripts/build-static.sh (x86_64-unknown-linux-musl)
#   5. initramfs       static busybox + guestd + the vsock modules + tests/microvm/init
#   6. the test        cargo test --test microvm -- --ignored (boots, drives, powers off, reports)
#
# Cached under ${GUESTD_TEST_CACHE:-~/.cache/guestd-test}: the kernel (per package version),
# vhost-device-vsock. The initramfs is rebuilt every run (0.3 s) from the fresh static build.
# Skips (exit 0, reason printed) only where QEMU cannot run this guest at all: a non-x86_64 host.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n==> %s\n' "$*"; }
started=$SECONDS

if [ "$(uname -m)" != x86_64 ]; then
  echo "SKIPPED micro-VM tier: the guest kernel and agent are x86_64 and this host is $(uname -m)"
  exit 0
fi

cache=${GUESTD_TEST_CACHE:-$HOME/.cache/guestd-test}
work=$cache/microvm
mkdir -p "$work"

step "host packages (qemu-system-x86, busybox-static, lz4)"
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
{ [ -x /bin/busybox ] && file -b /bin/busybox | grep -q 'statically linked'; } || missing+=(busybox-static)
command -v lz4 >/dev/null || missing+=(lz4)
command -v file >/dev/null || missing+=(file)
if [ ${#missing[@]} -gt 0 ]; then
  had_qemu_utils=$(dpkg-query -W -f='${Status}' qemu-utils 2>/dev/null | grep -c 'ok installed' || true)
  # Another apt run (e.g. a parallel test tier) may hold the lock: wait for it.
  apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Installing qemu-system-x86 can remove a preinstalled qemu-utils from another suite
  # (bookworm-backports here); put qemu-img back so nothing else loses it.
  if [ "$had_qemu_utils" = 1 ] && ! dpkg-query -W -f='${Status}' qemu-utils 2>/dev/null | grep -q 'ok installed'; then
    echo "apt removed qemu-utils while installing QEMU; reinstalling it"
    apt_get install -y -qq --no-install-recommends qemu-utils >/dev/null
  fi
fi
qemu-system-x86_64 --version | head -1

step "guest kernel (Debian cloud kernel, direct-boot vmlinux)"
# Warm runs use the newest kernel already unpacked and never touch apt.
kdir=$(ls -d "$work"/kernel/linux-image-* 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$kdir" ] || [ ! -s "$kdir/vmlinux" ] || [ ! -f "$kdir/modules.ok" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  if [ -z "$pkg" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [ -n "$pkg" ] || { echo "error: apt knows no linux-image-cloud-amd64 kernel" >&2; exit 1; }
  kdir=$work/kernel/$pkg
  rm -rf "$kdir" && mkdir -p "$kdir/deb"
  # `apt-get download` as root warns that the _apt sandbox cannot reach /root; harmless.
  (cd "$kdir" && apt-get download -qq "$pkg" 2>&1 | grep -v '_apt' || true)
  dpkg-deb -x "$kdir"/*.deb "$kdir/deb"
  vmlinuz=$(ls "$kdir"/deb/boot/vmlinuz-*)
  # The bzImage payload is LZ4: cut at the LZ4 frame magic and decompress to an ELF vmlinux
  # with a PVH note, which QEMU boots without firmware or decompressor (~0.6 s saved on TCG).
  offset=$(grep -obUaP '\x02\x21\x4c\x18' "$vmlinuz" | head -1 | cut -d: -f1)
  tail -c +$((offset + 1)) "$vmlinuz" | lz4 -dc > "$kdir/vmlinux" 2>/dev/null || true
  file -b "$kdir/vmlinux" | grep -q '^ELF 64-bit' || { echo "error: no ELF vmlinux in $vmlinuz" >&2; exit 1; }
  mkdir -p "$kdir/modules"
  for m in virtio_ring virtio virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
    ko=$(find "$kdir/deb/lib/modules" -name "$m.ko" | head -1)
    [ -n "$ko" ] || { echo "error: module $m not in $pkg" >&2; exit 1; }
    cp "$ko" "$kdir/modules/"
  done
  rm -rf "$kdir/deb" "$kdir"/*.deb
  touch "$kdir/modules.ok"
fi
echo "kernel: $(basename "$kdir") ($(du -h "$kdir/vmlinux" | cut -f1) vmlinux)"

step "vhost-device-vsock 0.3.0 (host side of vsock as a hybrid Unix socket)"
vhost_root=$cache/vhost-device-vsock-0.3.0
if [ ! -x "$vhost_root/bin/vhost-device-vsock" ]; then
  cargo install --locked --quiet --root "$vhost_root" vhost-device-vsock@0.3.0
fi
echo "$vhost_root/bin/vhost-device-vsock"

step "static guestd"
scripts/build-static.sh

step "initramfs (busybox, guestd, vsock modules, tests/microvm/init)"
root=$work/initramfs-root
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cp target/x86_64-unknown-linux-musl/release/guestd "$root/sbin/guestd"
cp "$kdir"/modules/*.ko "$root/lib/modules/"
install -m 0755 tests/microvm/init "$root/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
# Uncompressed: the kernel would spend longer gunzipping (on TCG) than QEMU spends loading.
(cd "$root" && find . | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null) > "$work/initramfs.cpio"
echo "$work/initramfs.cpio: $(du -h "$work/initramfs.cpio" | cut -f1)"

step "boot, drive over hybrid vsock, power off (tests/microvm)"
export GUESTD_MICROVM_KERNEL=$kdir/vmlinux
export GUESTD_MICROVM_INITRAMFS=$work/initramfs.cpio
export GUESTD_MICROVM_VHOST=$vhost_root/bin/vhost-device-vsock
# vhost-device-vsock 0.3.0 occasionally wedges its hybrid socket during guest boot (microvm.md
# pitfall 8: its flow-control stall): the guest logs "listening" yet no CONNECT is ever answered.
# That one failure, and only that one, gets a second boot — announced, never silent.
run_log=$work/microvm-test.log
if ! cargo test --locked --test microvm -- --ignored --nocapture --test-threads 1 2>&1 | tee "$run_log"; then
  if grep -q 'NeverAnswered' "$run_log"; then
    echo "micro-VM tier: the host never got an answer through vhost-device-vsock; booting once more" >&2
    cargo test --locked --test microvm -- --ignored --nocapture --test-threads 1
  else
    exit 1
  fi
fi
echo "micro-VM tier done in $((SECONDS - started)) s"
