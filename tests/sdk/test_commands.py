"""`sandbox.commands` through the real E2B SDK (e2b==2.63.0, debug mode) against guestd.

Each test asserts what a user of the SDK relies on: the bytes of stdout/stderr, exit codes, the
exception types the SDK raises, and that processes really start, stop and disappear.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading

import pytest
from e2b import (
    CommandExitException,
    InvalidArgumentException,
    TimeoutException,
)

from conftest import LEAK_VAR, running_as_root
from helpers import (
    MARK,
    expect_start,
    marked,
    marked_procs,
    pid_running,
    raw_process_client,
    sleeper,
    start_request,
    wait_gone,
    wait_until,
)

# ---------------------------------------------------------------------------------------------
# foreground / background basics


def test_run_foreground_returns_stdout_stderr_and_exit_code(sandbox):
    r = sandbox.commands.run("echo out-1; echo err-1 >&2; printf 'no newline'")
    assert r.exit_code == 0
    assert r.stdout == "out-1\nno newline"
    assert r.stderr == "err-1\n"
    assert r.error is None


def test_run_is_bash_login_shell_command_line(sandbox):
    # The SDK sends cmd=/bin/bash args=[-l, -c, <cmd>]: pipes, expansions, exit status of the
    # last command all behave as in bash.
    r = sandbox.commands.run('set -o pipefail; x=$(( 6 * 7 )); echo "$x" | tr 4 X; [[ $- == *c* ]] || echo "no -c"')
    assert r.stdout == "X2\n"


def test_non_zero_exit_raises_command_exit_exception(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; echo boom >&2; exit 3")
    e = info.value
    assert e.exit_code == 3
    assert e.stdout == "partial\n"
    assert e.stderr == "boom\n"
    assert e.error == "exit status 3"


def test_command_killed_by_signal_reports_it(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo last; kill -TERM $$")
    assert info.value.exit_code == -1
    assert info.value.error == "signal: terminated"
    assert info.value.stdout == "last\n"


def test_concurrent_commands_keep_their_output_apart(sandbox):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int):
        return sandbox.commands.run(f"for k in 1 2 3; do echo {i}-$k; sleep 0.05; done; exit 0").stdout

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [f"{i}-1\n{i}-2\n{i}-3\n" for i in range(32)]


def test_unknown_command_is_exit_127_not_an_rpc_error(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("no-such-command-guestd-sdk")
    assert info.value.exit_code == 127
    assert "no-such-command-guestd-sdk" in info.value.stderr


def test_background_run_returns_handle_and_wait_collects_output(sandbox):
    h = sandbox.commands.run("echo first; sleep 0.3; echo second >&2; echo third", background=True)
    assert isinstance(h.pid, int) and h.pid > 0
    r = h.wait()
    assert r.exit_code == 0
    assert r.stdout == "first\nthird\n"
    assert r.stderr == "second\n"


def test_background_handle_reports_the_pid_of_the_running_command(sandbox):
    h = sandbox.commands.run(sleeper("pid"), background=True)
    try:
        # `exec` keeps the pid: the process the SDK was told about is the marked sleep itself.
        assert wait_until(lambda: any(p.pid == h.pid for p in marked_procs(marked("pid"))), 5), (
            f"pid {h.pid} from the start event is not the running command; "
            f"marked: {marked_procs(marked('pid'))}"
        )
    finally:
        sandbox.commands.kill(h.pid)
    assert not wait_gone(marked("pid"))


def test_on_stdout_and_on_stderr_callbacks_see_every_chunk(sandbox):
    out, err = [], []
    r = sandbox.commands.run(
        "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.05; done",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == "o1\no2\no3\n" == r.stdout
    assert "".join(err) == "e1\ne2\ne3\n" == r.stderr


def test_callbacks_on_background_wait(sandbox):
    out = []
    h = sandbox.commands.run("echo a; sleep 0.2; echo b", background=True)
    h.wait(on_stdout=out.append)
    assert "".join(out) == "a\nb\n"


def test_output_is_streamed_before_exit(sandbox):
    """stdout reaches the SDK while the command still runs (no buffering until exit)."""
    seen = threading.Event()
    release = f"/tmp/{marked('stream-release')}"

    def on_stdout(chunk: str) -> None:
        if "ready" in chunk:
            seen.set()
            open(release, "w").close()

    try:
        r = sandbox.commands.run(
            f"echo ready; for i in $(seq 100); do [ -e {release} ] && exit 0; sleep 0.1; done; exit 9",
            on_stdout=on_stdout,
        )
        assert seen.is_set()
        assert r.exit_code == 0
    finally:
        if os.path.exists(release):
            os.unlink(release)


# ---------------------------------------------------------------------------------------------
# environment, cwd, users


def test_envs_are_passed_to_the_command(sandbox):
    r = sandbox.commands.run(
        'printf "%s|%s|%s" "$FOO" "$BAR" "$EMPTY-set"',
        envs={"FOO": "with space", "BAR": "ünïcode=€", "EMPTY": ""},
    )
    assert r.stdout == "with space|ünïcode=€|-set"


def test_command_env_is_built_explicitly_not_inherited_from_guestd(sandbox):
    r = sandbox.commands.run("env")
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert LEAK_VAR not in env, "guestd's own environment leaked into a command"
    for key in ("PATH", "HOME", "USER"):
        assert env.get(key), f"{key} missing from the command environment: {env}"


def test_cwd_sets_the_working_directory(sandbox, tmp_path):
    d = tmp_path / "work dir"
    d.mkdir()
    r = sandbox.commands.run("pwd", cwd=str(d))
    assert r.stdout == f"{d}\n"


def test_envs_override_the_defaults(sandbox):
    r = sandbox.commands.run('echo "$HOME|$USER"', envs={"HOME": "/custom-home", "USER": "someone"})
    assert r.stdout == "/custom-home|someone\n"


def test_cwd_that_is_a_file_is_invalid_argument(sandbox, tmp_path):
    f = tmp_path / "plain-file"
    f.write_text("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("pwd", cwd=str(f))


def test_unknown_user_is_authentication_error(sandbox):
    from e2b import AuthenticationException

    with pytest.raises(AuthenticationException):
        sandbox.commands.run("id", user=f"nouser{MARK[-6:]}")


def test_missing_cwd_is_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("pwd", cwd=f"/nonexistent/{MARK}")


def test_default_user_is_root_when_guestd_runs_as_root(sandbox):
    if not running_as_root():
        pytest.skip("guestd defaults to the user running it; this run is not root")
    r = sandbox.commands.run('id -un; echo "$HOME"; pwd')
    assert r.stdout == "root\n/root\n/root\n"


def test_user_root(sandbox):
    r = sandbox.commands.run('id -u; id -un; echo "$HOME $USER"', user="root")
    assert r.stdout == "0\nroot\n/root root\n"


def test_created_user_needs_root(sandbox, test_user):
    """A user made with useradd: uid, primary + supplementary groups, HOME, default cwd."""
    r = sandbox.commands.run(
        'id -un; id -u; id -g; id -G; echo "$HOME"; echo "$USER"; pwd; touch "$HOME/owned"; stat -c %U "$HOME/owned"',
        user=test_user.name,
    )
    lines = r.stdout.splitlines()
    assert lines[0] == test_user.name
    assert int(lines[1]) == test_user.uid
    assert int(lines[2]) == test_user.gid
    assert set(map(int, lines[3].split())) == {test_user.gid, test_user.group_gid}, (
        f"id -G = {lines[3]!r}; want the primary gid {test_user.gid} and the supplementary "
        f"group {test_user.group} ({test_user.group_gid})"
    )
    assert lines[4] == test_user.home
    assert lines[5] == test_user.name
    assert lines[6] == test_user.home, "default cwd is the user's home"
    assert lines[7] == test_user.name


def test_relative_and_tilde_cwd_resolve_against_the_users_home_needs_root(sandbox, test_user):
    sub = os.path.join(test_user.home, "sub dir")
    os.makedirs(sub, exist_ok=True)
    assert sandbox.commands.run("pwd", user=test_user.name, cwd="sub dir").stdout == f"{sub}\n"
    assert sandbox.commands.run("pwd", user=test_user.name, cwd="~/sub dir").stdout == f"{sub}\n"


def test_created_user_cannot_act_as_root_needs_root(sandbox, test_user):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("cat /etc/shadow", user=test_user.name)
    assert info.value.exit_code == 1
    assert "Permission denied" in info.value.stderr


def test_sudo_from_created_user_needs_root(sandbox, test_user):
    if shutil.which("sudo") is None:
        pytest.skip("sudo is not installed on this machine (apt-get install sudo to run this check)")
    rule = f"/etc/sudoers.d/{test_user.name}"
    with open(rule, "w") as f:
        f.write(f"{test_user.name} ALL=(ALL) NOPASSWD:ALL\n")
    os.chmod(rule, 0o440)
    try:
        r = sandbox.commands.run("sudo -n id -u", user=test_user.name)
        assert r.stdout == "0\n"
    finally:
        os.unlink(rule)


# ---------------------------------------------------------------------------------------------
# timeout, kill


def test_timeout_raises_timeout_exception_and_kills_the_process(sandbox):
    name = marked("timeout")
    with pytest.raises(TimeoutException):
        sandbox.commands.run(sleeper("timeout", 60), timeout=2)
    left = wait_gone(name, timeout=5)
    assert not left, f"the timed-out command still runs: {left}"


def test_background_timeout_kills_the_process(sandbox):
    h = sandbox.commands.run(sleeper("bg-timeout", 60), background=True, timeout=2)
    with pytest.raises(TimeoutException):
        h.wait()
    assert wait_until(lambda: not pid_running(h.pid), 5), f"pid {h.pid} survived its timeout"
    assert h.pid not in [p.pid for p in sandbox.commands.list()]


def test_kill_returns_true_and_ends_the_command(sandbox):
    h = sandbox.commands.run(sleeper("kill"), background=True)
    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as info:
        h.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"
    assert not wait_gone(marked("kill"))
    assert h.pid not in [p.pid for p in sandbox.commands.list()]


def test_handle_kill(sandbox):
    h = sandbox.commands.run(sleeper("handle-kill"), background=True)
    assert h.kill() is True
    with pytest.raises(CommandExitException):
        h.wait()
    assert not wait_gone(marked("handle-kill"))


def test_kill_unknown_pid_returns_false(sandbox):
    assert sandbox.commands.kill(99_999_999) is False


def test_kill_after_exit_returns_false(sandbox):
    h = sandbox.commands.run("true", background=True)
    h.wait()
    assert sandbox.commands.kill(h.pid) is False


# ---------------------------------------------------------------------------------------------
# stdin


def test_send_stdin_and_close_stdin(sandbox):
    h = sandbox.commands.run("cat; echo '<eof>'", background=True, stdin=True)
    h.send_stdin("hello\n")
    sandbox.commands.send_stdin(h.pid, b"bytes \xc3\xa9\n")
    h.send_stdin("no newline")
    h.close_stdin()
    r = h.wait()
    assert r.stdout == "hello\nbytes é\nno newline<eof>\n"


def test_stdin_is_closed_by_default(sandbox):
    # stdin=False (the SDK default) means /dev/null: cat sees EOF at once.
    r = sandbox.commands.run("cat; echo done", timeout=10)
    assert r.stdout == "done\n"


def test_close_stdin_is_idempotent(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    h.close_stdin()
    h.close_stdin()
    assert h.wait().exit_code == 0


@pytest.mark.timeout(300)
def test_large_stdin_arrives_intact(sandbox):
    one_call = os.urandom(1024 * 1024)
    streamed = [os.urandom(256 * 1024) for _ in range(16)]
    expected = hashlib.sha256(one_call + b"".join(streamed)).hexdigest()
    h = sandbox.commands.run("sha256sum", background=True, stdin=True, timeout=240)
    h.send_stdin(one_call)
    sandbox.commands.stream_input(h.pid, iter(streamed))
    h.close_stdin()
    assert h.wait().stdout == f"{expected}  -\n"


def test_stream_input_client_stream(sandbox):
    """`commands.stream_input` is the SDK's client-streaming RPC (Process.StreamInput)."""
    h = sandbox.commands.run("cat; echo '<eof>'", background=True, stdin=True)
    sandbox.commands.stream_input(h.pid, ["chunk-1 ", b"chunk-2 ", "chunk-3\n"])
    h.close_stdin()
    assert h.wait().stdout == "chunk-1 chunk-2 chunk-3\n<eof>\n"


