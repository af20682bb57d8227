"""Sandbox lifecycle through the real E2B SDK (e2b==2.63.0, debug mode): what a host configures
with `POST /init` and guestd's start command at boot, seen from the SDK.

Every test starts a guestd of its own (`spawn_guestd`: special flags, state nobody else
touched), posts to it with plain HTTP as an orchestrator would (the SDK never calls `/init`,
client.md §6), and checks the effect with the SDK. Specs: http.md §2 (access token, signed
URLs), §4.4 (`/init`), §5.10 and issue 4 (start command, `/ready`, `--start-after-init`).

guestd runs its start command once per boot: a marker in /run/guestd records that it ran
(src/boot.rs). A test guestd is a new "boot" only if it sees an empty /run/guestd, so the
start-command tests run guestd in a private mount namespace with a fresh tmpfs there
(`unshare --mount`, needs root). `/init` bodies never carry a `timestamp`: that could step this
machine's clock.
"""

from __future__ import annotations

import os
import resource
import shutil
import threading
import time
import urllib.parse

import httpx
import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
)

from conftest import running_as_root, sdk_sandbox
from helpers import (
    RUN_ID,
    by_tag,
    expect_start,
    marked,
    marked_procs,
    raw_process_client,
    pid_running,
    sleeper,
    wait_until,
)

START_TAG = "start_cmd"


@pytest.fixture
def sdk_env(monkeypatch):
    """Loopback never through a proxy; debug mode for anything built from the environment."""
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    monkeypatch.setenv("E2B_DEBUG", "true")


def http() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30)


def post_init(server, body: dict, token: str | None = None) -> httpx.Response:
    headers = {"X-Access-Token": token} if token else {}
    with http() as c:
        return c.post(f"{server.url}/init", json=body, headers=headers)


def init_ok(server, body: dict, token: str | None = None) -> None:
    r = post_init(server, body, token)
    assert r.status_code == 204, (
        f"POST /init {body} → {r.status_code} {r.text!r}; guestd log:\n{server.log_tail()}"
    )
    assert r.headers.get("x-envd-version"), "POST /init answers with X-Envd-Version"


def ready(server) -> tuple[int, dict]:
    with http() as c:
        r = c.get(f"{server.url}/ready")
    return r.status_code, r.json()


def wait_ready(server, timeout: float = 15.0) -> dict:
    last = None

    def ok():
        nonlocal last
        last = ready(server)
        return last[0] == 200

    assert wait_until(ok, timeout, 0.1), f"/ready did not turn 200 within {timeout}s: {last}\n{server.log_tail()}"
    return last[1]


def fresh_boot() -> list[str]:
    """Wrapper that gives guestd an empty /run/guestd (a new boot as far as the once-per-boot
    marker is concerned) in a private mount namespace, then execs it (same pid)."""
    if not running_as_root():
        pytest.skip("a fresh /run/guestd needs a private mount namespace (unshare --mount): run as root")
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is not installed; scripts/test.sh installs it", pytrace=False)
    os.makedirs("/run/guestd", exist_ok=True)
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "/bin/sh", "-c", 'mount -t tmpfs -o size=1m,mode=0755 guestd-test-run /run/guestd && exec "$@"', "sh",
    ]


class Collected:
    """Runs `handle.wait()` on a thread, collecting stdout/stderr as they arrive."""

    def __init__(self, handle):
        self.handle = handle
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.error: BaseException | None = None
        self.result = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            self.result = self.handle.wait(on_stdout=self.stdout.append, on_stderr=self.stderr.append)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        assert wait_until(lambda: text in "".join(self.stdout), timeout), (
            f"{text!r} not received within {timeout}s; stdout {''.join(self.stdout)!r}, "
            f"stderr {''.join(self.stderr)!r}, stream {'open' if self._thread.is_alive() else 'ended: ' + repr(self.error)}"
        )

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


# ---------------------------------------------------------------------------------------------
# /init: env vars, default user and workdir


