"""guestd's Connect layer driven by an independent client: Python `connectrpc` 0.12 with the stubs
generated into e2b (`e2b/envd/process/process_connect.py`) but connectrpc's own codecs,
compression and transport, none of the SDK's.

Every test runs with both codecs connectrpc ships (binary proto: `application/proto` and
`application/connect+proto`; JSON: `application/json` and `application/connect+json`) and with
two compression settings: identity, and connectrpc's default (gzip-compressed requests, gzip
accepted). Transport is HTTP/1.1 (chunked request bodies for streams), like the SDK; one test
repeats the three RPC shapes over HTTP/2 with prior knowledge (h2c).

How connectrpc picks these (connectrpc/_client_sync.py, _codec.py, _protocol_connect.py): the
client's `codec=` argument (default: binary proto; `proto_json_codec()` for JSON) sets the
content type; `send_compression=` (default gzip; None = identity) and `accept_compression=`
(default gzip+identity; () = identity only). Client streaming is a chunked POST whose body is the
request iterator; the server answers after the client half-closes, which HTTP/1.1 carries fine.
"""

from __future__ import annotations

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.process import process_pb
from protobuf import Oneof

from helpers import (
    by_pid,
    by_tag,
    drain,
    event_of,
    expect_start,
    marked,
    pid_running,
    raw_process_client,
    start_request,
    wait_gone,
    wait_until,
)

STREAM_TIMEOUT_MS = 30_000


@pytest.fixture(params=["proto", "json"])
def codec(request):
    return request.param


@pytest.fixture(params=["identity", "gzip"])
def compression(request):
    return request.param


@pytest.fixture
def client(guestd, codec, compression):
    c = raw_process_client(guestd.url, codec, compression)
    yield c
    c.close()


def sleep_request(name: str, tag=None, seconds: int = 300):
    return start_request("/bin/bash", ["-c", f"exec -a {marked(name)} sleep {seconds}"], tag=tag)


def kill(client, pid: int) -> None:
    client.send_signal(process_pb.SendSignalRequest(process=by_pid(pid), signal=process_pb.Signal.SIGKILL))


def stdin_input(data: bytes) -> process_pb.ProcessInput:
    return process_pb.ProcessInput(input=Oneof("stdin", data))


# ---------------------------------------------------------------------------------------------
# server streaming


def test_server_stream_start_echo(client):
    stream = client.start(start_request("/bin/echo", ["hello", "wörld"]), timeout_ms=STREAM_TIMEOUT_MS)
    pid = expect_start(stream)
    r = drain(stream)
    assert r.stdout == "hello wörld\n".encode()
    assert r.stderr == b""
    assert r.end.exited is True
    assert r.end.exit_code == 0
    assert r.end.status == "exit status 0"
    assert not r.end.has_field("error")
    assert r.kinds[-1] == "end"
    assert not pid_running(pid)


def test_server_stream_nonzero_exit_and_stderr(client):
    stream = client.start(
        start_request("/bin/sh", ["-c", "echo oops >&2; exit 42"]), timeout_ms=STREAM_TIMEOUT_MS
    )
    expect_start(stream)
    r = drain(stream)
    assert r.stderr == b"oops\n"
    assert (r.end.exit_code, r.end.exited, r.end.status, r.end.error) == (
        42,
        True,
        "exit status 42",
        "exit status 42",
    )


def test_server_stream_binary_output_bytes_are_exact(client):
    # Every byte value, including invalid UTF-8: the bytes field carries raw output.
    stream = client.start(
        start_request("/bin/sh", ["-c", "printf '" + "".join(f"\\{b:03o}" for b in range(256)) + "'"]),
        timeout_ms=STREAM_TIMEOUT_MS,
    )
    expect_start(stream)
    assert drain(stream).stdout == bytes(range(256))


# ---------------------------------------------------------------------------------------------
# unary


def test_unary_list_shows_tagged_process(client, codec, compression):
    tag = f"list-{codec}-{compression}"
    stream = client.start(sleep_request(tag, tag=tag), timeout_ms=STREAM_TIMEOUT_MS)
    pid = expect_start(stream)
    try:
        listed = {p.pid: p for p in client.list(process_pb.ListRequest()).processes}
        assert pid in listed, f"pid {pid} not in List: {sorted(listed)}"
        info = listed[pid]
        assert info.has_field("tag") and info.tag == tag
        assert info.config.cmd == "/bin/bash"
        assert list(info.config.args) == ["-c", f"exec -a {marked(tag)} sleep 300"]
    finally:
        kill(client, pid)
    r = drain(stream)
    assert (r.end.exited, r.end.exit_code, r.end.status) == (False, -1, "signal: killed")
    assert pid not in {p.pid for p in client.list(process_pb.ListRequest()).processes}