# ---------------------------------------------------------------------------------------------
# list, connect


def test_list_shows_running_command_with_its_config(sandbox):
    cmd = sleeper("list")
    h = sandbox.commands.run(cmd, background=True, envs={"LISTED": "yes"}, cwd="/tmp")
    try:
        found = [p for p in sandbox.commands.list() if p.pid == h.pid]
        assert len(found) == 1, f"pid {h.pid} not listed"
        p = found[0]
        assert p.cmd == "/bin/bash"
        assert p.args == ["-l", "-c", cmd]
        assert p.envs == {"LISTED": "yes"}
        assert p.cwd == "/tmp"
        assert p.tag is None
    finally:
        sandbox.commands.kill(h.pid)
    with pytest.raises(CommandExitException):
        h.wait()
    assert h.pid not in [p.pid for p in sandbox.commands.list()], "an exited command is still listed"


def test_list_shows_tag_of_command_started_by_another_client(sandbox, guestd):
    # The SDK cannot tag commands; another Connect client (here: connectrpc) can, and the SDK's
    # list must show the tag.
    client = raw_process_client(guestd.url, "json", "identity")
    tag = marked("sdk-list-tag")
    stream = client.start(
        start_request("/bin/bash", ["-l", "-c", sleeper("sdk-list-tag")], tag=tag), timeout_ms=30_000
    )
    pid = expect_start(stream)
    try:
        listed = {p.pid: p for p in sandbox.commands.list()}
        assert listed[pid].tag == tag
        assert listed[pid].args == ["-l", "-c", sleeper("sdk-list-tag")]
    finally:
        assert sandbox.commands.kill(pid) is True
        stream.close()
        client.close()
    assert not wait_gone(marked("sdk-list-tag"))


