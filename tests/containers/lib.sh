# Shared by scripts/test-containers.sh and scripts/bench-containers.sh (source it; bash only):
# a running Docker engine, the cached Debian base image, and the guestd images built from the
# freshly built static binary.
#
#   ctr_docker_up        sets DOCKER (the CLI) and makes sure an engine answers; starts dockerd
#                        (installing docker.io first) when none runs, and notes its pid in
#                        CTR_DOCKERD_PID so ctr_docker_down stops only what we started
#   ctr_base_image       the Debian bookworm minbase image (debootstrap + docker import), built
#                        once and cached; sets CTR_BASE_IMAGE
#   ctr_build_images     builds the images below from packaging/docker/ and $GUESTD_STATIC_BIN
#   ctr_cleanup RUN_ID   removes every container labelled guestd-test.run=RUN_ID
#
# Images (fixed tags, rebuilt every run; Docker's layer cache makes a rebuild with an unchanged
# binary take about a second):
#   guestd-test/template:latest            packaging/docker/template, no start command
#   guestd-test/template-startcmd:latest   the same with --build-arg START_CMD/READY_CMD
#   guestd-test/scratch:latest             packaging/docker/scratch (guestd + static busybox)
#   guestd-test/openrc:latest              tests/containers/openrc: Debian + OpenRC running
#                                          packaging/openrc/guestd (OpenRC .debs cached)
#
# Cache: ${GUESTD_TEST_CACHE:-~/.cache/guestd-test}/base/ holds the base rootfs tarball; the
# imported image is tagged guestd-test/base:<key>, key = hash of everything that shapes the rootfs.

CTR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CTR_CACHE="${GUESTD_TEST_CACHE:-$HOME/.cache/guestd-test}"
CTR_TEMPLATE_IMAGE=guestd-test/template:latest
CTR_STARTCMD_IMAGE=guestd-test/template-startcmd:latest
CTR_SCRATCH_IMAGE=guestd-test/scratch:latest
CTR_OPENRC_IMAGE=guestd-test/openrc:latest
# OpenRC and what it needs beyond minbase, for the OpenRC test image.
CTR_OPENRC_DEBS=(openrc insserv libeinfo1 librc1)
# What the per-image start command test expects (tests/containers/test_boot.py reads these).
CTR_IMAGE_START_CMD='echo "image start command ran as $(id -un)"; exec sleep 600'
CTR_IMAGE_READY_CMD='true'
# Packages in the base rootfs beyond minbase: what the template Dockerfile would otherwise
# apt-get install at build time (which would need the network inside `docker build`).
CTR_BASE_PACKAGES=bash,sudo,python3,python3-pip
CTR_BASE_SUITE=bookworm
CTR_DOCKERD_PID=
CTR_DOCKERD_LOG=

ctr_step() { printf '\n==> %s\n' "$*" >&2; }

