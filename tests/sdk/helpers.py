"""Shared helpers for the SDK test tier: process markers, /proc scans, a raw Connect client.

Every long-lived process a test starts through guestd runs as `exec -a <marker> sleep N`, so its
argv[0] carries the per-run MARK. That lets a test check that a killed or timed-out process is
really gone, and lets the session teardown prove that nothing guestd spawned outlives it.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from connectrpc.codec import proto_binary_codec, proto_json_codec
from e2b.envd.process import process_connect, process_pb
from protobuf import Oneof
from pyqwest import HTTPVersion, SyncClient, SyncHTTPTransport
from testkit import wait_until  # noqa: F401  (the tests import it from here)

RUN_ID = uuid.uuid4().hex[:10]
# argv[0] prefix of every long-lived process the tests start; unique per pytest run.
MARK = f"guestd-sdk-{RUN_ID}"


def marked(name: str) -> str:
    return f"{MARK}-{name}"


def sleeper(name: str, seconds: int = 300) -> str:
    """A shell command that becomes a `sleep` whose argv[0] is `marked(name)`."""
    return f"exec -a {marked(name)} sleep {seconds}"


# ---------------------------------------------------------------------------------------------
# /proc


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    starttime: int
    cmdline: str

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def read_proc(pid: int) -> Optional[Proc]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = stat.rsplit(")", 1)[1].split()
    return Proc(pid=pid, ppid=int(rest[1]), state=rest[0], starttime=int(rest[19]), cmdline=cmdline)


def all_procs() -> list[Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            p = read_proc(int(entry))
            if p is not None:
                procs.append(p)
    return procs


def descendants(root: int) -> list[Proc]:
    procs = all_procs()
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c.pid)
    return out


def marked_procs(marker: str = MARK) -> list[Proc]:
    return [p for p in all_procs() if p.running and marker in p.cmdline]


def still_alive(p: Proc) -> bool:
    now = read_proc(p.pid)
    return now is not None and now.starttime == p.starttime and now.running


def wait_gone(marker: str, timeout: float = 5.0) -> list[Proc]:
    """Waits until no running process carries `marker`; returns the ones still there."""
    wait_until(lambda: not marked_procs(marker), timeout)
    return marked_procs(marker)


def pid_running(pid: int) -> bool:
    p = read_proc(pid)
    return p is not None and p.running


# ---------------------------------------------------------------------------------------------
# PTY output collector


class PtyCollector:
    """Drains a PTY CommandHandle on a thread and lets the test wait for bytes to appear."""

    def __init__(self, handle):
        self.handle = handle
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.result = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_pty(self, data: bytes) -> None:
        with self._cond:
            self._buf.extend(data)
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self.result = self.handle.wait(on_pty=self._on_pty)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> bytes:
        with self._cond:
            return bytes(self._buf)

    def wait_for(self, needle: bytes, timeout: float = 10.0, start: int = 0) -> int:
        """Waits until `needle` appears at or after offset `start`; returns the offset after it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                i = self._buf.find(needle, start)
                if i >= 0:
                    return i + len(needle)
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise AssertionError(
                        f"{needle!r} not seen in PTY output within {timeout}s "
                        f"(stream {'open' if self._thread.is_alive() else 'ended: ' + repr(self.error)}); "
                        f"output so far: {bytes(self._buf)!r}"
                    )
                self._cond.wait(left)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


# ---------------------------------------------------------------------------------------------
# Independent Connect client: connectrpc's generated stubs (shipped in e2b) with connectrpc's own
# codecs, transport and compression defaults; none of the SDK's plumbing (codec, interceptors,
# error mapping) is involved.

CODECS = {"proto": proto_binary_codec, "json": proto_json_codec}


def raw_process_client(
    base_url: str, codec: str, compression: str, http2: bool = False
) -> process_connect.ProcessClientSync:
    """`compression`: "identity" sends and accepts only identity; "gzip" is connectrpc's default
    (requests gzip-compressed, gzip accepted). `http2`: HTTP/2 with prior knowledge (h2c)."""
    transport = SyncHTTPTransport(http_version=HTTPVersion.HTTP2 if http2 else HTTPVersion.HTTP1)
    kwargs = {}
    if compression == "identity":
        kwargs = {"send_compression": None, "accept_compression": ()}
    elif compression != "gzip":
        raise ValueError(compression)
    return process_connect.ProcessClientSync(
        base_url, codec=CODECS[codec](), http_client=SyncClient(transport), **kwargs
    )


def by_pid(pid: int) -> process_pb.ProcessSelector:
    return process_pb.ProcessSelector(selector=Oneof("pid", pid))


def by_tag(tag: str) -> process_pb.ProcessSelector:
    return process_pb.ProcessSelector(selector=Oneof("tag", tag))


def start_request(
    cmd: str, args: Iterable[str] = (), *, tag: Optional[str] = None, stdin: Optional[bool] = None,
    envs: Optional[dict] = None,
) -> process_pb.StartRequest:
    kwargs = {}
    if tag is not None:
        kwargs["tag"] = tag
    if stdin is not None:
        kwargs["stdin"] = stdin
    return process_pb.StartRequest(
        process=process_pb.ProcessConfig(cmd=cmd, args=list(args), envs=envs or {}), **kwargs
    )


def event_of(resp) -> Oneof:
    """The `ProcessEvent.event` oneof of a StartResponse/ConnectResponse."""
    assert resp.event is not None, f"response without event: {resp}"
    assert resp.event.event is not None, f"ProcessEvent with no event set: {resp}"
    return resp.event.event


def expect_start(stream: Iterator) -> int:
    ev = event_of(next(stream))
    assert ev.field == "start", f"first event must be start, got {ev}"
    assert ev.value.pid > 0
    return ev.value.pid


@dataclass
class StreamResult:
    stdout: bytes
    stderr: bytes
    pty: bytes
    end: object  # ProcessEvent.EndEvent
    kinds: list  # event kinds in order, keepalives included


def drain(stream: Iterator) -> StreamResult:
    """Reads a process stream to its end; asserts the end event is last and comes once."""
    out, err, pty, kinds, end = bytearray(), bytearray(), bytearray(), [], None
    for resp in stream:
        ev = event_of(resp)
        kinds.append(ev.field)
        assert end is None, f"event after end: {ev}"
        if ev.field == "data":
            o = ev.value.output
            {"stdout": out, "stderr": err, "pty": pty}[o.field].extend(o.value)
        elif ev.field == "end":
            end = ev.value
        elif ev.field == "start":
            raise AssertionError("second start event")
    assert end is not None, f"stream completed without an end event (events: {kinds})"
    return StreamResult(bytes(out), bytes(err), bytes(pty), end, kinds)


def raw_filesystem_client(base_url: str, codec: str = "json") -> "filesystem_connect.FilesystemClientSync":
    """connectrpc's own Filesystem client (identity compression), for checks the SDK cannot
    make, e.g. that a removed watcher is gone on the server."""
    from e2b.envd.filesystem import filesystem_connect

    transport = SyncHTTPTransport(http_version=HTTPVersion.HTTP1)
    return filesystem_connect.FilesystemClientSync(
        base_url,
        codec=CODECS[codec](),
        http_client=SyncClient(transport),
        send_compression=None,
        accept_compression=(),
    )


# ---------------------------------------------------------------------------------------------
# memory


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of `pid` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def reset_vm_hwm(pid: int) -> None:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/<pid>/clear_refs`), so a
    later peak measures this test and not whatever ran before in the same guestd."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
