"""Helpers for the container tier: the docker CLI, containers running guestd, SDK sandboxes
pointed at them, and a process listing taken inside a container."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx
from testkit import wait_until  # noqa: F401  (the tests import it from here)

# The port guestd listens on inside every image (packaging/docker/*/Dockerfile).
GUESTD_PORT = 49983
STARTUP_TIMEOUT_S = 30.0


def docker_cli() -> str:
    return os.environ.get("GUESTD_DOCKER") or "docker"


def docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs the docker CLI; on failure the error names the command and shows its stderr."""
    cmd = [docker_cli(), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def health(port: int) -> Optional[int]:
    """GET /health status, or None while nothing answers (docker-proxy accepts before guestd
    listens, then drops the connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


_sdk_lock = threading.Lock()


def sandbox_for(url: str):
    """`Sandbox.create()` in debug mode with E2B_SANDBOX_URL=url. The SDK reads the variable at
    creation and keeps the URL, so the environment is set only around creation, under a lock."""
    from e2b import Sandbox

    with _sdk_lock:
        old = os.environ.get("E2B_SANDBOX_URL")
        os.environ["E2B_SANDBOX_URL"] = url
        try:
            sbx = Sandbox.create()
        finally:
            if old is None:
                del os.environ["E2B_SANDBOX_URL"]
            else:
                os.environ["E2B_SANDBOX_URL"] = old
    assert sbx.sandbox_id == "debug_sandbox_id", "the SDK is not in debug mode"
    assert sbx.envd_api_url == url, f"sandbox addresses {sbx.envd_api_url}, want {url}"
    return sbx


@dataclass
class Container:
    id: str
    image: str
    port: int
    _sandbox: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostname(self) -> str:
        """Docker names a container's host after the first 12 digits of its id."""
        return self.id[:12]

    def sandbox(self):
        if self._sandbox is None:
            self._sandbox = sandbox_for(self.url)
        return self._sandbox

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=30)

    def post_init(self, body: dict) -> None:
        """POST /init as an orchestrator does (the SDK never calls it)."""
        with self.http() as c:
            r = c.post("/init", json=body)
        assert r.status_code == 204, f"POST /init {body} → {r.status_code} {r.text!r}\n{self.logs()}"

    def ready(self) -> tuple[int, dict]:
        with self.http() as c:
            r = c.get("/ready")
        return r.status_code, r.json()

    def logs(self, tail: int = 80) -> str:
        res = docker("logs", "--tail", str(tail), self.id, check=False)
        return res.stdout + res.stderr

    def state(self) -> dict:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.id).stdout)

    def running(self) -> bool:
        return self.state().get("Running", False)

    def restart(self) -> None:
        """`docker restart`; Docker may publish the port anew, so the URL and sandbox are renewed."""
        docker("restart", "-t", "10", self.id, timeout=40)
        self.port = published_port(self.id)
        self._sandbox = None
        ContainerFactory.wait_health(self)


def published_port(cid: str) -> int:
    mapping = docker("port", cid, f"{GUESTD_PORT}/tcp").stdout.split()
    host, _, port = mapping[0].rpartition(":")
    assert host == "127.0.0.1", f"port published on {host}, want 127.0.0.1 only: {mapping}"
    return int(port)


class ContainerFactory:
    """Starts containers labelled with the run id; `close` removes every one of them."""

    def __init__(self, run: str, owner: str):
        self.run = run
        self.owner = owner
        self.started: list[Container] = []
        self._lock = threading.Lock()

    def start(
        self,
        image: str,
        *guestd_args: str,
        volumes: tuple[str, ...] = (),
        docker_args: tuple[str, ...] = (),
        wait_health: bool = True,
    ) -> Container:
        """`docker run -d` with port 49983 published on 127.0.0.1; arguments after the image
        are appended to guestd's command line (the images' ENTRYPOINT is guestd);
        `docker_args` go before the image."""
        args = [
            "run", "-d",
            "--label", f"guestd-test.run={self.run}",
            "--label", f"guestd-test.owner={self.owner}",
            "-p", f"127.0.0.1::{GUESTD_PORT}",
        ]
        for v in volumes:
            args += ["-v", v]
        args += docker_args
        cid = docker(*args, image, *guestd_args).stdout.strip()
        try:
            c = Container(id=cid, image=image, port=published_port(cid))
        except BaseException:
            docker("rm", "-f", cid, check=False)
            raise
        with self._lock:
            self.started.append(c)
        if wait_health:
            self.wait_health(c)
        return c

    @staticmethod
    def wait_health(c: Container) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            status = health(c.port)
            if status is not None:
                break
            if not c.running():
                raise AssertionError(f"container {c.hostname} ({c.image}) exited: {c.state()}\n{c.logs()}")
            time.sleep(0.02)
        assert status == 204, (
            f"GET /health on {c.url} ({c.image}) gave {status} (want 204) within {STARTUP_TIMEOUT_S}s\n{c.logs()}"
        )

    def close(self, dump_logs: bool) -> None:
        for c in self.started:
            if dump_logs:
                print(f"\n--- log of container {c.hostname} ({c.image}) ---\n{c.logs()}", file=sys.stderr)
            docker("rm", "-f", "-v", c.id, check=False)
        self.started.clear()


# ---------------------------------------------------------------------------------------------
# Processes inside a container, seen through guestd (template image: has python3)

PROCS_PY = r"""
import json, os
out = []
for e in os.listdir("/proc"):
    if not e.isdigit():
        continue
    try:
        with open(f"/proc/{e}/stat") as f:
            stat = f.read()
        with open(f"/proc/{e}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{e}/oom_score_adj") as f:
            oom = int(f.read())
    except OSError:
        continue
    rest = stat.rsplit(")", 1)[1].split()
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    out.append({"pid": int(e), "state": rest[0], "ppid": int(rest[1]), "comm": comm, "cmdline": cmdline,
                "nice": int(rest[16]), "oom_score_adj": oom})
print(json.dumps(out))
"""
PROCS_PATH = "/tmp/guestd-test-procs.py"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    comm: str
    cmdline: str
    nice: int
    oom_score_adj: int


def procs_in(sbx) -> list[Proc]:
    """Every process in the container's PID namespace, from its /proc (the listing command
    itself included)."""
    sbx.files.write(PROCS_PATH, PROCS_PY)
    out = sbx.commands.run(f"python3 {PROCS_PATH}").stdout
    return [Proc(**p) for p in json.loads(out)]


def procs_via_exec(c: Container) -> list[Proc]:
    """The same listing taken with `docker exec` (not through guestd)."""
    out = docker("exec", c.id, "python3", "-c", PROCS_PY).stdout
    return [Proc(**p) for p in json.loads(out)]
