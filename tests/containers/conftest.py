"""Fixtures for the container tier: guestd baked into an image, PID 1 of a Docker container, driven
from the host with the real E2B SDK in debug mode.

* `containers` starts containers (`docker run -d`, port 49983 published on 127.0.0.1 at a port
  Docker picks, labelled with the run id so scripts/test-containers.sh can remove leftovers) and
  waits for `GET /health` → 204. Every container it started is removed at teardown; a failed
  test gets the container's log (guestd's stderr) in its report.
* `Container.sandbox()` is `Sandbox.create()` with `E2B_DEBUG=true` and `E2B_SANDBOX_URL` set to
  that container's URL. The SDK reads the URL once, at creation, and keeps it: creation is
  serialised by a lock, so threads can drive several containers at once.

Images come from the environment scripts/test-containers.sh sets: GUESTD_TEMPLATE_IMAGE,
GUESTD_STARTCMD_IMAGE, GUESTD_SCRATCH_IMAGE, GUESTD_OPENRC_IMAGE; GUESTD_DOCKER is the docker CLI;
GUESTD_CONTAINER_RUN labels the containers.
"""

from __future__ import annotations

import os
import uuid

import pytest

from helpers import ContainerFactory, docker

RUN = os.environ.get("GUESTD_CONTAINER_RUN") or f"pytest-{uuid.uuid4().hex[:8]}"


def _image(var: str) -> str:
    image = os.environ.get(var)
    if not image:
        pytest.fail(
            f"{var} is not set: run the container tier through scripts/test-containers.sh "
            "(it starts Docker, builds the images and sets the environment)",
            pytrace=False,
        )
    return image


@pytest.fixture(scope="session", autouse=True)
def sdk_env():
    """Debug mode for every Sandbox; loopback never through a proxy."""
    mp = pytest.MonkeyPatch()
    mp.setenv("E2B_DEBUG", "true")
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    mp.setenv("NO_PROXY", no_proxy)
    mp.setenv("no_proxy", no_proxy)
    # docker itself must answer before any test runs.
    version = docker("version", "-f", "{{.Server.Version}}", timeout=30).stdout.strip()
    print(f"\ncontainer tier: run {RUN}, Docker engine {version}")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def template_image() -> str:
    return _image("GUESTD_TEMPLATE_IMAGE")


@pytest.fixture(scope="session")
def startcmd_image() -> str:
    return _image("GUESTD_STARTCMD_IMAGE")


@pytest.fixture(scope="session")
def scratch_image() -> str:
    return _image("GUESTD_SCRATCH_IMAGE")


@pytest.fixture(scope="session")
def openrc_image() -> str:
    return _image("GUESTD_OPENRC_IMAGE")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def _failed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture
def containers(request):
    """Starts containers for one test; removes them after it (logs shown if the test failed)."""
    factory = ContainerFactory(RUN, request.node.name)
    yield factory
    factory.close(dump_logs=_failed(request))


@pytest.fixture(scope="module")
def module_containers(request):
    """Like `containers`, shared by a module's tests; logs are dumped if any of them failed."""
    factory = ContainerFactory(RUN, request.module.__name__)
    yield factory
    factory.close(dump_logs=request.session.testsfailed > 0)
