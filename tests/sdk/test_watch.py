"""`files.watch_dir` through the real E2B SDK (e2b==2.63.0, debug mode) against guestd.

Two transports, one behaviour (rpc.md §5.6–5.7):
* `Sandbox.files.watch_dir` polls: CreateWatcher, GetWatcherEvents on `get_new_events()`,
  RemoveWatcher on `stop()` (all unary);
* `AsyncSandbox.files.watch_dir` streams WatchDir and calls `on_event` per event.

What users rely on: one event per operation with envd's types (a rename is RENAME(old) +
CREATE(new)), names relative to the watched directory, recursive watches that also see what
`mkdir -p` created before its watches could land, `include_entry`, and errors for what cannot
be watched. The file operations run on this machine (guestd watches the same filesystem), so
each test knows exactly which inotify events it caused. To prove that something did *not*
produce an event, a test creates a sentinel file last and waits for its CREATE: events arrive
in order, so anything unexpected would have come before it.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from typing import Callable

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import (
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
)
from e2b.envd.filesystem import filesystem_pb

from helpers import RUN_ID, raw_filesystem_client

CREATE = FilesystemEventType.CREATE
WRITE = FilesystemEventType.WRITE
REMOVE = FilesystemEventType.REMOVE
RENAME = FilesystemEventType.RENAME
CHMOD = FilesystemEventType.CHMOD

EVENT_TIMEOUT_S = 10.0


def pairs(events: list[FilesystemEvent]) -> list[tuple[FilesystemEventType, str]]:
    return [(e.type, e.name) for e in events]


def poll_until(handle, done: Callable[[list[FilesystemEvent]], bool], timeout: float = EVENT_TIMEOUT_S):
    """Polls `handle.get_new_events()` until `done(all events so far)`; returns them all."""
    events: list[FilesystemEvent] = []
    deadline = time.monotonic() + timeout
    while True:
        events.extend(handle.get_new_events())
        if done(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; events so far: {pairs(events)}")
        time.sleep(0.05)


def until_event(kind: FilesystemEventType, name: str) -> Callable[[list[FilesystemEvent]], bool]:
    return lambda events: any(e.type == kind and e.name == name for e in events)


def touch_sentinel(d, name: str = "zz-sentinel") -> str:
    with open(os.path.join(d, name), "x"):
        pass
    return name


def up_to_sentinel(events: list[FilesystemEvent], sentinel: str) -> list[FilesystemEvent]:
    """Events before the sentinel's CREATE (the sentinel's own events excluded)."""
    for i, e in enumerate(events):
        if e.name == sentinel and e.type == CREATE:
            return events[:i]
    raise AssertionError(f"no CREATE {sentinel} in {pairs(events)}")


def poll_to_sentinel(h, d) -> list[FilesystemEvent]:
    """Creates a sentinel file in `d`, polls `h` until its CREATE and returns the events before it:
    everything the test's own operations caused, in order."""
    sentinel = touch_sentinel(d)
    return up_to_sentinel(poll_until(h, until_event(CREATE, sentinel)), sentinel)


@pytest.fixture
def watched(tmp_path):
    d = tmp_path / "watched"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------------------------
# sync (polling watcher)


def test_sync_watch_reports_each_operation_in_order(sandbox, watched):
    h = sandbox.files.watch_dir(str(watched))
    try:
        with open(watched / "f.txt", "w") as f:  # IN_CREATE, then one write(2): IN_MODIFY
            f.write("x")
        os.rename(watched / "f.txt", watched / "g.txt")
        os.chmod(watched / "g.txt", 0o600)
        os.remove(watched / "g.txt")
        os.mkdir(watched / "sub")
        with open(watched / "sub" / "inner", "w") as f:  # not watched: non-recursive
            f.write("y")
        events = poll_to_sentinel(h, watched)
    finally:
        h.stop()
    assert pairs(events) == [
        (CREATE, "f.txt"),
        (WRITE, "f.txt"),
        (RENAME, "f.txt"),
        (CREATE, "g.txt"),
        (CHMOD, "g.txt"),
        (REMOVE, "g.txt"),
        (CREATE, "sub"),
    ]
    assert all(e.entry is None for e in events), "no include_entry → no entries"


def test_sync_get_new_events_returns_each_event_once(sandbox, watched):
    h = sandbox.files.watch_dir(str(watched))
    try:
        touch_sentinel(watched, "first")
        first = poll_until(h, until_event(CREATE, "first"))
        touch_sentinel(watched, "second")
        second = poll_until(h, until_event(CREATE, "second"))
        assert h.get_new_events() == []
    finally:
        h.stop()
    assert pairs(first) == [(CREATE, "first")]
    assert pairs(second) == [(CREATE, "second")]


