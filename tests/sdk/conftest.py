"""Fixtures for the SDK test tier: one freshly started guestd per pytest session, driven by the real
E2B Python SDK in debug mode.

* `guestd` starts `$GUESTD_BIN --listen 127.0.0.1:<port>` and waits for `GET /health` → 204.
  The port is outside the ephemeral range (32768–60999) so polling can never self-connect.
  At teardown it stops guestd with SIGTERM and fails the session if guestd does not exit, exits
  badly, or leaves any process behind (descendants seen before shutdown, or anything carrying the
  run's marker; see helpers.MARK). Leftovers are then SIGKILLed by pid so the machine stays clean.
* `sandbox` is `Sandbox.create()` with `E2B_DEBUG=true` and `E2B_SANDBOX_URL` pointing at guestd:
  in debug mode the SDK makes no API call and sends every envd request to that URL
  (`ConnectionConfig.get_sandbox_url`: an explicit sandbox URL wins over `http://localhost:49983`).
* `test_user` creates a throw-away user with a supplementary group (needs root).
"""

from __future__ import annotations

import ctypes
import grp
import http.client
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Optional, Sequence

import pytest

from helpers import MARK, RUN_ID, Proc, descendants, marked_procs, still_alive
from testkit import free_port

# Set in guestd's own environment; a child must never see it (children get an explicit env).
LEAK_VAR = "GUESTD_SDK_AGENT_ONLY"

# Ports below the ephemeral range; a TCP poll on an ephemeral port can connect to itself.
STARTUP_TIMEOUT_S = 20.0
SHUTDOWN_GRACE_S = 15.0


@dataclass
class Guestd:
    proc: subprocess.Popen
    port: int
    log_path: str
    log: Optional[IO] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"<no log: {e}>"


def _die_with_parent() -> None:
    # If pytest itself is killed (e.g. by pytest-timeout), guestd must not outlive it.
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _health(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def _describe(procs: list[Proc]) -> str:
    return "\n".join(f"    pid {p.pid} (ppid {p.ppid}, state {p.state}): {p.cmdline}" for p in procs)


_LOG_DIR: Optional[str] = None


def _log_dir() -> str:
    """`GUESTD_TEST_LOG_DIR`, else one temp dir for the whole run (every guestd logs there)."""
    global _LOG_DIR
    if _LOG_DIR is None:
        _LOG_DIR = os.environ.get("GUESTD_TEST_LOG_DIR") or tempfile.mkdtemp(prefix="guestd-sdk-")
        os.makedirs(_LOG_DIR, exist_ok=True)
    return _LOG_DIR


def launch_guestd(
    extra_args: Sequence[str] = (),
    *,
    wrapper: Sequence[str] = (),
    env: Optional[dict] = None,
    name: str = "guestd",
) -> Guestd:
    """Starts `[*wrapper] $GUESTD_BIN --listen 127.0.0.1:<port> [*extra_args]` and waits for
    `GET /health` → 204 (fails the test otherwise). `wrapper` must end in an `exec` of its
    arguments so that `proc.pid` is guestd's own pid (peak-RSS reads, teardown checks)."""
    binary = os.environ.get("GUESTD_BIN")
    if not binary:
        pytest.fail(
            "GUESTD_BIN is not set: run the SDK tier through scripts/test-sdk.sh "
            "(it builds guestd and sets GUESTD_BIN and the venv)",
            pytrace=False,
        )
    if not os.access(binary, os.X_OK):
        pytest.fail(f"GUESTD_BIN={binary} is not an executable file", pytrace=False)

    port = free_port()
    log_dir = _log_dir()
    suffix = "" if name == "guestd" else f"-{name}-{port}"
    log_path = os.path.join(log_dir, f"guestd-{RUN_ID}{suffix}.log")
    child_env = dict(os.environ)
    child_env.setdefault("RUST_LOG", "info")
    child_env[LEAK_VAR] = MARK
    child_env.update(env or {})
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [*wrapper, binary, "--listen", f"127.0.0.1:{port}", *extra_args],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env,
        preexec_fn=_die_with_parent,
    )
    server = Guestd(proc=proc, port=port, log_path=log_path, log=log)
    print(f"\n{name} pid {proc.pid} on {server.url}, log {log_path}", file=sys.stderr)

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            pytest.fail(
                f"guestd exited with {proc.returncode} before answering /health; log:\n{server.log_tail()}",
                pytrace=False,
            )
        status = _health(port)
        if status is not None:
            break
        time.sleep(0.05)
    if status != 204:
        proc.kill()
        proc.wait()
        log.close()
        pytest.fail(
            f"GET /health on {server.url} gave {status} (want 204) within {STARTUP_TIMEOUT_S}s; "
            f"log:\n{server.log_tail()}",
            pytrace=False,
        )
    return server