def test_unary_send_input_to_cat(client):
    stream = client.start(start_request("/bin/cat", stdin=True), timeout_ms=STREAM_TIMEOUT_MS)
    pid = expect_start(stream)
    client.send_input(process_pb.SendInputRequest(process=by_pid(pid), input=stdin_input(b"ping\n")))
    # cat echoes the line back before stdin is closed.
    ev = event_of(next(stream))
    while ev.field == "keepalive":
        ev = event_of(next(stream))
    assert ev.field == "data" and ev.value.output.field == "stdout"
    got = bytearray(ev.value.output.value)
    client.send_input(process_pb.SendInputRequest(process=by_pid(pid), input=stdin_input(b"\x00\xffbin")))
    client.close_stdin(process_pb.CloseStdinRequest(process=by_pid(pid)))
    r = drain(stream)
    assert bytes(got) + r.stdout == b"ping\n\x00\xffbin"
    assert r.end.exit_code == 0


def test_unary_errors_are_connect_codes(client):
    with pytest.raises(ConnectError) as info:
        kill(client, 99_999_999)
    assert info.value.code == Code.NOT_FOUND
    with pytest.raises(ConnectError) as info:
        client.send_input(process_pb.SendInputRequest(process=by_pid(99_999_999), input=stdin_input(b"x")))
    assert info.value.code == Code.NOT_FOUND


def test_stream_error_before_start_is_connect_code(client):
    with pytest.raises(ConnectError) as info:
        drain(client.connect(process_pb.ConnectRequest(process=by_pid(99_999_999)), timeout_ms=STREAM_TIMEOUT_MS))
    assert info.value.code == Code.NOT_FOUND


# ---------------------------------------------------------------------------------------------
# client streaming


def stream_input_messages(pid: int, chunks):
    yield process_pb.StreamInputRequest(
        event=Oneof("start", process_pb.StreamInputRequest.StartEvent(process=by_pid(pid)))
    )
    for chunk in chunks:
        if chunk is None:
            yield process_pb.StreamInputRequest(
                event=Oneof("keepalive", process_pb.StreamInputRequest.KeepAlive())
            )
        else:
            yield process_pb.StreamInputRequest(
                event=Oneof("data", process_pb.StreamInputRequest.DataEvent(input=stdin_input(chunk)))
            )


def test_client_stream_stream_input_feeds_cat(client):
    stream = client.start(start_request("/bin/cat", stdin=True), timeout_ms=STREAM_TIMEOUT_MS)
    pid = expect_start(stream)
    resp = client.stream_input(
        stream_input_messages(pid, [b"abc", None, b"def\n", b"\xf0\x9f\x98\x80"]), timeout_ms=STREAM_TIMEOUT_MS
    )
    assert isinstance(resp, process_pb.StreamInputResponse)
    client.close_stdin(process_pb.CloseStdinRequest(process=by_pid(pid)))
    r = drain(stream)
    assert r.stdout == "abcdef\n😀".encode()
    assert r.end.exit_code == 0


def test_client_stream_unknown_pid_is_not_found(client):
    with pytest.raises(ConnectError) as info:
        client.stream_input(stream_input_messages(99_999_999, [b"x"]), timeout_ms=STREAM_TIMEOUT_MS)
    assert info.value.code == Code.NOT_FOUND


# ---------------------------------------------------------------------------------------------
# tags