def test_connect_to_running_command_gets_later_output_and_end(sandbox):
    h = sandbox.commands.run(
        "echo before; read line; echo \"got $line\"; echo bye >&2; exit 4", background=True, stdin=True
    )
    # Read until "before" came through the Start stream, then leave it (the SDK closes the HTTP
    # connection); the command must keep running.
    for stdout, _, _ in h:
        if stdout and "before" in stdout:
            break
    h.disconnect()
    assert pid_running(h.pid), "disconnecting the Start stream killed the command"

    h2 = sandbox.commands.connect(h.pid)
    assert h2.pid == h.pid
    sandbox.commands.send_stdin(h.pid, "x\n")
    with pytest.raises(CommandExitException) as info:
        h2.wait()
    assert info.value.exit_code == 4
    # rpc.md §4.3: Connect streams the output produced after it attached; nothing is replayed.
    assert info.value.stdout == "got x\n"
    assert info.value.stderr == "bye\n"


def test_two_subscribers_both_get_output(sandbox):
    h = sandbox.commands.run("read line; echo \"$line\"", background=True, stdin=True)
    h2 = sandbox.commands.connect(h.pid)
    h.send_stdin("shared\n")
    assert h2.wait().stdout == "shared\n"
    assert h.wait().stdout == "shared\n"


