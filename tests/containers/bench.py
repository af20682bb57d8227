"""Container figures for guestd (run through scripts/bench-containers.sh), each next to the Docker
baseline measured in the same run. Figures only: nothing here fails on a slow result.

1. Container start to first successful command: `docker run -d` of the template image with the
   port published on 127.0.0.1, then the E2B SDK's `commands.run("true")` retried until it
   succeeds; p50 of N. Baseline: `docker run --rm --entrypoint true <image>` (a fresh container
   running `true` and removed), p50 of N.
2. Command round trip in a running container: the SDK's `commands.run("true")` (guestd runs it as
   `/bin/bash -l -c true`, as for every SDK command) against `docker exec <container> true` and
   `docker exec <container> bash -l -c true`; the ratio is docker exec p50 / guestd p50.

    python bench.py IMAGE [--starts N] [--round-trips N] [--execs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from helpers import GUESTD_PORT, docker, docker_cli, sandbox_for  # noqa: E402
from testkit import free_port  # noqa: E402

RUN = os.environ.get("GUESTD_CONTAINER_RUN", f"bench-{os.getpid()}")
START_DEADLINE_S = 30.0


def run_container(image: str, port: int) -> str:
    return docker(
        "run", "-d", "--label", f"guestd-test.run={RUN}", "-p", f"127.0.0.1:{port}:{GUESTD_PORT}", image
    ).stdout.strip()


def start_to_first_command(image: str) -> float:
    port = free_port()
    t0 = time.perf_counter()
    cid = run_container(image, port)
    try:
        sbx = sandbox_for(f"http://127.0.0.1:{port}")  # debug mode: no network call
        while True:
            try:
                if sbx.commands.run("true", request_timeout=5).exit_code == 0:
                    return time.perf_counter() - t0
            except Exception:  # noqa: BLE001 - not listening yet: docker-proxy resets the connection
                if time.perf_counter() - t0 > START_DEADLINE_S:
                    raise
                time.sleep(0.005)
    finally:
        docker("rm", "-f", cid, check=False)


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ms(xs: list[float]) -> str:
    return f"p50 {statistics.median(xs) * 1e3:8.2f} ms   mean {statistics.fmean(xs) * 1e3:8.2f} ms   " \
           f"min {min(xs) * 1e3:8.2f} ms   max {max(xs) * 1e3:8.2f} ms   (n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--round-trips", type=int, default=200)
    ap.add_argument("--execs", type=int, default=30)
    a = ap.parse_args()
    os.environ["E2B_DEBUG"] = "true"
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy
    cli = docker_cli()
    engine = docker("version", "-f", "{{.Server.Version}}").stdout.strip()
    print(f"image {a.image}, Docker engine {engine}, {os.cpu_count()} CPUs")

    # -- 1. start to first command -------------------------------------------------------------
    start_to_first_command(a.image)  # warm-up: page cache, docker's first-run costs
    starts = [start_to_first_command(a.image) for _ in range(a.starts)]
    baseline_cmd = [cli, "run", "--rm", "--label", f"guestd-test.run={RUN}", "--entrypoint", "true", a.image]
    subprocess.run(baseline_cmd, check=True)
    docker_true = timed(lambda: subprocess.run(baseline_cmd, check=True), a.starts)

    # -- 2. round trip in a running container -----------------------------------------------------
    port = free_port()
    cid = run_container(a.image, port)
    try:
        sbx = sandbox_for(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                sbx.commands.run("true", request_timeout=5)
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        for _ in range(10):
            sbx.commands.run("true")
        guestd_rt = timed(lambda: sbx.commands.run("true"), a.round_trips)
        exec_true = [cli, "exec", cid, "true"]
        exec_bash = [cli, "exec", cid, "bash", "-l", "-c", "true"]
        subprocess.run(exec_true, check=True)
        docker_exec = timed(lambda: subprocess.run(exec_true, check=True), a.execs)
        docker_exec_bash = timed(lambda: subprocess.run(exec_bash, check=True), a.execs)
    finally:
        docker("rm", "-f", cid, check=False)

    p50 = statistics.median
    print()
    print("container start to first successful command")
    print(f"  guestd: docker run -d + SDK commands.run('true') ok   {ms(starts)}")
    print(f"  docker run --rm --entrypoint true <image>            {ms(docker_true)}")
    print()
    print("command round trip in a running container")
    print(f"  guestd: SDK commands.run('true')                     {ms(guestd_rt)}")
    print(f"  docker exec <container> true                         {ms(docker_exec)}")
    print(f"  docker exec <container> bash -l -c true              {ms(docker_exec_bash)}")
    ratio = p50(docker_exec) / p50(guestd_rt)
    ratio_bash = p50(docker_exec_bash) / p50(guestd_rt)
    print(f"  ratio docker exec / guestd (p50): {ratio:.1f}x   (with bash -l on both sides: {ratio_bash:.1f}x; target >= 10x)")
    print(json.dumps({
        "image": a.image,
        "start_to_first_command_p50_ms": round(p50(starts) * 1e3, 2),
        "docker_run_rm_true_p50_ms": round(p50(docker_true) * 1e3, 2),
        "guestd_round_trip_p50_ms": round(p50(guestd_rt) * 1e3, 3),
        "docker_exec_true_p50_ms": round(p50(docker_exec) * 1e3, 2),
        "docker_exec_bash_p50_ms": round(p50(docker_exec_bash) * 1e3, 2),
        "ratio_docker_exec_over_guestd": round(ratio, 1),
        "ratio_docker_exec_bash_over_guestd": round(ratio_bash, 1),
    }))


if __name__ == "__main__":
    main()
