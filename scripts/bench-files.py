#!/usr/bin/env python3
"""1 GiB /files upload and download through a running guestd, next to raw loopback TCP copies of
the same bytes in the same run, and guestd's peak RSS growth (VmHWM, reset first).

The raw copies do what each direction must do, minus HTTP and guestd: for the download, the
file is sent with sendfile(2) and the receiver discards it (curl -o /dev/null does the same);
for the upload, the receiver writes what it receives into a file in DEST_DIR, once plainly and
once with guestd's steps (temporary file, fsync, rename over the previous copy): the fsync costs
nothing on tmpfs and a lot on a disk.

The source file is read once first, so every transfer reads it from the page cache; each figure
is the best of RUNS, because on a small shared machine single runs of any of them (the raw copy
included) vary by 2-3x.

usage: scripts/bench-files.py PORT GUESTD_PID [DEST_DIR]   (DEST_DIR default /tmp; try /dev/shm)
Needs curl. Figures are printed, never asserted.
"""
import os
import socket
import subprocess
import sys
import threading
import time

PORT, PID = int(sys.argv[1]), int(sys.argv[2])
DEST = os.path.join(sys.argv[3] if len(sys.argv) > 3 else "/tmp", "guestd-bench-dst.bin")
N = 1 << 30
RUNS = 3
SRC = "/tmp/guestd-bench-src.bin"


def hwm_kb():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return -1


def raw_copy_s(into_file, atomic=False):
    """Seconds to send SRC over loopback TCP; the receiver discards it, writes it to a file, or
    (atomic) writes a temporary file, fsyncs it and renames it over a file that stays, like
    guestd does."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def sink():
        conn, _ = srv.accept()
        buf = bytearray(1 << 20)
        path = DEST + (".raw-tmp" if atomic else ".raw")
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if into_file else None
        while n := conn.recv_into(buf):
            if out is not None:
                os.write(out, memoryview(buf)[:n])
        if out is not None:
            if atomic:
                os.fsync(out)
                os.rename(path, DEST + ".raw-atomic")
            os.close(out)
        conn.close()

    t = threading.Thread(target=sink)
    t.start()
    s = socket.create_connection(srv.getsockname())
    t0 = time.perf_counter()
    with open(SRC, "rb") as f:
        s.sendfile(f)
    s.close()
    t.join()
    elapsed = time.perf_counter() - t0
    if into_file and not atomic:
        os.remove(DEST + ".raw")
    return elapsed


def timed(args):
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", *args], check=True)
    return time.perf_counter() - t0


if not os.path.exists(SRC) or os.path.getsize(SRC) != N:
    with open(SRC, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(N >> 20):
            f.write(chunk)
with open(SRC, "rb") as f:  # into the page cache
    while f.read(1 << 24):
        pass
open(f"/proc/{PID}/clear_refs", "w").write("5")  # reset VmHWM
h0 = hwm_kb()
url = f"http://127.0.0.1:{PORT}/files?path={DEST}"
# Interleaved, so guestd and the raw copies meet the same page-cache and writeback state.
ups, raw_ups, raw_ups_fsync, downs, raw_downs = [], [], [], [], []
for _ in range(RUNS):
    ups.append(timed(["-X", "POST", "-H", "Content-Type: application/octet-stream", "-T", SRC, url]))
    raw_ups_fsync.append(raw_copy_s(True, atomic=True))
    raw_ups.append(raw_copy_s(True))
for _ in range(RUNS):
    raw_downs.append(raw_copy_s(False))
    downs.append(timed(["-H", "Accept-Encoding: identity", url]))
up, raw_up, raw_up_fsync, down, raw_down = map(min, (ups, raw_ups, raw_ups_fsync, downs, raw_downs))
if os.environ.get("VERBOSE"):
    print("runs (s):", {"up": ups, "raw_atomic": raw_ups_fsync, "raw": raw_ups, "down": downs, "raw_down": raw_downs})
h1 = hwm_kb()
mb = lambda s: N / s / 1e6
print(f"best of {RUNS}, {N >> 20} MiB to/from {os.path.dirname(DEST)}:")
print(f"  upload   {up:.2f}s ({mb(up):.0f} MB/s); raw TCP copy into a file {raw_up:.2f}s ({mb(raw_up):.0f} MB/s): "
      f"{raw_up / up:.2f}x raw")
print(f"           raw TCP copy into a temp file + fsync + rename over the last one (guestd's steps) "
      f"{raw_up_fsync:.2f}s ({mb(raw_up_fsync):.0f} MB/s): {raw_up_fsync / up:.2f}x")
print(f"  download {down:.2f}s ({mb(down):.0f} MB/s); raw sendfile copy {raw_down:.2f}s ({mb(raw_down):.0f} MB/s): "
      f"{raw_down / down:.2f}x raw")
print(f"  guestd VmHWM {h0} -> {h1} kB (+{(h1 - h0) / 1024:.1f} MiB)")
os.remove(DEST)
os.remove(DEST + ".raw-atomic")
