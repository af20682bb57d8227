"""`sandbox.files` through the real E2B SDK (e2b==2.63.0, debug mode) against guestd.

What a user of the SDK relies on: the bytes that land on disk and come back, the entries the
SDK returns (names, types, paths, sizes, permission strings, owners, times, metadata), that
parents are created and files are owned by the requested user, the exceptions the SDK raises,
and that a 256 MiB transfer streams through guestd without growing its memory.

guestd runs on this machine, so every result is also checked on disk with plain `os` calls.
Specs: client.md §5 (how the SDK uses /files), rpc.md §3 and §5, http.md §4.5–4.6.
"""

from __future__ import annotations

import gzip as gzip_mod
import hashlib
import io
import os
import pwd
import stat
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from e2b import (
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    NotFoundException,
)

from helpers import RUN_ID, reset_vm_hwm, vm_hwm_kib

MiB = 1024 * 1024


def plain_http() -> httpx.Client:
    """A plain HTTP client for the URLs the SDK hands out (no proxy from the environment)."""
    return httpx.Client(trust_env=False, timeout=60)


def umask() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc/self/status")


def own_home() -> str:
    """Home of guestd's default user: guestd runs as this process's user (root → root)."""
    return pwd.getpwuid(os.geteuid()).pw_dir


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# ---------------------------------------------------------------------------------------------
# write: the data kinds and the two upload encodings


def test_write_str_returns_write_info_and_lands_on_disk(sandbox, tmp_path):
    p = tmp_path / "str.txt"
    info = sandbox.files.write(str(p), "héllo\nwörld €")
    assert info.name == "str.txt"
    assert info.type == FileType.FILE
    assert info.path == str(p)
    assert info.metadata is None
    assert p.read_bytes() == "héllo\nwörld €".encode()


def test_write_bytes_with_every_byte_value(sandbox, tmp_path):
    data = bytes(range(256)) * 64 + os.urandom(100_000)
    p = tmp_path / "all-bytes.bin"
    info = sandbox.files.write(str(p), data)
    assert info.path == str(p)
    assert p.read_bytes() == data
    assert sandbox.files.read(str(p), format="bytes") == data


def test_write_empty_file(sandbox, tmp_path):
    p = tmp_path / "empty"
    sandbox.files.write(str(p), b"")
    assert p.read_bytes() == b""
    assert sandbox.files.get_info(str(p)).size == 0


def test_write_overwrites_and_truncates(sandbox, tmp_path):
    p = tmp_path / "over.txt"
    p.write_text("a much longer original content\n")
    sandbox.files.write(str(p), "short")
    assert p.read_text() == "short"


@pytest.mark.parametrize("kind", ["BytesIO", "StringIO", "open-rb"])
def test_write_file_like_object(sandbox, tmp_path, kind):
    # A file-like entry makes the SDK stream it as application/octet-stream (client.md §5).
    data = ("line é\n" * 5000).encode()
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    p = tmp_path / f"from-{kind}.txt"
    if kind == "BytesIO":
        info = sandbox.files.write(str(p), io.BytesIO(data))
    elif kind == "StringIO":
        info = sandbox.files.write(str(p), io.StringIO(data.decode()))
    else:
        with open(src, "rb") as f:
            info = sandbox.files.write(str(p), f)
    assert info.path == str(p)
    assert p.read_bytes() == data


def test_write_file_like_object_as_multipart(sandbox, tmp_path):
    data = os.urandom(300_000)
    p = tmp_path / "multipart-io.bin"
    info = sandbox.files.write(str(p), io.BytesIO(data), use_octet_stream=False)
    assert info.path == str(p)
    assert p.read_bytes() == data


def test_write_iterable_of_chunks(sandbox, tmp_path):
    chunks = [os.urandom(70_000) for _ in range(7)] + [b""] + [b"tail"]
    p = tmp_path / "chunks.bin"
    sandbox.files.write(str(p), iter(chunks))
    assert p.read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("data", ["text é", b"\x00bytes\xff", "kind:file-like"])