def test_sync_watch_sees_sdk_write_of_a_new_file_as_create_chmod_write(sandbox, watched):
    """Mirrors the E2B SDK's own test_watch_directory_changes (tests/sync/sandbox_sync/files/
    test_watch.py): `files.write` of a new file in a watched directory yields exactly
    CREATE, CHMOD, WRITE, all named after that file. envd writes in place (http.md §4.6):
    open O_CREAT (IN_CREATE), fchown to the user (IN_ATTRIB), copy (IN_MODIFY)."""
    h = sandbox.files.watch_dir(str(watched))
    try:
        sandbox.files.write(str(watched / "test_watch.txt"), "This file will be watched.")
        events = poll_to_sentinel(h, watched)
    finally:
        h.stop()
    assert pairs(events) == [
        (CREATE, "test_watch.txt"),
        (CHMOD, "test_watch.txt"),
        (WRITE, "test_watch.txt"),
    ]


def test_sync_watch_sees_sdk_overwrite_as_write_of_that_file(sandbox, watched):
    """E2B's test_watch_iterated: after `files.write` over a watched file, a WRITE event named
    after it arrives; an upload produces events for the file it writes and nothing else."""
    sandbox.files.write(str(watched / "w.txt"), "This file will be watched.")
    h = sandbox.files.watch_dir(str(watched))
    try:
        sandbox.files.write(str(watched / "w.txt"), "This file has been modified.")
        sandbox.files.write(str(watched / "w.txt"), io.BytesIO(b"streamed over it"))
        events = poll_to_sentinel(h, watched)
    finally:
        h.stop()
    assert (WRITE, "w.txt") in pairs(events), f"no WRITE w.txt for an overwrite; events: {pairs(events)}"
    assert {e.name for e in events} == {"w.txt"}, (
        f"an upload must only produce events for the file it writes; events: {pairs(events)}"
    )


def test_sync_recursive_watch_sees_mkdir_p_contents(sandbox, watched):
    # rpc.md §5.6: directories created later are watched too, and what was created inside them
    # before their watch landed is reported as CREATE (each once, parents first).
    h = sandbox.files.watch_dir(str(watched), recursive=True)
    try:
        sandbox.commands.run("mkdir -p a/b/c && touch a/b/c/f", cwd=str(watched))
        events = poll_until(h, until_event(CREATE, "a/b/c/f"))
        events += poll_to_sentinel(h, watched)
    finally:
        h.stop()
    creates = [e.name for e in events if e.type == CREATE]
    assert creates == ["a", "a/b", "a/b/c", "a/b/c/f"], f"events: {pairs(events)}"
    assert {e.name for e in events} <= {"a", "a/b", "a/b/c", "a/b/c/f"}, f"events: {pairs(events)}"


def test_sync_recursive_watch_names_are_relative_to_the_root(sandbox, watched):
    (watched / "a" / "b" / "c").mkdir(parents=True)
    h = sandbox.files.watch_dir(str(watched), recursive=True)
    try:
        with open(watched / "a" / "b" / "c" / "f", "w") as f:
            f.write("1")
        os.rename(watched / "a" / "b" / "c" / "f", watched / "a" / "b" / "g")
        os.remove(watched / "a" / "b" / "g")
        events = poll_to_sentinel(h, watched)
    finally:
        h.stop()
    assert pairs(events) == [
        (CREATE, "a/b/c/f"),
        (WRITE, "a/b/c/f"),
        (RENAME, "a/b/c/f"),
        (CREATE, "a/b/g"),
        (REMOVE, "a/b/g"),
    ]


def test_sync_recursive_watch_follows_renamed_directories(sandbox, watched):
    (watched / "a" / "b" / "c").mkdir(parents=True)
    h = sandbox.files.watch_dir(str(watched), recursive=True)
    try:
        os.rename(watched / "a" / "b", watched / "a" / "z")
        events = poll_until(h, until_event(CREATE, "a/z"))
        with open(watched / "a" / "z" / "c" / "new", "w"):
            pass
        events += poll_until(h, until_event(CREATE, "a/z/c/new"))
        events += poll_to_sentinel(h, watched)
    finally:
        h.stop()
    assert pairs(events)[:2] == [(RENAME, "a/b"), (CREATE, "a/z")], f"events: {pairs(events)}"
    assert not [e for e in events if e.name.startswith("a/b/")], (
        f"events under the directory's old name after the rename: {pairs(events)}"
    )


