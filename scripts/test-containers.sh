#!/usr/bin/env bash
# Test tier 4: guestd baked into template images (packaging/docker/), started as PID 1 of Docker
# containers and driven from the host with the real E2B SDK (E2B_SANDBOX_URL pointing at the
# container's port, published on 127.0.0.1 only). See tests/containers/README.md.
#
#   scripts/test-containers.sh [pytest args...]     e.g. scripts/test-containers.sh -k stop -x
#
# Installs docker.io (and debootstrap, busybox-static) when missing and starts dockerd when no
# engine answers (stopping it again at the end); builds the static guestd and the images from it;
# the Debian base rootfs is made once with debootstrap and cached under
# ${GUESTD_TEST_CACHE:-~/.cache/guestd-test}/base. Every container the run starts carries the
# label guestd-test.run=<run id> and is removed at exit, however the run ends. Needs root.
#
# Environment: GUESTD_STATIC_BIN (use this binary instead of building one),
# GUESTD_DEBIAN_MIRROR (debootstrap mirror; default: the one apt uses).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=../tests/containers/lib.sh
source tests/containers/lib.sh

started=$SECONDS
GUESTD_CONTAINER_RUN="$(date +%s)-$$"
export GUESTD_CONTAINER_RUN
on_exit() {
  local rc=$?
  ctr_cleanup "$GUESTD_CONTAINER_RUN"
  ctr_docker_down
  echo "container tier: $((SECONDS - started)) s, exit $rc" >&2
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $(id -u) -ne 0 ]]; then
  echo "error: the container tier needs root (it installs packages, starts dockerd, runs debootstrap)" >&2
  exit 1
fi

ctr_step "Docker engine"
ctr_docker_up

ctr_step "Python venv (e2b SDK)"
GUESTD_TEST_PYTHON="$(scripts/sdk-venv.sh)"

ctr_step "static guestd"
ctr_static_guestd

ctr_step "base image (Debian $CTR_BASE_SUITE minbase, cached)"
ctr_base_image

ctr_step "images"
ctr_build_images

ctr_step "container tests"
export GUESTD_DOCKER="$DOCKER" GUESTD_TEMPLATE_IMAGE="$CTR_TEMPLATE_IMAGE" \
  GUESTD_STARTCMD_IMAGE="$CTR_STARTCMD_IMAGE" GUESTD_SCRATCH_IMAGE="$CTR_SCRATCH_IMAGE" \
  GUESTD_OPENRC_IMAGE="$CTR_OPENRC_IMAGE" \
  GUESTD_IMAGE_START_CMD="$CTR_IMAGE_START_CMD"
"$GUESTD_TEST_PYTHON" -m pytest -q tests/containers "$@"
