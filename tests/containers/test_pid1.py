"""guestd's duties as PID 1 of a container: `docker stop` ends the sandbox cleanly within Docker's
grace period (exit 0, not Docker's SIGKILL), with every process getting SIGTERM before anything
harsher; orphaned grandchildren are adopted and reaped, so no zombie accumulates.

What a process saw is written to a host directory bind-mounted at /out, so it can be read after
the container is gone."""

from __future__ import annotations

import os
import time

import pytest

from helpers import docker, procs_in, wait_until

# `docker stop -t`: Docker SIGKILLs PID 1 this long after SIGTERM (its default).
DOCKER_STOP_TIMEOUT_S = 10


def _trap(name: str, exit_on_term: bool) -> str:
    """A shell loop that appends `TERM` to /out/<name> when SIGTERMed, and then exits or not."""
    on_term = f"echo TERM >> /out/{name}" + ("; exit 0" if exit_on_term else "")
    return f"trap '{on_term}' TERM; echo up > /out/{name}.up; while :; do sleep 0.05; done"


def _stop_scenario(containers, template_image, tmp_path, stubborn: bool, stubborn_orphan: bool = False):
    """Starts processes that record SIGTERM in /out, runs `docker stop`, checks guestd exited 0
    in time and every process got SIGTERM."""
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    box = containers.start(template_image, volumes=(f"{out}:/out",))
    sbx = box.sandbox()

    names = ["polite", "orphan"] + (["stubborn"] if stubborn else [])
    # A command that exits on SIGTERM, with the SDK still attached to its output (a user's
    # background handle is an open stream).
    handles = [sbx.commands.run(_trap("polite", exit_on_term=True), background=True)]
    if stubborn:
        # One that ignores SIGTERM: guestd must SIGKILL it after its grace period, still in time.
        handles.append(sbx.commands.run(_trap("stubborn", exit_on_term=False), background=True))
    # A grandchild in a session of its own, orphaned: only PID 1's final sweep reaches it.
    orphan = _trap("orphan", exit_on_term=not stubborn_orphan)
    sbx.commands.run(f"setsid bash -c \"{orphan}\" >/dev/null 2>&1 &")
    for name in names:
        assert wait_until(lambda: (out / f"{name}.up").exists(), 10), f"{name} did not start"

    started = time.monotonic()
    docker_stop = docker(
        "stop", "-t", str(DOCKER_STOP_TIMEOUT_S), box.id, check=False, timeout=DOCKER_STOP_TIMEOUT_S + 20
    )
    elapsed = time.monotonic() - started
    print(f"docker stop took {elapsed:.2f}s")

    state = box.state()
    assert docker_stop.returncode == 0, docker_stop.stderr
    assert not state["Running"]
    assert state["ExitCode"] == 0, (
        f"guestd exited {state['ExitCode']} after `docker stop` ({elapsed:.1f}s; 137 = Docker had to "
        f"SIGKILL it after {DOCKER_STOP_TIMEOUT_S}s)\n{box.logs()}"
    )
    assert elapsed < DOCKER_STOP_TIMEOUT_S, f"docker stop took {elapsed:.1f}s\n{box.logs()}"
    for name in names:
        got = (out / name).read_text() if (out / name).exists() else ""
        assert got.startswith("TERM\n"), f"{name} never got SIGTERM (file: {got!r}), {elapsed:.1f}s\n{box.logs()}"
    for handle in handles:
        handle.disconnect()


def test_docker_stop_terms_every_process_then_exits_0_in_time(containers, template_image, tmp_path):
    _stop_scenario(containers, template_image, tmp_path, stubborn=False)


def test_docker_stop_in_time_even_with_a_process_ignoring_sigterm(containers, template_image, tmp_path):
    _stop_scenario(containers, template_image, tmp_path, stubborn=True)


def test_docker_stop_in_time_with_a_command_and_an_orphan_ignoring_sigterm(containers, template_image, tmp_path):
    _stop_scenario(containers, template_image, tmp_path, stubborn=True, stubborn_orphan=True)


def test_orphaned_grandchildren_are_reaped(containers, template_image):
    box = containers.start(template_image)
    sbx = box.sandbox()
    marker = f"orphan-{box.hostname}"

    # Each `( ... & )` subshell exits at once, leaving its sleep without a parent: the kernel
    # hands it to PID 1. When the sleeps end, only PID 1 can reap them. (Their output goes to
    # /dev/null: a command's output stream, and so `run`, lasts until every writer closes it.)
    sbx.commands.run(f"for i in 1 2 3 4 5; do ( exec -a {marker} sleep 2 >/dev/null 2>&1 & ); done")

    orphans = [p for p in procs_in(sbx) if p.cmdline.startswith(marker)]
    assert len(orphans) == 5, orphans
    assert {p.ppid for p in orphans} == {1}, f"orphans were not adopted by PID 1: {orphans}"
    pid1 = [p for p in procs_in(sbx) if p.pid == 1]
    assert pid1 and pid1[0].cmdline.startswith("/usr/bin/guestd"), pid1

    pids = {p.pid for p in orphans}
    left: list = []

    def reaped() -> bool:
        nonlocal left
        left = [p for p in procs_in(sbx) if p.pid in pids or p.state == "Z"]
        return not left

    assert wait_until(reaped, 10, 0.2), f"not reaped (Z = zombie) 10 s after they ended: {left}"