def test_sync_watch_include_entry(sandbox, watched):
    h = sandbox.files.watch_dir(str(watched), include_entry=True)
    try:
        with open(watched / "e.txt", "w") as f:
            f.write("12345")
        events = poll_until(h, until_event(WRITE, "e.txt"))
        os.remove(watched / "e.txt")
        events += poll_until(h, until_event(REMOVE, "e.txt"))
    finally:
        h.stop()
    by_type = {e.type: e for e in events}
    for kind in (CREATE, WRITE):
        entry = by_type[kind].entry
        assert entry is not None, f"{kind} without entry: {events}"
        assert entry.name == "e.txt"
        assert entry.type == FileType.FILE
        assert entry.path == str(watched / "e.txt")
    assert by_type[WRITE].entry.size == 5
    assert by_type[REMOVE].entry is None


def test_sync_two_watchers_of_one_directory_are_independent(sandbox, watched):
    h1 = sandbox.files.watch_dir(str(watched))
    h2 = sandbox.files.watch_dir(str(watched), recursive=True)
    try:
        touch_sentinel(watched, "both")
        e1 = poll_until(h1, until_event(CREATE, "both"))
        e2 = poll_until(h2, until_event(CREATE, "both"))
        h1.stop()
        touch_sentinel(watched, "only-two")
        e2 += poll_until(h2, until_event(CREATE, "only-two"))
    finally:
        h2.stop()
    assert pairs(e1) == [(CREATE, "both")]
    assert pairs(e2) == [(CREATE, "both"), (CREATE, "only-two")]


def test_sync_stop_removes_the_watcher_on_the_server(sandbox, guestd, watched):
    h = sandbox.files.watch_dir(str(watched))
    watcher_id = h._watcher_id
    h.stop()
    with pytest.raises(SandboxException):
        h.get_new_events()  # client-side: the handle knows it is stopped
    client = raw_filesystem_client(guestd.url)
    try:
        with pytest.raises(ConnectError) as info:
            client.get_watcher_events(filesystem_pb.GetWatcherEventsRequest(watcher_id=watcher_id))
        assert info.value.code == Code.NOT_FOUND
        with pytest.raises(ConnectError) as info:
            client.remove_watcher(filesystem_pb.RemoveWatcherRequest(watcher_id=watcher_id))
        assert info.value.code == Code.NOT_FOUND
    finally:
        client.close()


def test_sync_watch_relative_path_resolves_against_home(sandbox):
    home = os.path.expanduser("~")
    name = f"gsdk-watch-{RUN_ID}"
    os.makedirs(os.path.join(home, name), exist_ok=True)
    try:
        h = sandbox.files.watch_dir(name)
        try:
            touch_sentinel(os.path.join(home, name), "rel")
            assert pairs(poll_until(h, until_event(CREATE, "rel"))) == [(CREATE, "rel")]
        finally:
            h.stop()
    finally:
        sandbox.files.remove(os.path.join(home, name))


