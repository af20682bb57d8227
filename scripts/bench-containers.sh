#!/usr/bin/env bash
# Container figures for guestd (tests/containers/bench.py), each next to its Docker baseline
# measured in the same run:
#   1. container start to first successful command (p50 of 10) vs `docker run --rm <image> true`;
#   2. command round trip through guestd inside a running container vs `docker exec <c> true`,
#      as a ratio (target: guestd >= 10x faster).
# Figures only; nothing here fails on a slow result. Same setup as scripts/test-containers.sh
# (Docker engine, cached Debian base, images from the freshly built static guestd); every
# container it starts is removed at exit. Needs root.
#
#   scripts/bench-containers.sh [bench.py args...]    e.g. --starts 20 --round-trips 500
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=../tests/containers/lib.sh
source tests/containers/lib.sh

GUESTD_CONTAINER_RUN="bench-$(date +%s)-$$"
export GUESTD_CONTAINER_RUN
on_exit() {
  local rc=$?
  ctr_cleanup "$GUESTD_CONTAINER_RUN"
  ctr_docker_down
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ctr_step "Docker engine"
ctr_docker_up
ctr_step "Python venv (e2b SDK)"
python="$(scripts/sdk-venv.sh)"
ctr_step "static guestd"
ctr_static_guestd
ctr_step "base image and images"
ctr_base_image
ctr_build_images

ctr_step "container figures"
GUESTD_DOCKER="$DOCKER" "$python" tests/containers/bench.py "$CTR_TEMPLATE_IMAGE" "$@"
