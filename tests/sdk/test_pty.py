"""`sandbox.pty` through the real E2B SDK against guestd: an interactive bash on a terminal.

The SDK starts `/bin/bash -i -l` with a PTY of the requested size and TERM/LANG defaults; input
goes through SendInput(pty=...), resizing through Update, output arrives as `pty` data events.
"""

from __future__ import annotations

import pytest
from e2b import CommandExitException, PtySize

from helpers import PtyCollector, pid_running, wait_until


@pytest.fixture
def pty(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    collector = PtyCollector(handle)
    yield collector
    if pid_running(handle.pid):
        sandbox.pty.kill(handle.pid)
    collector.join(10)


def send(sandbox, collector: PtyCollector, line: str) -> None:
    sandbox.pty.send_stdin(collector.handle.pid, line.encode())


def test_pty_runs_input_and_shows_output(sandbox, pty):
    send(sandbox, pty, "echo hi-$((6 * 7))\n")
    # "hi-42" is only in the command's output, never in the echoed input line.
    pty.wait_for(b"hi-42")


def test_pty_is_a_terminal_with_sdk_environment(sandbox, pty):
    send(sandbox, pty, 'tty -s && echo "is-tty:$TERM:$LANG"\n')
    pty.wait_for(b"is-tty:xterm-256color:C.UTF-8")


def test_pty_initial_size_and_resize(sandbox, pty):
    send(sandbox, pty, "echo size-$(stty size | tr ' ' x)\n")
    pty.wait_for(b"size-24x80")
    sandbox.pty.resize(pty.handle.pid, PtySize(rows=40, cols=100))
    send(sandbox, pty, "echo size-$(stty size | tr ' ' x)\n")
    pty.wait_for(b"size-40x100")


def test_pty_line_discipline_translates_newlines(sandbox, pty):
    send(sandbox, pty, "printf 'a\\nb\\n'; echo end-$((1+1))\n")
    end = pty.wait_for(b"end-2")
    assert b"a\r\nb\r\n" in pty.output[:end], "ONLCR: a terminal turns \\n into \\r\\n"


def test_pty_exit_ends_the_stream_with_exit_code(sandbox, pty):
    send(sandbox, pty, "exit 7\n")
    assert pty.join(10), "the PTY stream did not end after the shell exited"
    assert isinstance(pty.error, CommandExitException), f"got {pty.error!r}"
    assert pty.error.exit_code == 7


def test_pty_kill(sandbox, pty):
    pid = pty.handle.pid
    send(sandbox, pty, "echo ready-$((2+3))\n")
    pty.wait_for(b"ready-5")
    assert sandbox.pty.kill(pid) is True
    assert pty.join(10), "the PTY stream did not end after kill"
    assert isinstance(pty.error, CommandExitException), f"got {pty.error!r}"
    assert pty.error.exit_code == -1
    assert wait_until(lambda: not pid_running(pid), 5), f"PTY shell {pid} still runs after kill"
    assert pid not in [p.pid for p in sandbox.commands.list()]
    assert sandbox.pty.kill(pid) is False


def test_pty_connect_gets_later_output(sandbox, pty):
    other = sandbox.pty.connect(pty.handle.pid)
    second = PtyCollector(other)
    send(sandbox, pty, "echo both-$((3*3))\n")
    pty.wait_for(b"both-9")
    second.wait_for(b"both-9")


def test_pty_listed(sandbox, pty):
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert pty.handle.pid in listed
    p = listed[pty.handle.pid]
    assert (p.cmd, p.args) == ("/bin/bash", ["-i", "-l"])
    assert p.envs.get("TERM") == "xterm-256color"