def shutdown_guestd(server: Guestd, *, check_marked: bool = True) -> list[str]:
    """Stops guestd with SIGTERM; returns what went wrong (empty: it exited cleanly and left
    no process behind). Leftovers are SIGKILLed by pid. `check_marked` also counts every
    process carrying the run's MARK (right for the session guestd, which spawned them all)."""
    proc = server.proc
    before = descendants(proc.pid)
    if check_marked:
        before += [p for p in marked_procs() if p.pid != proc.pid]
    problems = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=SHUTDOWN_GRACE_S)
    except subprocess.TimeoutExpired:
        problems.append(f"guestd did not exit within {SHUTDOWN_GRACE_S}s of SIGTERM; killed it")
        proc.kill()
        proc.wait()
    else:
        if proc.returncode not in (0, -signal.SIGTERM):
            problems.append(f"guestd exited with {proc.returncode} after SIGTERM (want 0)")
    if server.log is not None:
        server.log.close()

    time.sleep(0.2)  # let the kernel finish delivering any kill guestd sent on its way out
    left = {p.pid: p for p in before if still_alive(p)}
    if check_marked:
        left.update({p.pid: p for p in marked_procs()})
    if left:
        problems.append(
            "processes spawned through guestd outlived it:\n" + _describe(list(left.values()))
        )
        for p in left.values():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return problems


@pytest.fixture(scope="session")
def guestd():
    server = launch_guestd()

    yield server

    # ---- teardown: guestd must stop on SIGTERM and leave nothing behind ----
    problems = shutdown_guestd(server)
    if problems:
        pytest.fail(
            "guestd teardown:\n  " + "\n  ".join(problems) + f"\nlog tail:\n{server.log_tail()}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def sandbox(guestd):
    from e2b import Sandbox

    mp = pytest.MonkeyPatch()
    mp.setenv("E2B_DEBUG", "true")
    mp.setenv("E2B_SANDBOX_URL", guestd.url)
    # Loopback never goes through a proxy, whatever the machine's settings.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    mp.setenv("NO_PROXY", no_proxy)
    mp.setenv("no_proxy", no_proxy)
    try:
        sbx = Sandbox.create()
        assert sbx.sandbox_id == "debug_sandbox_id"
        yield sbx
    finally:
        mp.undo()


@pytest.fixture
def spawn_guestd():
    """Factory for a guestd of the test's own (special flags, a fresh state):
    `spawn_guestd("--start-cmd", "...", wrapper=[...])` → a started, healthy `Guestd`.
    Each one is stopped at the end of the test and checked like the session guestd (exits on
    SIGTERM, leaves no descendant behind); a problem fails the test's teardown."""
    started: list[Guestd] = []

    def spawn(*extra_args: str, wrapper: Sequence[str] = (), env: Optional[dict] = None) -> Guestd:
        server = launch_guestd(extra_args, wrapper=wrapper, env=env, name=f"own{len(started)}")
        started.append(server)
        return server

    yield spawn

    problems = []
    for server in started:
        for problem in shutdown_guestd(server, check_marked=False):
            problems.append(f"{server.url}: {problem}\nlog tail:\n{server.log_tail()}")
    if problems:
        pytest.fail("own guestd teardown:\n  " + "\n  ".join(problems), pytrace=False)


def sdk_sandbox(url: str, access_token: Optional[str] = None):
    """A debug-mode `Sandbox` for a guestd other than the session's.

    Without `access_token` this is `Sandbox.create(debug=True, sandbox_url=url)`. With one, it
    builds the sandbox the way `Sandbox.create()` does outside debug mode when the API returns an
    envd access token (`sandbox_sync/main.py` `_create`): `X-Access-Token` on every envd request
    and `envd_access_token` set, so `download_url`/`upload_url` are signed. Debug `create()`
    itself never has a token, so this goes through the (deprecated) constructor."""
    from e2b import ConnectionConfig, Sandbox
    from e2b.envd.versions import ENVD_DEBUG_FALLBACK

    if access_token is None:
        return Sandbox.create(debug=True, sandbox_url=url)
    config = ConnectionConfig(
        debug=True,
        sandbox_url=url,
        extra_sandbox_headers={
            "X-Access-Token": access_token,
            "E2b-Sandbox-Id": "debug_sandbox_id",
            "E2b-Sandbox-Port": str(ConnectionConfig.envd_port),
        },
    )
    return Sandbox(
        sandbox_id="debug_sandbox_id",
        sandbox_domain=None,
        envd_version=ENVD_DEBUG_FALLBACK,
        envd_access_token=access_token,
        traffic_access_token=None,
        connection_config=config,
    )


def running_as_root() -> bool:
    return os.geteuid() == 0


@dataclass
class TestUser:
    name: str
    uid: int
    gid: int
    home: str
    group: str
    group_gid: int


@pytest.fixture(scope="session")
def test_user():
    """A fresh login user with a home and one supplementary group; removed at the end."""
    if not running_as_root():
        pytest.skip("creating a user needs root (useradd); this run is not root")
    name = f"gsdk{RUN_ID[:8]}"
    group = f"{name}x"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", "-G", group, name], check=True)
        pw = pwd.getpwnam(name)
        yield TestUser(name, pw.pw_uid, pw.pw_gid, pw.pw_dir, group, grp.getgrnam(group).gr_gid)
    finally:
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def pytest_report_header(config):
    return [f"guestd SDK tier: run {RUN_ID}, process marker {MARK}"]