def test_write_gzip(sandbox, tmp_path, data):
    # gzip=True: octet-stream with Content-Encoding: gzip; guestd stores the decoded bytes.
    p = tmp_path / "gz.out"
    raw = os.urandom(200_000) + b"end"
    payload = io.BytesIO(raw) if data == "kind:file-like" else data
    info = sandbox.files.write(str(p), payload, gzip=True)
    assert info.path == str(p)
    want = raw if data == "kind:file-like" else (data.encode() if isinstance(data, str) else data)
    assert p.read_bytes() == want


def test_write_use_octet_stream_for_str_and_bytes(sandbox, tmp_path):
    a, b = tmp_path / "oct-a.txt", tmp_path / "oct-b.bin"
    ia = sandbox.files.write(str(a), "octet str", use_octet_stream=True)
    ib = sandbox.files.write(str(b), b"\x01\x02octet", use_octet_stream=True)
    assert (ia.name, ia.type, ia.path) == ("oct-a.txt", FileType.FILE, str(a))
    assert (ib.name, ib.type, ib.path) == ("oct-b.bin", FileType.FILE, str(b))
    assert a.read_text() == "octet str"
    assert b.read_bytes() == b"\x01\x02octet"


@pytest.mark.parametrize("octet", [False, True], ids=["multipart", "octet-stream"])
def test_write_metadata_is_stored_and_read_back(sandbox, tmp_path, octet):
    p = tmp_path / f"meta-{octet}.txt"
    metadata = {"Owner-Team": "infra", "k2": "value with spaces ~!"}
    want = {"owner-team": "infra", "k2": "value with spaces ~!"}  # keys are lowercased
    info = sandbox.files.write(str(p), "m", metadata=metadata, use_octet_stream=octet)
    assert info.metadata == want
    assert sandbox.files.get_info(str(p)).metadata == want
    listed = {e.name: e for e in sandbox.files.list(str(tmp_path))}
    assert listed[p.name].metadata == want
    # Stored as user.e2b.<key> xattrs (rpc.md §3.2).
    assert os.getxattr(p, "user.e2b.owner-team") == b"infra"
    assert os.getxattr(p, "user.e2b.k2") == b"value with spaces ~!"


def test_upload_without_metadata_clears_it(sandbox, tmp_path):
    # http.md §4.6 step 5: every upload rewrites the metadata; none given → none left.
    p = tmp_path / "meta-clear.txt"
    sandbox.files.write(str(p), "1", metadata={"a": "1"})
    assert sandbox.files.get_info(str(p)).metadata == {"a": "1"}
    sandbox.files.write(str(p), "2")
    assert sandbox.files.get_info(str(p)).metadata is None
    assert not [x for x in os.listxattr(p) if x.startswith("user.e2b.")]