def test_several_tagged_processes(client, codec, compression):
    base = f"tags-{codec}-{compression}"
    specs = [("a", f"{base}-a"), ("b1", f"{base}-b"), ("b2", f"{base}-b"), ("untagged", None)]
    streams, pids = {}, {}
    try:
        for name, tag in specs:
            streams[name] = client.start(sleep_request(f"{base}-{name}", tag=tag), timeout_ms=STREAM_TIMEOUT_MS)
            pids[name] = expect_start(streams[name])
        listed = {p.pid: p for p in client.list(process_pb.ListRequest()).processes}
        for name, tag in specs:
            info = listed[pids[name]]
            assert (info.tag if info.has_field("tag") else None) == tag, f"{name}: {info}"

        # Connect by tag reaches a process carrying that tag (tags need not be unique).
        c = client.connect(process_pb.ConnectRequest(process=by_tag(f"{base}-a")), timeout_ms=STREAM_TIMEOUT_MS)
        assert expect_start(c) == pids["a"]
        c.close()
        c = client.connect(process_pb.ConnectRequest(process=by_tag(f"{base}-b")), timeout_ms=STREAM_TIMEOUT_MS)
        assert expect_start(c) in (pids["b1"], pids["b2"])
        c.close()

        # A signal by tag ends only the tagged process.
        client.send_signal(
            process_pb.SendSignalRequest(process=by_tag(f"{base}-a"), signal=process_pb.Signal.SIGTERM)
        )
        r = drain(streams.pop("a"))
        assert (r.end.exited, r.end.status) == (False, "signal: terminated")
        assert pid_running(pids["b1"]) and pid_running(pids["b2"]) and pid_running(pids["untagged"])

        with pytest.raises(ConnectError) as info:
            client.connect(process_pb.ConnectRequest(process=by_tag(f"{base}-none")), timeout_ms=5000).__next__()
        assert info.value.code == Code.NOT_FOUND
    finally:
        for name, s in streams.items():
            if pid_running(pids.get(name, 0)):
                kill(client, pids[name])
            s.close()
    for name, _ in specs:
        assert not wait_gone(marked(f"{base}-{name}"))


def test_closing_the_start_stream_does_not_kill_the_process(client, codec, compression):
    name = f"detach-{codec}-{compression}"
    stream = client.start(sleep_request(name), timeout_ms=STREAM_TIMEOUT_MS)
    pid = expect_start(stream)
    stream.close()
    try:
        assert not wait_until(lambda: not pid_running(pid), 1.0), "closing the Start stream killed the process"
        assert pid in {p.pid for p in client.list(process_pb.ListRequest()).processes}
    finally:
        kill(client, pid)
    assert not wait_gone(marked(name))


# ---------------------------------------------------------------------------------------------
# h2c


def test_h2c_prior_knowledge_all_rpc_shapes(guestd):
    """guestd serves HTTP/2 with prior knowledge on the same port (the host CLI's gRPC needs it);
    Connect must work over it too. The Python SDK itself never uses h2c."""
    client = raw_process_client(guestd.url, "json", "identity", http2=True)
    try:
        client.list(process_pb.ListRequest())
        stream = client.start(start_request("/bin/cat", stdin=True), timeout_ms=STREAM_TIMEOUT_MS)
        pid = expect_start(stream)
        client.stream_input(stream_input_messages(pid, [b"over h2\n"]), timeout_ms=STREAM_TIMEOUT_MS)
        client.close_stdin(process_pb.CloseStdinRequest(process=by_pid(pid)))
        r = drain(stream)
        assert r.stdout == b"over h2\n"
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# keepalives, protocol edge cases (one codec is enough)


def test_keepalive_ping_interval_header(guestd):
    client = raw_process_client(guestd.url, "json", "identity")
    try:
        stream = client.start(
            start_request("/bin/sh", ["-c", "sleep 3.5; echo done"]),
            headers={"Keepalive-Ping-Interval": "1"},
            timeout_ms=STREAM_TIMEOUT_MS,
        )
        expect_start(stream)
        r = drain(stream)
        assert r.stdout == b"done\n"
        assert r.kinds.count("keepalive") >= 2, f"events: {r.kinds}"
        # rpc.md §7.2: envd crashes on an interval <= 0; guestd must treat it as the default.
        for bad in ("0", "-5", "soon"):
            stream = client.start(
                start_request("/bin/echo", ["ok"]), headers={"Keepalive-Ping-Interval": bad}, timeout_ms=STREAM_TIMEOUT_MS
            )
            expect_start(stream)
            assert drain(stream).stdout == b"ok\n"
        client.list(process_pb.ListRequest())  # still alive
    finally:
        client.close()


def test_stream_input_data_before_start_is_an_error_not_a_dropped_connection(guestd):
    client = raw_process_client(guestd.url, "json", "identity")
    try:
        msg = process_pb.StreamInputRequest(
            event=Oneof("data", process_pb.StreamInputRequest.DataEvent(input=stdin_input(b"x")))
        )
        with pytest.raises(ConnectError) as info:
            client.stream_input(iter([msg]), timeout_ms=STREAM_TIMEOUT_MS)
        # rpc.md §7.3: envd panics here (connection dropped, UNAVAILABLE on the client).
        assert info.value.code == Code.FAILED_PRECONDITION, info.value
    finally:
        client.close()
