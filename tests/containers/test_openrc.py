"""packaging/openrc/guestd, installed as packaging/README.md says, in a Debian image with OpenRC
(tests/containers/openrc/Dockerfile) whose default runlevel starts at container start: the
service starts guestd with its default flags under supervise-daemon, at the set priority,
restarts it when it dies, and stops it on `rc-service guestd stop`."""

from __future__ import annotations

import pytest

from helpers import docker, health, procs_via_exec, wait_until

GUESTD_CMDLINE = "/usr/bin/guestd --listen 0.0.0.0:49983 --listen vsock://-1:49983 --default-user user"
CAP_SYS_RESOURCE = 24
CAP_SYS_NICE = 23


def host_has_cap(bit: int) -> bool:
    """Whether this machine's bounding set has the capability (a container cannot get more)."""
    with open("/proc/self/status") as f:
        bnd = next(line for line in f if line.startswith("CapBnd:"))
    return bool(int(bnd.split()[1], 16) >> bit & 1)


def guestd_procs(box):
    return [p for p in procs_via_exec(box) if p.comm == "guestd"]


def start(containers, image, *caps):
    if not host_has_cap(CAP_SYS_NICE):
        pytest.skip("this machine's capability bounding set lacks CAP_SYS_NICE: a container cannot raise guestd's priority")
    # --init: something must reap supervise-daemon (the entrypoint is a plain shell).
    args = ("--init", "--cap-add", "SYS_NICE") + tuple(a for cap in caps for a in ("--cap-add", cap))
    return containers.start(image, docker_args=args)


def test_openrc_service_starts_supervises_and_stops_guestd(containers, openrc_image):
    box = start(containers, openrc_image)  # waits for GET /health → 204
    assert box.sandbox().commands.run("id -un").stdout == "user\n"

    [guestd] = guestd_procs(box)
    assert guestd.cmdline == GUESTD_CMDLINE
    parent = [p for p in procs_via_exec(box) if p.pid == guestd.ppid]
    assert parent and parent[0].comm.startswith("supervise-daemo"), parent
    assert guestd.nice == -10

    # Restart policy: killed, it is back within respawn_delay (1 s) and a start.
    docker("exec", box.id, "sh", "-c", f"kill -KILL {guestd.pid}")
    respawned = []

    def back() -> bool:
        respawned[:] = guestd_procs(box)
        return bool(respawned) and respawned[0].pid != guestd.pid and health(box.port) == 204

    assert wait_until(back, 10, 0.1), f"guestd not respawned: {respawned}\n{box.logs()}"
    assert respawned[0].cmdline == GUESTD_CMDLINE

    stop = docker("exec", box.id, "rc-service", "guestd", "stop", check=False, timeout=30)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert guestd_procs(box) == []
    assert health(box.port) is None
    status = docker("exec", box.id, "rc-service", "guestd", "status", check=False)
    assert "stopped" in status.stdout, status.stdout
    log = docker("exec", box.id, "cat", "/var/log/guestd.log").stdout
    assert "shutting down" in log, "guestd's log goes to /var/log/guestd.log"


def test_openrc_service_sets_oom_score_adj_needs_cap_sys_resource(containers, openrc_image):
    if not host_has_cap(CAP_SYS_RESOURCE):
        pytest.skip(
            "this machine's capability bounding set lacks CAP_SYS_RESOURCE, which lowering "
            "oom_score_adj needs: supervise-daemon's --oom-score-adj -1000 cannot take effect here"
        )
    box = start(containers, openrc_image, "SYS_RESOURCE")
    [guestd] = guestd_procs(box)
    assert guestd.oom_score_adj == -1000