def test_write_creates_missing_parents(sandbox, tmp_path):
    p = tmp_path / "x" / "y" / "z" / "deep.txt"
    sandbox.files.write(str(p), "deep")
    assert p.read_text() == "deep"
    for d in (tmp_path / "x", tmp_path / "x" / "y", tmp_path / "x" / "y" / "z"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755 & ~umask(), f"mode of created {d}"


def test_write_to_a_directory_is_invalid_argument(sandbox, tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(str(tmp_path / "adir"), "x")
    assert (tmp_path / "adir").is_dir()


# ---------------------------------------------------------------------------------------------
# write_files


def test_write_files_sends_one_multipart_request(sandbox, tmp_path, monkeypatch):
    calls = []
    api = sandbox.files._envd_api
    real_post = api.post

    def spy(url, **kw):
        calls.append(kw)
        return real_post(url, **kw)

    monkeypatch.setattr(api, "post", spy)
    files = [
        {"path": str(tmp_path / "one.txt"), "data": "1"},
        {"path": str(tmp_path / "nested" / "deep" / "two.bin"), "data": b"\x00\x02"},
        {"path": str(tmp_path / "nested" / "three.txt"), "data": "three é"},
    ]
    infos = sandbox.files.write_files(files)

    assert len(calls) == 1 and "files" in calls[0], "write_files of str/bytes must be one multipart POST"
    assert "path" not in calls[0].get("params", {}), "several files: no ?path= (targets from filenames)"
    assert [i.path for i in infos] == [f["path"] for f in files]
    assert [i.name for i in infos] == ["one.txt", "two.bin", "three.txt"]
    assert all(i.type == FileType.FILE for i in infos)
    assert (tmp_path / "one.txt").read_bytes() == b"1"
    assert (tmp_path / "nested" / "deep" / "two.bin").read_bytes() == b"\x00\x02"
    assert (tmp_path / "nested" / "three.txt").read_text() == "three é"


def test_write_files_with_streams_uses_one_request_per_file(sandbox, tmp_path):
    files = [
        {"path": str(tmp_path / "s1.bin"), "data": io.BytesIO(b"first")},
        {"path": str(tmp_path / "sub" / "s2.bin"), "data": b"second"},
    ]
    infos = sandbox.files.write_files(files)
    assert [i.path for i in infos] == [f["path"] for f in files]
    assert (tmp_path / "s1.bin").read_bytes() == b"first"
    assert (tmp_path / "sub" / "s2.bin").read_bytes() == b"second"


def test_write_files_relative_paths_resolve_against_home(sandbox):
    d = f"gsdk-wf-{RUN_ID}"
    home = own_home()
    try:
        infos = sandbox.files.write_files([{"path": f"{d}/a.txt", "data": "a"}, {"path": f"{d}/b/c.txt", "data": "c"}])
        assert [i.path for i in infos] == [f"{home}/{d}/a.txt", f"{home}/{d}/b/c.txt"]
        with open(f"{home}/{d}/b/c.txt") as f:
            assert f.read() == "c"
    finally:
        sandbox.files.remove(f"{home}/{d}")


def test_write_files_empty_list(sandbox):
    assert sandbox.files.write_files([]) == []


# ---------------------------------------------------------------------------------------------
# read


def test_read_text_bytes_and_stream(sandbox, tmp_path):
    data = ("ünïcode line\n" * 20_000).encode() + os.urandom(1000).replace(b"\r", b"")
    p = tmp_path / "read.bin"
    p.write_bytes(data)
    assert sandbox.files.read(str(p), format="bytes") == data
    assert sandbox.files.read(str(p)) == data.decode(errors="replace")
    with sandbox.files.read(str(p), format="stream") as stream:
        got = b"".join(stream)
    assert got == data


@pytest.mark.parametrize("fmt", ["text", "bytes", "stream"])
def test_read_gzip(sandbox, tmp_path, fmt):
    data = b"compressible " * 100_000
    p = tmp_path / "gzread.txt"
    p.write_bytes(data)
    r = sandbox.files.read(str(p), format=fmt, gzip=True)
    if fmt == "stream":
        with r:
            r = b"".join(r)
    assert (r.encode() if fmt == "text" else bytes(r)) == data


def test_read_missing_file_is_file_not_found(sandbox, tmp_path):
    with pytest.raises(FileNotFoundException) as info:
        sandbox.files.read(str(tmp_path / "missing.txt"))
    assert isinstance(info.value, NotFoundException)
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(str(tmp_path / "missing.txt"), format="stream")


def test_read_directory_is_invalid_argument(sandbox, tmp_path):
    # envd: 400 "path '<p>' is a directory"; the SDK maps 400 to InvalidArgumentException.
    with pytest.raises(InvalidArgumentException) as info:
        sandbox.files.read(str(tmp_path))
    assert "directory" in str(info.value)


def test_read_follows_symlink(sandbox, tmp_path):
    (tmp_path / "target.txt").write_text("through the link")
    (tmp_path / "link.txt").symlink_to(tmp_path / "target.txt")
    assert sandbox.files.read(str(tmp_path / "link.txt")) == "through the link"


# ---------------------------------------------------------------------------------------------
# list, exists, get_info


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.txt").write_text("bb")
    (root / "sub" / "deeper" / "c.txt").write_text("ccc")
    (root / "emptydir").mkdir()
    return root


def test_list_depth_1(sandbox, tree):
    entries = sandbox.files.list(str(tree))
    assert [(e.name, e.type, e.path) for e in entries] == [
        ("a.txt", FileType.FILE, f"{tree}/a.txt"),
        ("emptydir", FileType.DIR, f"{tree}/emptydir"),
        ("sub", FileType.DIR, f"{tree}/sub"),
    ]
    assert entries[0].size == 1


def test_list_depth_2(sandbox, tree):
    # rpc.md §5.4: lexical pre-order walk, entries down to `depth` path components.
    entries = sandbox.files.list(str(tree), depth=2)
    assert [(e.name, e.type, e.path) for e in entries] == [
        ("a.txt", FileType.FILE, f"{tree}/a.txt"),
        ("emptydir", FileType.DIR, f"{tree}/emptydir"),
        ("sub", FileType.DIR, f"{tree}/sub"),
        ("b.txt", FileType.FILE, f"{tree}/sub/b.txt"),
        ("deeper", FileType.DIR, f"{tree}/sub/deeper"),
    ]
    assert [e.path for e in sandbox.files.list(str(tree), depth=3)][-1] == f"{tree}/sub/deeper/c.txt"


def test_list_empty_directory(sandbox, tree):
    assert sandbox.files.list(str(tree / "emptydir")) == []


def test_list_symlink_entry(sandbox, tree):
    (tree / "sub" / "link").symlink_to(tree / "a.txt")
    entries = {e.name: e for e in sandbox.files.list(str(tree / "sub"))}
    assert entries["link"].type == FileType.SYMLINK
    assert entries["link"].symlink_target == f"{tree}/a.txt"


def test_list_errors(sandbox, tree):
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(str(tree / "nope"))
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(str(tree / "a.txt"))


def test_exists(sandbox, tree):
    assert sandbox.files.exists(str(tree / "a.txt")) is True
    assert sandbox.files.exists(str(tree / "sub")) is True
    assert sandbox.files.exists(str(tree / "missing")) is False
    assert sandbox.files.exists(str(tree / "missing" / "deeper")) is False


def test_get_info_of_a_file(sandbox, tmp_path):
    p = tmp_path / "info.txt"
    p.write_bytes(b"12345")
    os.chmod(p, 0o640)
    st = os.stat(p)
    info = sandbox.files.get_info(str(p))
    assert info.name == "info.txt"
    assert info.type == FileType.FILE
    assert info.path == str(p)
    assert info.size == 5
    assert info.mode == 0o640
    assert info.permissions == "-rw-r-----"
    assert info.owner == owner_name(st.st_uid)
    assert info.group
    assert info.symlink_target is None
    assert info.modified_time.tzinfo is not None
    assert abs((info.modified_time - datetime.now(timezone.utc)).total_seconds()) < 10
    # The exact mtime survives the wire (rpc.md §3.2: ns Timestamp), up to the SDK's rounding
    # to datetime microseconds.
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    got_us = (info.modified_time - epoch) // timedelta(microseconds=1)
    assert abs(got_us * 1000 - st.st_mtime_ns) <= 1000, (info.modified_time, st.st_mtime_ns)


def test_get_info_of_a_directory(sandbox, tmp_path):
    d = tmp_path / "infodir"
    d.mkdir()
    os.chmod(d, 0o750)
    info = sandbox.files.get_info(str(d))
    assert info.type == FileType.DIR
    assert info.name == "infodir"
    assert info.mode == 0o750
    assert info.permissions == "drwxr-x---"


def test_get_info_permission_strings_are_go_filemode(sandbox, tmp_path):
    # rpc.md §3.2: Go os.FileMode.String(), not ls -l (no s/t substitution).
    p = tmp_path / "setuid"
    p.write_text("x")
    os.chmod(p, 0o4755)
    assert sandbox.files.get_info(str(p)).permissions == "urwxr-xr-x"
    assert sandbox.files.get_info("/tmp").permissions == "dtrwxrwxrwx"


def test_get_info_of_a_symlink(sandbox, tmp_path):
    (tmp_path / "real.txt").write_text("real content")
    link = tmp_path / "sym.txt"
    link.symlink_to(tmp_path / "real.txt")
    info = sandbox.files.get_info(str(link))
    assert info.type == FileType.SYMLINK  # is_symlink=true (EntryInfo field 12)
    assert info.name == "sym.txt"
    assert info.path == str(link)
    assert info.symlink_target == str(tmp_path / "real.txt")
    assert info.permissions.startswith("L")
    assert info.size == len(str(tmp_path / "real.txt"))  # lstat size: the link text


def test_get_info_missing_is_file_not_found(sandbox, tmp_path):
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# make_dir, rename, remove


def test_make_dir_then_exists(sandbox, tmp_path):
    d = tmp_path / "made" / "with" / "parents"
    assert sandbox.files.make_dir(str(d)) is True
    assert d.is_dir()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755 & ~umask()
    assert sandbox.files.make_dir(str(d)) is False
    assert sandbox.files.make_dir(str(tmp_path / "made")) is False


def test_make_dir_over_a_file_is_invalid_argument(sandbox, tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(str(tmp_path / "plain"))


def test_rename_file(sandbox, tmp_path):
    (tmp_path / "old.txt").write_text("moved")
    info = sandbox.files.rename(str(tmp_path / "old.txt"), str(tmp_path / "new.txt"))
    assert (info.name, info.type, info.path) == ("new.txt", FileType.FILE, str(tmp_path / "new.txt"))
    assert info.size == 5
    assert not (tmp_path / "old.txt").exists()
    assert (tmp_path / "new.txt").read_text() == "moved"


def test_rename_directory_into_missing_parents(sandbox, tmp_path):
    (tmp_path / "srcdir").mkdir()
    (tmp_path / "srcdir" / "f").write_text("f")
    dst = tmp_path / "made" / "on" / "the way"
    info = sandbox.files.rename(str(tmp_path / "srcdir"), str(dst))
    assert info.type == FileType.DIR
    assert info.path == str(dst)
    assert (dst / "f").read_text() == "f"


def test_rename_replaces_existing_file(sandbox, tmp_path):
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    sandbox.files.rename(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_text() == "A"


def test_rename_missing_source_is_file_not_found(sandbox, tmp_path):
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(str(tmp_path / "nope"), str(tmp_path / "other"))


def test_remove_file_and_directory_tree(sandbox, tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "g").write_text("y")
    sandbox.files.remove(str(tmp_path / "f"))
    sandbox.files.remove(str(tmp_path / "d"))
    assert not (tmp_path / "f").exists()
    assert not (tmp_path / "d").exists()
    assert sandbox.files.exists(str(tmp_path / "d")) is False


def test_remove_missing_path_is_fine(sandbox, tmp_path):
    sandbox.files.remove(str(tmp_path / "never-existed"))
    sandbox.files.remove(str(tmp_path / "never" / "existed"))


def test_remove_symlink_removes_only_the_link(sandbox, tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "file").write_text("kept")
    (tmp_path / "link").symlink_to(tmp_path / "keep")
    sandbox.files.remove(str(tmp_path / "link"))
    assert not os.path.lexists(tmp_path / "link")
    assert (tmp_path / "keep" / "file").read_text() == "kept"


# ---------------------------------------------------------------------------------------------
# relative paths, users


def test_relative_and_tilde_paths_resolve_against_home(sandbox):
    home = own_home()
    name = f"gsdk-rel-{RUN_ID}"
    try:
        info = sandbox.files.write(f"{name}/f.txt", "rel")
        assert info.path == f"{home}/{name}/f.txt"
        with open(f"{home}/{name}/f.txt") as f:
            assert f.read() == "rel"
        assert sandbox.files.read(f"{name}/f.txt") == "rel"
        assert sandbox.files.read(f"~/{name}/f.txt") == "rel"
        assert sandbox.files.exists(f"~/{name}/f.txt") is True
        assert sandbox.files.get_info(f"{name}/f.txt").path == f"{home}/{name}/f.txt"
        assert sandbox.files.get_info(f"~/{name}").path == f"{home}/{name}"
        assert [e.path for e in sandbox.files.list(name)] == [f"{home}/{name}/f.txt"]
        assert sandbox.files.make_dir(f"{name}/sub") is True
        assert os.path.isdir(f"{home}/{name}/sub")
        assert sandbox.files.rename(f"{name}/f.txt", f"~/{name}/sub/g.txt").path == f"{home}/{name}/sub/g.txt"
        sandbox.files.remove(f"{name}/sub/g.txt")
        assert not os.path.exists(f"{home}/{name}/sub/g.txt")
    finally:
        sandbox.files.remove(f"{home}/{name}")
    assert not os.path.exists(f"{home}/{name}")


def test_tilde_user_path_is_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.get_info("~root/x")


def test_write_as_user_owns_file_and_created_parents_needs_root(sandbox, test_user, tmp_path):
    base = tmp_path / "owned"
    p = base / "sub" / "f.txt"
    info = sandbox.files.write(str(p), "mine", user=test_user.name)
    assert info.path == str(p)
    for q in (p, base, base / "sub"):
        st = os.stat(q)
        assert (st.st_uid, st.st_gid) == (test_user.uid, test_user.gid), f"owner of {q}"
    assert sandbox.files.get_info(str(p), user=test_user.name).owner == test_user.name
    # octet-stream and streamed uploads too
    q = tmp_path / "owned-oct.bin"
    sandbox.files.write(str(q), io.BytesIO(b"x"), user=test_user.name)
    assert os.stat(q).st_uid == test_user.uid


def test_overwrite_as_user_hands_the_file_to_the_user_needs_root(sandbox, test_user, tmp_path):
    # http.md §4.6: an overwritten file is chowned to the uploading user; its mode is kept.
    p = tmp_path / "root-owned.txt"
    p.write_text("root")
    os.chmod(p, 0o600)
    sandbox.files.write(str(p), "user now", user=test_user.name)
    st = os.stat(p)
    assert st.st_uid == test_user.uid
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert p.read_text() == "user now"


def test_relative_paths_of_a_user_resolve_against_its_home_needs_root(sandbox, test_user):
    name = f"gsdk-urel-{RUN_ID}.txt"
    info = sandbox.files.write(name, "in user home", user=test_user.name)
    try:
        assert info.path == f"{test_user.home}/{name}"
        assert os.stat(info.path).st_uid == test_user.uid
        assert sandbox.files.read(name, user=test_user.name) == "in user home"
        assert sandbox.files.read(f"~/{name}", user=test_user.name) == "in user home"
        assert sandbox.files.get_info(name, user=test_user.name).path == f"{test_user.home}/{name}"
        assert sandbox.files.make_dir(f"dir-{RUN_ID}", user=test_user.name) is True
        assert os.stat(f"{test_user.home}/dir-{RUN_ID}").st_uid == test_user.uid
    finally:
        sandbox.files.remove(name, user=test_user.name)
        sandbox.files.remove(f"dir-{RUN_ID}", user=test_user.name)
    assert not os.path.exists(f"{test_user.home}/{name}")


def test_remove_refuses_only_the_empty_path_needs_root(sandbox, test_user):
    """envd resolves "" to the home directory and deletes it; guestd refuses that one path.
    A name of spaces is a file name like any other and is removed."""
    from e2b import InvalidArgumentException

    with pytest.raises(InvalidArgumentException, match="refusing to remove an empty path"):
        sandbox.files.remove("", user=test_user.name)
    assert os.path.isdir(test_user.home)
    spaces = os.path.join(test_user.home, "   ")
    with open(spaces, "w") as f:
        f.write("x")
    sandbox.files.remove("   ", user=test_user.name)
    assert not os.path.exists(spaces)
    assert os.path.isdir(test_user.home)


def test_what_the_kernel_refuses_is_permission_denied_naming_the_path(sandbox):
    """envd maps every OS error to `internal` (rpc.md §7.9); guestd answers EACCES/EPERM with
    `permission_denied` (HTTP 403 on /files), the path and the OS's reason. sysfs refuses new
    entries even to root, which these tests run as."""
    from e2b import SandboxException

    target = f"/sys/guestd-{RUN_ID}"
    with pytest.raises(SandboxException) as info:
        sandbox.files.make_dir(target)
    assert "permission_denied" in str(info.value).lower(), info.value
    assert f"permission denied: {target}: Operation not permitted" in str(info.value)
    with pytest.raises(SandboxException) as info:
        sandbox.files.write(target, "x")
    assert f"permission denied: {target}" in str(info.value), info.value
    assert not os.path.exists(target)


def test_unknown_user_is_rejected(sandbox, tmp_path):
    from e2b import AuthenticationException

    nobody = f"nouser{RUN_ID[:6]}"
    with pytest.raises(AuthenticationException):
        sandbox.files.write(str(tmp_path / "x"), "x", user=nobody)
    with pytest.raises(AuthenticationException):
        sandbox.files.read(str(tmp_path / "x"), user=nobody)
    with pytest.raises(AuthenticationException):
        sandbox.files.list(str(tmp_path), user=nobody)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# upload_url / download_url with plain HTTP


def test_upload_and_download_url_with_plain_http(sandbox, tmp_path):
    p = tmp_path / "url" / "via-url.bin"
    data = os.urandom(500_000)
    up = sandbox.upload_url(str(p))
    down = sandbox.download_url(str(p))
    assert "signature" not in up and "signature" not in down, "debug mode: no access token, no signature"
    with plain_http() as http:
        r = http.post(up, files={"file": ("via-url.bin", data, "application/octet-stream")})
        assert r.status_code == 200, r.text
        assert r.json() == [{"name": "via-url.bin", "type": "file", "path": str(p)}]
        assert p.read_bytes() == data

        r = http.get(down)
        assert r.status_code == 200
        assert r.content == data
        assert r.headers.get("content-disposition", "").startswith("inline; filename=")

        # A client asking for gzip gets it (http.md §4.5); httpx decodes it.
        r = http.get(down, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200
        assert r.headers.get("content-encoding") == "gzip"
        assert r.content == data

        r = http.get(sandbox.download_url(str(tmp_path / "missing")))
        assert r.status_code == 404
        assert r.json()["code"] == 404


def test_upload_url_octet_stream_and_gzip_with_plain_http(sandbox, tmp_path):
    p = tmp_path / "url-oct.txt"
    with plain_http() as http:
        r = http.post(
            sandbox.upload_url(str(p)),
            content=gzip_mod.compress(b"gzipped body"),
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
        assert r.status_code == 200, r.text
        assert r.json()[0]["path"] == str(p)
    assert p.read_bytes() == b"gzipped body"


def test_upload_url_as_user_needs_root(sandbox, test_user, tmp_path):
    p = tmp_path / "url-user.txt"
    url = sandbox.upload_url(str(p), user=test_user.name)
    assert f"username={test_user.name}" in url
    with plain_http() as http:
        r = http.post(url, files={"file": ("url-user.txt", b"owned via url")})
        assert r.status_code == 200, r.text
        assert http.get(sandbox.download_url(str(p), user=test_user.name)).content == b"owned via url"
    assert os.stat(p).st_uid == test_user.uid


# ---------------------------------------------------------------------------------------------
# volume: 256 MiB streamed through with flat memory


@pytest.mark.timeout(600)
def test_256_mib_round_trip_with_flat_guestd_memory(sandbox, guestd, tmp_path):
    size = 256 * MiB
    chunk = 1 * MiB
    p = tmp_path / "big.bin"
    sent = hashlib.sha256()

    def produce():
        for _ in range(size // chunk):
            c = os.urandom(chunk)
            sent.update(c)
            yield c

    reset_vm_hwm(guestd.pid)
    before = vm_hwm_kib(guestd.pid)

    info = sandbox.files.write(str(p), produce())  # iterable → streamed octet-stream, chunked
    assert info.path == str(p)
    assert os.path.getsize(p) == size
    after_upload = vm_hwm_kib(guestd.pid)

    got = hashlib.sha256()
    n = 0
    with sandbox.files.read(str(p), format="stream") as stream:
        for c in stream:
            got.update(c)
            n += len(c)
    after = vm_hwm_kib(guestd.pid)

    assert n == size
    assert got.hexdigest() == sent.hexdigest()
    growth_mib = (after - before) / 1024
    assert growth_mib < 64, (
        f"guestd peak RSS grew by {growth_mib:.1f} MiB over a 256 MiB round trip "
        f"(VmHWM {before} KiB → {after_upload} KiB after upload → {after} KiB after download)"
    )
