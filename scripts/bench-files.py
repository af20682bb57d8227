#!/usr/bin/env python3
"""1 GiB /files upload and download through a running guestd, next to a raw loopback TCP copy of
the same bytes in the same run, and guestd's peak RSS growth (VmHWM, reset first).

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
SRC = "/tmp/guestd-bench-src.bin"


def hwm_kb():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return -1


def raw_copy_s():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def sink():
        conn, _ = srv.accept()
        while conn.recv(1 << 20):
            pass
        conn.close()

    t = threading.Thread(target=sink)
    t.start()
    s = socket.create_connection(srv.getsockname())
    t0 = time.perf_counter()
    with open(SRC, "rb") as f:
        s.sendfile(f)
    s.close()
    t.join()
    return time.perf_counter() - t0


def timed(args):
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", *args], check=True)
    return time.perf_counter() - t0


if not os.path.exists(SRC) or os.path.getsize(SRC) != N:
    with open(SRC, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(N >> 20):
            f.write(chunk)
open(f"/proc/{PID}/clear_refs", "w").write("5")  # reset VmHWM
h0 = hwm_kb()
raw = raw_copy_s()
url = f"http://127.0.0.1:{PORT}/files?path={DEST}"
up = timed(["-X", "POST", "-H", "Content-Type: application/octet-stream", "-T", SRC, url])
down = timed(["-H", "Accept-Encoding: identity", url])
h1 = hwm_kb()
mb = lambda s: N / s / 1e6
print(f"raw loopback copy {raw:.2f}s ({mb(raw):.0f} MB/s); upload {up:.2f}s ({mb(up):.0f} MB/s, {raw / up:.2f}x raw); "
      f"download {down:.2f}s ({mb(down):.0f} MB/s, {raw / down:.2f}x raw); guestd VmHWM {h0} -> {h1} kB (+{(h1 - h0) / 1024:.1f} MiB)")
os.remove(DEST)
