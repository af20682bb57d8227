"""What the Python test tiers (tests/sdk, tests/containers) share: waiting for a condition and
choosing a free loopback port. Both tiers put this directory on `sys.path` (`pythonpath` in
their pytest.ini; tests/containers/bench.py, a script, adds it itself)."""

from __future__ import annotations

import random
import socket
import time
from typing import Callable

# Below Linux's default ephemeral range (32768-60999): a port chosen here cannot collide with
# the source port of some outgoing connection made meanwhile.
PORT_RANGE = (20000, 32000)


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Polls `cond` every `interval` s until it holds (True) or `timeout` s pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def free_port() -> int:
    """A loopback port nothing listens on now, chosen before the server starts (as an
    orchestrator does) rather than read back from it."""
    for port in random.sample(range(*PORT_RANGE), 500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")