ctr_apt_install() {
  echo "installing $* (apt-get)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The Debian mirror this machine's apt uses (first non-security URI), for debootstrap.
ctr_debian_mirror() {
  if [[ -n "${GUESTD_DEBIAN_MIRROR:-}" ]]; then echo "$GUESTD_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
           grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'; } \
         | grep -v -e security -e '^$' | grep -i debian | head -1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# Starts dockerd with the given extra flags; waits up to 30 s for it to answer.
ctr_try_dockerd() {
  CTR_DOCKERD_LOG="${CTR_CACHE}/dockerd.log"
  mkdir -p "$CTR_CACHE"
  echo "starting dockerd $* (log: $CTR_DOCKERD_LOG)" >&2
  # setsid: a Ctrl-C aimed at the test run must not kill the engine mid-cleanup.
  setsid dockerd --host unix:///var/run/docker.sock "$@" >"$CTR_DOCKERD_LOG" 2>&1 </dev/null &
  CTR_DOCKERD_PID=$!
  local i
  for i in $(seq 1 120); do
    if ! kill -0 "$CTR_DOCKERD_PID" 2>/dev/null; then
      echo "dockerd $* exited; its log ends:" >&2
      tail -5 "$CTR_DOCKERD_LOG" >&2
      CTR_DOCKERD_PID=
      return 1
    fi
    if "$DOCKER" info >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  echo "dockerd $* did not answer within 30 s" >&2
  kill "$CTR_DOCKERD_PID" 2>/dev/null || true
  wait "$CTR_DOCKERD_PID" 2>/dev/null || true
  CTR_DOCKERD_PID=
  return 1
}

ctr_docker_up() {
  # The CLI that ships with the engine (docker.io) when present: it matches the daemon's API.
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
  if command -v "$DOCKER" >/dev/null && "$DOCKER" info >/dev/null 2>&1; then
    echo "using the running Docker engine ($("$DOCKER" version -f '{{.Server.Version}}'))" >&2
    return 0
  fi
  if ! command -v dockerd >/dev/null; then
    ctr_apt_install docker.io
    DOCKER=/usr/bin/docker
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: no Docker engine answers and starting dockerd needs root" >&2
    return 1
  fi
  # On this machine's kernel (cgroup v1, overlayfs, iptables all present) the defaults work. A
  # kernel without overlayfs or iptables NAT makes dockerd exit at once; vfs storage and no
  # iptables (ports are then published by docker-proxy alone) work nearly everywhere.
  ctr_try_dockerd && return 0
  ctr_try_dockerd --iptables=false --storage-driver=vfs && return 0
  echo "error: dockerd does not start on this machine (see $CTR_DOCKERD_LOG)" >&2
  return 1
}

# Stops the dockerd ctr_docker_up started, if it started one.
ctr_docker_down() {
  [[ -n "$CTR_DOCKERD_PID" ]] || return 0
  kill -TERM "$CTR_DOCKERD_PID" 2>/dev/null || true
  local i
  for i in $(seq 1 80); do
    kill -0 "$CTR_DOCKERD_PID" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL "$CTR_DOCKERD_PID" 2>/dev/null || true
  wait "$CTR_DOCKERD_PID" 2>/dev/null || true
  CTR_DOCKERD_PID=
}

# GUESTD_STATIC_BIN, or the static guestd freshly built by scripts/build-static.sh; exported.
ctr_static_guestd() {
  if [[ -z "${GUESTD_STATIC_BIN:-}" ]]; then
    scripts/build-static.sh
    GUESTD_STATIC_BIN="$PWD/target/x86_64-unknown-linux-musl/release/guestd"
  fi
  export GUESTD_STATIC_BIN
}

ctr_base_image() {
  local mirror key dir tarball
  mirror=$(ctr_debian_mirror)
  # Bump the trailing version when the rootfs recipe below changes.
  key=$(printf '%s\n' "$CTR_BASE_SUITE" minbase "$CTR_BASE_PACKAGES" "$mirror" recipe-1 | sha256sum | cut -c1-12)
  CTR_BASE_IMAGE="guestd-test/base:$key"
  dir="$CTR_CACHE/base"
  tarball="$dir/debian-$CTR_BASE_SUITE-minbase-$key.tar"
  mkdir -p "$dir"
  exec 8>"$dir/lock"
  flock 8
  if [[ ! -f "$tarball" ]]; then
    command -v debootstrap >/dev/null || ctr_apt_install debootstrap
    local rootfs="$dir/rootfs-$key.tmp" start=$SECONDS
    rm -rf "$rootfs"
    echo "debootstrap --variant=minbase $CTR_BASE_SUITE from $mirror (once; cached as $tarball)" >&2
    if ! debootstrap --variant=minbase --include="$CTR_BASE_PACKAGES" "$CTR_BASE_SUITE" "$rootfs" "$mirror" \
        >"$dir/debootstrap.log" 2>&1; then
      echo "error: debootstrap failed; its log ends:" >&2
      tail -20 "$dir/debootstrap.log" >&2
      rm -rf "$rootfs"
      flock -u 8
      return 1
    fi
    # Downloaded packages and package lists only make the image bigger.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    echo "base rootfs built in $((SECONDS - start)) s ($(du -h "$tarball" | cut -f1))" >&2
  fi
  if ! "$DOCKER" image inspect "$CTR_BASE_IMAGE" >/dev/null 2>&1; then
    echo "docker import $tarball as $CTR_BASE_IMAGE" >&2
    "$DOCKER" import --change 'CMD ["/bin/bash"]' "$tarball" "$CTR_BASE_IMAGE" >/dev/null
  fi
  flock -u 8
  echo "base image: $CTR_BASE_IMAGE" >&2
}

# docker build with our label (so dangling predecessors can be pruned), quiet unless it fails.
ctr_docker_build() {
  local tag=$1 context=$2 out
  shift 2
  if ! out=$(DOCKER_BUILDKIT=0 "$DOCKER" build --label guestd-test=1 -t "$tag" "$@" "$context" 2>&1); then
    echo "$out" >&2
    echo "error: docker build of $tag failed" >&2
    return 1
  fi
  echo "built $tag" >&2
}

# The OpenRC .debs (for the OpenRC test image), downloaded once into the cache; prints the dir.
ctr_openrc_debs() {
  local dir="$CTR_CACHE/debs/openrc"
  if [[ ! -f "$dir/.complete" ]]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    if ! (cd "$dir" && apt-get download "${CTR_OPENRC_DEBS[@]}" >/dev/null 2>&1); then
      apt-get update -qq >&2
      (cd "$dir" && apt-get download "${CTR_OPENRC_DEBS[@]}" >/dev/null)
    fi
    touch "$dir/.complete"
  fi
  echo "$dir"
}

ctr_build_images() {
  local bin=${GUESTD_STATIC_BIN:?GUESTD_STATIC_BIN: the static guestd to bake in}
  local busybox=/bin/busybox
  if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
    ctr_apt_install busybox-static
  fi
  local ctx
  ctx=$(mktemp -d)
  cp -r "$CTR_ROOT/packaging/docker/template" "$ctx/template"
  cp -r "$CTR_ROOT/packaging/docker/scratch" "$ctx/scratch"
  cp "$bin" "$ctx/template/guestd"
  cp "$bin" "$ctx/scratch/guestd"
  cp "$busybox" "$ctx/scratch/busybox"
  mkdir -p "$ctx/openrc/debs"
  cp "$CTR_ROOT/tests/containers/openrc/Dockerfile" "$ctx/openrc/"
  cp "$CTR_ROOT/packaging/openrc/guestd" "$ctx/openrc/guestd.initd"
  cp "$CTR_ROOT/packaging/openrc/guestd.confd" "$ctx/openrc/guestd.confd"
  cp "$bin" "$ctx/openrc/guestd"
  cp "$(ctr_openrc_debs)"/*.deb "$ctx/openrc/debs/"
  exec 8>"$CTR_CACHE/images.lock"
  flock 8
  ctr_docker_build "$CTR_TEMPLATE_IMAGE" "$ctx/template" --build-arg "BASE=$CTR_BASE_IMAGE" &&
    ctr_docker_build "$CTR_STARTCMD_IMAGE" "$ctx/template" --build-arg "BASE=$CTR_BASE_IMAGE" \
      --build-arg "START_CMD=$CTR_IMAGE_START_CMD" --build-arg "READY_CMD=$CTR_IMAGE_READY_CMD" &&
    ctr_docker_build "$CTR_SCRATCH_IMAGE" "$ctx/scratch" &&
    ctr_docker_build "$CTR_OPENRC_IMAGE" "$ctx/openrc" --build-arg "BASE=$CTR_BASE_IMAGE"
  local rc=$?
  flock -u 8
  rm -rf "$ctx"
  # Earlier builds of these tags, now untagged.
  "$DOCKER" image prune -f --filter label=guestd-test=1 >/dev/null 2>&1 || true
  return $rc
}

ctr_cleanup() {
  local run=$1 ids
  [[ -n "${DOCKER:-}" ]] || return 0
  ids=$("$DOCKER" ps -aq --filter "label=guestd-test.run=$run" 2>/dev/null || true)
  if [[ -n "$ids" ]]; then
    echo "removing $(echo "$ids" | wc -l) leftover container(s) of run $run" >&2
    # shellcheck disable=SC2086
    "$DOCKER" rm -f $ids >/dev/null 2>&1 || true
  fi
}