def test_connect_to_just_exited_command_returns_its_end(sandbox):
    h = sandbox.commands.run("exit 5", background=True)
    with pytest.raises(CommandExitException):
        h.wait()
    # envd keeps the end event of an exited process for 30 s.
    h2 = sandbox.commands.connect(h.pid)
    with pytest.raises(CommandExitException) as info:
        h2.wait()
    assert info.value.exit_code == 5


def test_connect_unknown_pid_raises_not_found(sandbox):
    from e2b import NotFoundException

    with pytest.raises(NotFoundException):
        sandbox.commands.connect(99_999_999)


# ---------------------------------------------------------------------------------------------
# volume


@pytest.mark.timeout(300)
def test_20_mb_of_output_arrives_intact(sandbox, tmp_path):
    # Random base64 text with multi-byte UTF-8 characters sprinkled in, so any chunk boundary
    # that splits a character, any dropped, duplicated or reordered chunk shows in the hash.
    raw = __import__("base64").b64encode(os.urandom(15 * 1024 * 1024))
    data = raw.replace(b"A", "é".encode()).replace(b"B", "€".encode()).replace(b"C", "😀".encode())
    assert len(data) >= 20 * 1024 * 1024
    src = tmp_path / "big.txt"
    src.write_bytes(data)
    chunks = []
    r = sandbox.commands.run(f"cat {src}", on_stdout=chunks.append, timeout=240)
    got = r.stdout.encode()
    assert len(got) == len(data), f"got {len(got)} bytes, want {len(data)}"
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert "".join(chunks) == r.stdout
    assert len(chunks) > 1, "20 MB arrived as one chunk: output is not streamed"


@pytest.mark.timeout(300)
def test_20_mb_of_stderr_and_stdout_interleaved(sandbox):
    # Both pipes busy at once: neither may stall the other.
    r = sandbox.commands.run(
        "head -c 10485760 /dev/zero | tr '\\0' o & head -c 10485760 /dev/zero | tr '\\0' e >&2; wait",
        timeout=240,
    )
    assert r.stdout == "o" * 10485760
    assert r.stderr == "e" * 10485760