def test_sync_watch_regular_file_fails(sandbox, tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(SandboxException) as info:
        sandbox.files.watch_dir(str(tmp_path / "plain.txt"))
    # rpc.md §5.6: invalid_argument "path ... not a directory"
    assert isinstance(info.value, InvalidArgumentException), repr(info.value)


def test_sync_watch_missing_directory_is_not_found(sandbox, tmp_path):
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(str(tmp_path / "missing"), recursive=True)


# ---------------------------------------------------------------------------------------------
# async (WatchDir stream)


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def async_sandbox():
    from e2b import AsyncSandbox

    # The `sandbox` fixture set E2B_DEBUG and E2B_SANDBOX_URL for the session guestd.
    sbx = await AsyncSandbox.create()
    assert sbx.sandbox_id == "debug_sandbox_id"
    return sbx


async def wait_events(events: list, done: Callable[[list], bool], timeout: float = EVENT_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not done(events):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; events so far: {pairs(events)}")
        await asyncio.sleep(0.02)
    return list(events)


async def stream_to_sentinel(events: list, d) -> list[FilesystemEvent]:
    """`poll_to_sentinel` for a streaming watcher appending to `events`."""
    sentinel = touch_sentinel(d)
    return up_to_sentinel(await wait_events(events, until_event(CREATE, sentinel)), sentinel)


def test_async_watch_streams_each_operation_in_order(sandbox, watched):
    async def main():
        sbx = await async_sandbox()
        events, exits = [], []
        h = await sbx.files.watch_dir(str(watched), on_event=events.append, on_exit=exits.append)
        try:
            with open(watched / "f.txt", "w") as f:
                f.write("x")
            os.rename(watched / "f.txt", watched / "g.txt")
            os.chmod(watched / "g.txt", 0o600)
            os.remove(watched / "g.txt")
            os.mkdir(watched / "sub")
            with open(watched / "sub" / "inner", "w") as f:
                f.write("y")
            got = await stream_to_sentinel(events, watched)
        finally:
            await h.stop()
        assert pairs(got) == [
            (CREATE, "f.txt"),
            (WRITE, "f.txt"),
            (RENAME, "f.txt"),
            (CREATE, "g.txt"),
            (CHMOD, "g.txt"),
            (REMOVE, "g.txt"),
            (CREATE, "sub"),
        ]
        assert exits == [None], f"on_exit after stop(): {exits}"

    run_async(main())


def test_async_recursive_watch_sees_mkdir_p_contents(sandbox, watched):
    async def main():
        sbx = await async_sandbox()
        events = []
        h = await sbx.files.watch_dir(str(watched), on_event=events.append, recursive=True)
        try:
            await sbx.commands.run("mkdir -p a/b/c && touch a/b/c/f", cwd=str(watched))
            await wait_events(events, until_event(CREATE, "a/b/c/f"))
            got = await stream_to_sentinel(events, watched)
        finally:
            await h.stop()
        creates = [e.name for e in got if e.type == CREATE]
        assert creates == ["a", "a/b", "a/b/c", "a/b/c/f"], f"events: {pairs(got)}"

    run_async(main())


def test_async_watch_sees_sdk_write_of_nested_file(sandbox, watched):
    """E2B's async test_watch_recursive_directory_changes: writing `nested/file` through the SDK
    yields a WRITE event named `nested/file`."""

    async def main():
        sbx = await async_sandbox()
        await sbx.files.make_dir(str(watched / "nested"))
        events = []
        h = await sbx.files.watch_dir(str(watched), on_event=events.append, recursive=True)
        try:
            await sbx.files.write(str(watched / "nested" / "w.txt"), "This file will be watched.")
            got = await stream_to_sentinel(events, watched)
        finally:
            await h.stop()
        assert (WRITE, "nested/w.txt") in pairs(got), f"events: {pairs(got)}"
        assert {e.name for e in got} == {"nested/w.txt"}, f"events: {pairs(got)}"

    run_async(main())


def test_async_watch_include_entry(sandbox, watched):
    async def main():
        sbx = await async_sandbox()
        events = []
        h = await sbx.files.watch_dir(str(watched), on_event=events.append, include_entry=True)
        try:
            os.mkdir(watched / "d")
            got = await wait_events(events, until_event(CREATE, "d"))
        finally:
            await h.stop()
        entry = got[0].entry
        assert entry is not None
        assert (entry.name, entry.type, entry.path) == ("d", FileType.DIR, str(watched / "d"))

    run_async(main())


def test_async_stop_ends_the_stream_and_later_events_are_not_delivered(sandbox, watched):
    async def main():
        sbx = await async_sandbox()
        events, exits = [], []
        h = await sbx.files.watch_dir(str(watched), on_event=events.append, on_exit=exits.append)
        touch_sentinel(watched, "before")
        await wait_events(events, until_event(CREATE, "before"))
        await h.stop()
        touch_sentinel(watched, "after")
        await asyncio.sleep(0.5)
        assert pairs(events) == [(CREATE, "before")]
        assert exits == [None]

    run_async(main())


def test_async_watch_regular_file_fails(sandbox, tmp_path):
    (tmp_path / "plain.txt").write_text("x")

    async def main():
        sbx = await async_sandbox()
        with pytest.raises(SandboxException) as info:
            await sbx.files.watch_dir(str(tmp_path / "plain.txt"), on_event=lambda e: None)
        assert isinstance(info.value, InvalidArgumentException), repr(info.value)

    run_async(main())


def test_async_watch_missing_directory_is_not_found(sandbox, tmp_path):
    async def main():
        sbx = await async_sandbox()
        with pytest.raises(NotFoundException):
            await sbx.files.watch_dir(str(tmp_path / "missing"), on_event=lambda e: None)

    run_async(main())
