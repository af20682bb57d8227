"""The template's start command: given per `docker run` (arguments after the image name go to
guestd) or per image (`--build-arg START_CMD`, written to /etc/guestd/start.conf). It runs once
at boot as the default user, the host can find it (`commands.list`, tag `start_cmd`), reattach
to it and get its output from the beginning, and `/ready` turns 200 when the ready command
passes."""

from __future__ import annotations

import os

from helpers import wait_until

START_TAG = "start_cmd"


def start_cmd_of(sbx):
    procs = [p for p in sbx.commands.list() if p.tag == START_TAG]
    assert len(procs) == 1, f"want exactly one process tagged {START_TAG}: {sbx.commands.list()}"
    return procs[0]


def wait_ready(box, timeout: float = 20.0) -> dict:
    last = None

    def ok():
        nonlocal last
        last = box.ready()
        return last[0] == 200

    assert wait_until(ok, timeout, 0.1), f"/ready did not turn 200 within {timeout}s: {last}\n{box.logs()}"
    return last[1]


BOOT_CMD = (
    'echo "boot stdout as $(id -un) in $PWD"; echo "boot stderr" >&2; touch /tmp/started; '
    "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo bye"
)


def test_start_cmd_from_docker_run_runs_at_boot_is_reattachable_and_ready(containers, template_image):
    box = containers.start(template_image, "--start-cmd", BOOT_CMD, "--ready-cmd", "test -e /tmp/started")
    sbx = box.sandbox()

    body = wait_ready(box)
    assert body["state"] == "ready", body

    proc = start_cmd_of(sbx)
    assert proc.args[-1] == BOOT_CMD, proc

    # Reattach: the output it printed before anyone connected is replayed, then the live rest.
    handle = sbx.commands.connect(proc.pid)
    sbx.commands.run("touch /tmp/go")
    result = handle.wait()
    assert result.exit_code == 0
    assert result.stdout == "boot stdout as user in /home/user\nbye\n"
    assert result.stderr == "boot stderr\n"
    assert all(p.tag != START_TAG for p in sbx.commands.list()), "it ended"


def test_start_cmd_from_the_image_and_overridden_per_container(containers, startcmd_image):
    image_cmd = os.environ["GUESTD_IMAGE_START_CMD"]
    default = containers.start(startcmd_image)
    override = containers.start(startcmd_image, "--start-cmd", 'echo "overridden by docker run"; exec sleep 600')

    for box, want_arg, want_out in [
        (default, image_cmd, "image start command ran as user\n"),
        (override, 'echo "overridden by docker run"; exec sleep 600', "overridden by docker run\n"),
    ]:
        sbx = box.sandbox()
        wait_ready(box)
        proc = start_cmd_of(sbx)
        assert proc.args[-1] == want_arg, proc
        # Still running: read its replayed output from the stream, then let go of it.
        handle = sbx.commands.connect(proc.pid)
        seen = ""
        for stdout, _stderr, _pty in handle:
            seen += stdout or ""
            if seen.endswith("\n"):
                break
        handle.disconnect()
        assert seen == want_out, f"{box.image} {want_arg!r}"


def test_docker_restart_with_tmpfs_run_is_a_new_boot(containers, template_image):
    """guestd runs the start command once per boot, remembered in /run (a tmpfs in a VM). With
    `--tmpfs /run`, as packaging/README.md advises, `docker restart` is a new boot and the start
    command runs again; a command started after boot does not come back."""
    box = containers.start(
        template_image, "--start-cmd", "date +%s%N >> /home/user/boots; exec sleep 600",
        docker_args=("--tmpfs", "/run"),
    )
    wait_ready(box)
    assert box.sandbox().files.read("/home/user/boots").count("\n") == 1

    box.restart()
    wait_ready(box)

    sbx = box.sandbox()
    assert sbx.files.read("/home/user/boots").count("\n") == 2, box.logs()
    assert len([p for p in sbx.commands.list() if p.tag == START_TAG]) == 1