def test_guestd_raises_its_open_file_limit_and_commands_get_the_original(spawn_guestd, sdk_env):
    """A busy sandbox holds thousands of guestd's descriptors (four per command): guestd raises
    its own soft RLIMIT_NOFILE to the hard limit, as Go's runtime does for envd, and every command
    gets back the limit guestd was started with (select(2)-based programs break above 1024)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = 512
    if hard != resource.RLIM_INFINITY and hard <= soft:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise")
    g = spawn_guestd(wrapper=["sh", "-c", f'ulimit -Sn {soft} && exec "$@"', "sh"])
    with open(f"/proc/{g.pid}/limits") as f:
        line = next(l for l in f if l.startswith("Max open files"))
    assert int(line.split()[3]) > soft, f"guestd kept its soft limit: {line}"
    sbx = sdk_sandbox(g.url)
    assert sbx.commands.run("ulimit -Sn").stdout.strip() == str(soft)
    assert sbx.commands.run("ulimit -Sn", background=True).wait().stdout.strip() == str(soft)


def test_init_env_vars_reach_commands(spawn_guestd, sdk_env):
    g = spawn_guestd()
    sbx = sdk_sandbox(g.url)
    assert sbx.commands.run('echo "${X-unset}"').stdout == "unset\n"

    init_ok(g, {"envVars": {"X": "from init", "Y": "ÿ=€"}})
    assert sbx.commands.run('echo "$X|$Y"').stdout == "from init|ÿ=€\n"
    # background commands and PTYs are processes too
    assert sbx.commands.run('echo "$X"', background=True).wait().stdout == "from init\n"
    # request envs win over /init's (http.md §5.1 order: defaults, /init, request)
    assert sbx.commands.run('echo "$X|$Y"', envs={"X": "request"}).stdout == "request|ÿ=€\n"
    # /envs shows them
    with http() as c:
        envs = c.get(f"{g.url}/envs").json()
    assert envs.get("X") == "from init" and envs.get("Y") == "ÿ=€", envs

    # A later /init replaces the user vars: absent keys are deleted (http.md §4.4).
    init_ok(g, {"envVars": {"Y": "second"}})
    assert sbx.commands.run('echo "${X-unset}|$Y"').stdout == "unset|second\n"
    # ... and an /init without envVars leaves them alone.
    init_ok(g, {})
    assert sbx.commands.run('echo "$Y"').stdout == "second\n"


def test_init_default_user_and_workdir_needs_root(spawn_guestd, sdk_env, test_user):
    g = spawn_guestd()
    sbx = sdk_sandbox(g.url)
    workdir = os.path.join(test_user.home, f"wd-{RUN_ID}")
    os.makedirs(workdir, exist_ok=True)
    os.chown(workdir, test_user.uid, test_user.gid)
    with open(os.path.join(workdir, "in-workdir.txt"), "w") as f:
        f.write("w")
    rel = f"rel-{RUN_ID}.txt"
    try:
        assert sbx.commands.run("id -un").stdout == "root\n", "before /init the default user is root"

        init_ok(g, {"defaultUser": test_user.name, "defaultWorkdir": workdir})

        r = sbx.commands.run('id -un; pwd; echo "$HOME"')
        assert r.stdout == f"{test_user.name}\n{workdir}\n{test_user.home}\n"
        # An explicit user still wins.
        assert sbx.commands.run("id -un", user="root").stdout == "root\n"

        # Relative file paths resolve against the default user's home, not the workdir
        # (rpc.md §3.1), and new files belong to that user.
        info = sbx.files.write(rel, "relative")
        assert info.path == f"{test_user.home}/{rel}"
        st = os.stat(info.path)
        assert (st.st_uid, st.st_gid) == (test_user.uid, test_user.gid)
        assert sbx.files.read(rel) == "relative"
        assert sbx.files.get_info(rel).owner == test_user.name
        # Only an empty path means the workdir.
        assert [e.name for e in sbx.files.list("")] == ["in-workdir.txt"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(f"{test_user.home}/{rel}"):
            os.unlink(f"{test_user.home}/{rel}")


# ---------------------------------------------------------------------------------------------
# start command at boot


def start_cmd_entry(sbx):
    found = [p for p in sbx.commands.list() if p.tag == START_TAG]
    assert len(found) == 1, f"want one process tagged {START_TAG}; list: {sbx.commands.list()}"
    return found[0]


def test_start_cmd_output_is_replayed_to_a_late_connect_needs_root(spawn_guestd, sdk_env):
    name = marked("start-cmd")
    cmd = f"echo boot-line; echo boot-err >&2; printf 'second '; echo line; {sleeper('start-cmd', 120)}"
    g = spawn_guestd("--start-cmd", cmd, wrapper=fresh_boot())
    status = wait_ready(g)
    assert status["state"] == "ready", status
    sbx = sdk_sandbox(g.url)

    entry = start_cmd_entry(sbx)
    assert entry.cmd == "/bin/bash"
    assert entry.args == ["-l", "-c", cmd]
    assert status.get("pid") == entry.pid, f"/ready names the start command's pid: {status}"
    # The marked sleep exists only after every echo ran (exec keeps the pid): the output is
    # complete well before anyone connects.
    assert wait_until(lambda: any(p.pid == entry.pid for p in marked_procs(name)), 10), (
        f"start command pid {entry.pid} never became the marked sleep; {g.log_tail()}"
    )
    time.sleep(1.0)

    # By tag, with an independent Connect client: the whole output from the first byte.
    client = raw_process_client(g.url, "json", "identity")
    try:
        from e2b.envd.process import process_pb

        stream = client.connect(process_pb.ConnectRequest(process=by_tag(START_TAG)), timeout_ms=10_000)
        assert expect_start(stream) == entry.pid
        out, err = bytearray(), bytearray()
        for resp in stream:
            ev = resp.event.event
            if ev.field == "data":
                {"stdout": out, "stderr": err}[ev.value.output.field].extend(ev.value.output.value)
            if b"second line\n" in out and b"boot-err\n" in err:
                break
        stream.close()
        assert bytes(out) == b"boot-line\nsecond line\n"
        assert bytes(err) == b"boot-err\n"
    finally:
        client.close()

    # With the SDK, by pid (`commands.connect` takes a pid only).
    h = sbx.commands.connect(entry.pid)
    got = Collected(h)
    got.wait_for("second line\n")
    assert sbx.commands.kill(entry.pid) is True
    assert got.join(10), "the connect stream did not end after kill"
    assert isinstance(got.error, CommandExitException), repr(got.error)
    assert got.error.stdout == "boot-line\nsecond line\n"
    assert got.error.stderr == "boot-err\n"
    # (guestd's own command line carries the marker too: check the pid, not the marker)
    assert wait_until(lambda: not pid_running(entry.pid), 5), f"start command {entry.pid} survived kill"

    assert wait_until(lambda: ready(g)[1].get("state") == "exited", 10), ready(g)
    code, status = ready(g)
    assert code == 503, f"a start command killed by a signal is not ready: {status}"


def test_start_cmd_runs_once_per_boot_needs_root(spawn_guestd, sdk_env):
    out = f"/tmp/{marked('once')}.txt"
    try:
        g = spawn_guestd("--start-cmd", f"echo ran >> {out}", wrapper=fresh_boot())
        assert wait_until(lambda: ready(g)[1].get("state") == "exited", 10), ready(g)
        assert ready(g)[1].get("exit_code") == 0, ready(g)
        # Another /init (e.g. after a snapshot restore) does not run it again.
        init_ok(g, {"envVars": {"A": "b"}})
        time.sleep(1.0)
        with open(out) as f:
            assert f.read() == "ran\n"
    finally:
        if os.path.exists(out):
            os.unlink(out)


def test_start_after_init_gets_init_env_vars_needs_root(spawn_guestd, sdk_env):
    out = f"/tmp/{marked('secret')}.txt"
    cmd = f'echo "$SECRET" >> {out}; {sleeper("after-init", 120)}'
    try:
        g = spawn_guestd("--start-after-init", "--start-cmd", cmd, wrapper=fresh_boot())
        time.sleep(1.0)
        assert not os.path.exists(out), "the start command ran before /init"
        code, status = ready(g)
        assert (code, status["state"]) == (503, "waiting_for_init"), status
        sbx = sdk_sandbox(g.url)
        assert [p for p in sbx.commands.list() if p.tag == START_TAG] == []

        init_ok(g, {"envVars": {"SECRET": "s"}})
        assert wait_until(lambda: os.path.exists(out) and open(out).read() == "s\n", 10), (
            f"start command output file: {open(out).read() if os.path.exists(out) else 'missing'}; "
            f"{g.log_tail()}"
        )
        wait_ready(g)
        entry = start_cmd_entry(sbx)
        # A second /init neither reruns it nor changes what it saw.
        init_ok(g, {"envVars": {"SECRET": "t"}})
        time.sleep(0.5)
        with open(out) as f:
            assert f.read() == "s\n"
        assert start_cmd_entry(sbx).pid == entry.pid
        assert sbx.commands.kill(entry.pid) is True
        assert wait_until(lambda: not pid_running(entry.pid), 5), f"start command {entry.pid} survived kill"
    finally:
        if os.path.exists(out):
            os.unlink(out)


# ---------------------------------------------------------------------------------------------
# access token and signed URLs


TOKEN = f"tok-{RUN_ID}"


def with_query(url: str, **changes) -> str:
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    for k, v in changes.items():
        if v is None:
            q.pop(k, None)
        else:
            q[k] = v
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q, quote_via=urllib.parse.quote)))


def test_access_token_gates_the_sdk(spawn_guestd, sdk_env, tmp_path):
    g = spawn_guestd()
    f = tmp_path / "secret.txt"
    f.write_text("classified")
    init_ok(g, {"accessToken": TOKEN})

    plain = sdk_sandbox(g.url)  # what debug `Sandbox.create()` gives: no token
    assert plain.is_running() is True, "GET /health is exempt from the token"
    with pytest.raises(AuthenticationException):
        plain.commands.run("echo hi")
    with pytest.raises(AuthenticationException):
        plain.commands.list()
    with pytest.raises(AuthenticationException):
        plain.files.list(str(tmp_path))
    with pytest.raises(AuthenticationException):
        plain.files.read(str(f))
    with pytest.raises(AuthenticationException):
        plain.files.write(str(tmp_path / "nope.txt"), "x")
    assert not (tmp_path / "nope.txt").exists()

    wrong = sdk_sandbox(g.url, access_token="not-the-token")
    with pytest.raises(AuthenticationException):
        wrong.commands.run("echo hi")
    with pytest.raises(AuthenticationException):
        wrong.files.read(str(f))

    secured = sdk_sandbox(g.url, access_token=TOKEN)
    assert secured.commands.run("echo hi").stdout == "hi\n"
    assert secured.files.read(str(f)) == "classified"
    assert secured.files.write(str(tmp_path / "ok.txt"), "written").path == str(tmp_path / "ok.txt")
    assert (tmp_path / "ok.txt").read_text() == "written"
    assert [e.name for e in secured.files.list(str(tmp_path))] == ["ok.txt", "secret.txt"]
    h = secured.files.watch_dir(str(tmp_path))
    h.stop()


def test_signed_urls_from_the_sdk_work_with_plain_http(spawn_guestd, sdk_env, tmp_path):
    g = spawn_guestd()
    init_ok(g, {"accessToken": TOKEN})
    secured = sdk_sandbox(g.url, access_token=TOKEN)
    src = tmp_path / "down.bin"
    data = os.urandom(100_000)
    src.write_bytes(data)

    down = secured.download_url(str(src))
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(down).query))
    assert q["signature"].startswith("v1_") and "signature_expiration" not in q, down
    up = secured.upload_url(str(tmp_path / "up.bin"), use_signature_expiration=120)
    assert "signature_expiration=" in up
    with http() as c:
        r = c.get(down)
        assert r.status_code == 200, r.text
        assert r.content == data
        r = c.post(up, files={"file": ("up.bin", b"uploaded")})
        assert r.status_code == 200, r.text
        assert r.json()[0]["path"] == str(tmp_path / "up.bin")
        assert (tmp_path / "up.bin").read_bytes() == b"uploaded"

        # Without a signature, with a tampered one, for another path, for the other operation:
        # 401 with envd's JSON error (http.md §2.2).
        for bad in (
            with_query(down, signature=None),
            with_query(down, signature=q["signature"][:-2] + "AA"),
            with_query(down, path=str(tmp_path / "up.bin")),
        ):
            r = c.get(bad)
            assert r.status_code == 401, (bad, r.status_code, r.text)
            assert r.json()["code"] == 401
        r = c.post(down, files={"file": ("down.bin", b"overwrite")})
        assert r.status_code == 401, "a read signature must not allow a write"
        assert src.read_bytes() == data


def test_expired_signature_is_rejected(spawn_guestd, sdk_env, tmp_path):
    from e2b.sandbox.signature import get_signature

    g = spawn_guestd()
    init_ok(g, {"accessToken": TOKEN})
    secured = sdk_sandbox(g.url, access_token=TOKEN)
    f = tmp_path / "exp.txt"
    f.write_text("x")
    sig = get_signature(str(f), "read", None, TOKEN, -10)
    expired = secured._file_url(str(f), None, sig["signature"], sig["expiration"])
    fresh = secured.download_url(str(f), use_signature_expiration=60)
    with http() as c:
        r = c.get(expired)
        assert r.status_code == 401, r.text
        assert "expired" in r.json()["message"]
        assert c.get(fresh).status_code == 200
        # A later expiration pasted onto a signature made for another one: invalid.
        r = c.get(with_query(expired, signature_expiration=str(int(time.time()) + 3600)))
        assert r.status_code == 401


def test_signed_url_for_a_user_needs_root(spawn_guestd, sdk_env, test_user, tmp_path):
    g = spawn_guestd()
    init_ok(g, {"accessToken": TOKEN})
    secured = sdk_sandbox(g.url, access_token=TOKEN)
    p = tmp_path / "user-up.txt"
    up = secured.upload_url(str(p), user=test_user.name)
    with http() as c:
        r = c.post(up, files={"file": ("user-up.txt", b"mine")})
        assert r.status_code == 200, r.text
        assert os.stat(p).st_uid == test_user.uid
        # the username is signed: dropping it (→ default user root) breaks the signature
        r = c.post(with_query(up, username=None), files={"file": ("user-up.txt", b"root's")})
        assert r.status_code == 401
    assert p.read_bytes() == b"mine"
