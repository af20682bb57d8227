"""Several sandboxes at once: three containers started and driven concurrently from threads, each
through its own SDK sandbox; each sees only its own files and processes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

N = 3


def test_three_containers_driven_concurrently_are_isolated(containers, template_image):
    with ThreadPoolExecutor(N) as pool:
        boxes = list(pool.map(lambda _: containers.start(template_image), range(N)))
    assert len({b.port for b in boxes}) == N
    barrier = threading.Barrier(N)

    def drive(i: int) -> dict:
        box = boxes[i]
        sbx = box.sandbox()
        me = f"box{i}-{box.hostname}"
        barrier.wait(timeout=30)  # every sandbox works at the same time
        sbx.files.write(f"/home/user/{me}.txt", f"written by {me}\n" * 100)
        sleeper = sbx.commands.run(f"exec -a {me} sleep 300", background=True)
        results = {
            "hostname": sbx.commands.run("hostname").stdout.strip(),
            "files": sorted(e.name for e in sbx.files.list("/home/user") if e.name.endswith(".txt")),
            "content": sbx.files.read(f"/home/user/{me}.txt"),
            "sleepers": sorted(
                p.args[-1].split()[2] for p in sbx.commands.list() if p.args and "exec -a box" in p.args[-1]
            ),
            "ps": sbx.commands.run("for c in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $c; echo; done").stdout,
        }
        for _ in range(20):  # a little sustained traffic on all three at once
            assert sbx.commands.run(f"echo {me}").stdout == f"{me}\n"
        sleeper.kill()
        return {"me": me, **results}

    with ThreadPoolExecutor(N) as pool:
        seen = list(pool.map(drive, range(N)))

    names = [s["me"] for s in seen]
    for i, s in enumerate(seen):
        me = s["me"]
        assert s["hostname"] == boxes[i].hostname, "the sandbox talks to its own container"
        assert s["files"] == [f"{me}.txt"], f"{me} sees files of others: {s['files']}"
        assert s["content"] == f"written by {me}\n" * 100
        assert s["sleepers"] == [me], f"{me} lists processes of others: {s['sleepers']}"
        others = [n for n in names if n != me]
        assert me in s["ps"] and not any(o in s["ps"] for o in others), s["ps"]
