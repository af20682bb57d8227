"""The minimal image (packaging/docker/scratch): only the static guestd and a static busybox."""

from __future__ import annotations

from helpers import docker


def test_scratch_image_answers_health_and_runs_busybox(containers, scratch_image):
    box = containers.start(scratch_image)  # waits for GET /health → 204
    sbx = box.sandbox()

    result = sbx.commands.run("busybox echo hello from busybox; uname -s; id -u; ls /usr/bin")
    assert result.stdout == "hello from busybox\nLinux\n0\nguestd\n"

    sbx.files.write("/tmp/note.txt", "scratch")
    assert sbx.commands.run("cat /tmp/note.txt").stdout == "scratch"

    # Minimal means small: guestd (~6 MB) + busybox (~2 MB) and two /etc files.
    size = int(docker("image", "inspect", "-f", "{{.Size}}", scratch_image).stdout)
    print(f"{scratch_image}: {size / 2**20:.1f} MiB")
    assert size < 16 * 2**20, f"{scratch_image} is {size} bytes"
