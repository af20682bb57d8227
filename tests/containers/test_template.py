"""What a user of an E2B-style template does first, against guestd inside the template image
(packaging/docker/template: Debian, user `user` with passwordless sudo, python3 with pip):
upload files, run a script, install a package at runtime, use sudo, get env vars from /init.

One container serves the whole module, as one sandbox serves a user's session."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile

import pytest


@pytest.fixture(scope="module")
def box(module_containers, template_image):
    return module_containers.start(template_image)


@pytest.fixture(scope="module")
def sbx(box):
    return box.sandbox()


CONFIG = {"greeting": "hello", "names": ["ada", "grace", "linus"], "repeat": 2}

# The seed page's script: reads the uploaded config next to it, prints what it computed.
SCRIPT = """\
import json, os

with open("config.json") as f:
    config = json.load(f)
for name in config["names"]:
    print(f"{config['greeting']}, {name}!" * config["repeat"])
print("cwd", os.getcwd(), "user", os.environ["USER"])
"""


def test_seed_page_upload_config_and_script_then_run_it(sbx):
    cfg = sbx.files.write("/home/user/config.json", json.dumps(CONFIG))
    script = sbx.files.write("/home/user/main.py", SCRIPT)
    assert (cfg.path, script.path) == ("/home/user/config.json", "/home/user/main.py")

    result = sbx.commands.run("python3 main.py", cwd="/home/user")

    assert result.exit_code == 0
    assert result.stderr == ""
    assert result.stdout == (
        "hello, ada!hello, ada!\n"
        "hello, grace!hello, grace!\n"
        "hello, linus!hello, linus!\n"
        "cwd /home/user user user\n"
    )
    # Uploaded files belong to the sandbox user, so the user's programs can rewrite them.
    owners = sbx.commands.run("stat -c '%U:%G %n' config.json main.py", cwd="/home/user").stdout
    assert owners == "user:user config.json\nuser:user main.py\n"
    assert json.loads(sbx.files.read("/home/user/config.json")) == CONFIG


def _wheel(name: str, version: str, module_source: str) -> tuple[str, bytes]:
    """A pure-Python wheel built in memory (PEP 427): no build backend, no network."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module_source.encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: guestd-container-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ).encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


def test_pip_install_of_an_uploaded_wheel_then_import_it(sbx):
    filename, wheel = _wheel(
        "guestd_probe", "1.2.3", "def hello(who):\n    return f'hello {who} from ' + __name__\n"
    )
    info = sbx.files.write(f"/home/user/{filename}", wheel)
    assert info.path == f"/home/user/{filename}"
    assert sbx.files.read(info.path, format="bytes") == wheel

    install = sbx.commands.run(f"pip install /home/user/{filename}")
    assert "Successfully installed guestd_probe-1.2.3" in install.stdout.replace("guestd-probe", "guestd_probe")

    run = sbx.commands.run(
        "python3 -c 'import guestd_probe, importlib.metadata as m; "
        'print(guestd_probe.hello("user")); print(m.version("guestd_probe"))\''
    )
    assert run.stdout == "hello user from guestd_probe\n1.2.3\n"
    # Installed for `user` (no root needed), under the user's home.
    where = sbx.commands.run("python3 -c 'import guestd_probe; print(guestd_probe.__file__)'").stdout
    assert where.startswith("/home/user/.local/lib/python3"), where


def test_sudo_works_for_user(sbx):
    result = sbx.commands.run("id -un; sudo id -u; sudo -n id -un")
    assert result.stdout == "user\n0\nroot\n"


ENV_SCRIPT = """\
import json, os
print(json.dumps({k: os.environ.get(k) for k in ("GREETING", "API_URL", "EMPTY", "UNSET")}))
"""


def test_init_env_vars_reach_os_environ_of_a_script(box, sbx):
    sbx.files.write("/home/user/env_check.py", ENV_SCRIPT)
    box.post_init({"envVars": {"GREETING": "héllo from /init", "API_URL": "http://example.test/v1?a=1&b=2", "EMPTY": ""}})

    out = sbx.commands.run("python3 env_check.py", cwd="/home/user").stdout

    assert json.loads(out) == {
        "GREETING": "héllo from /init",
        "API_URL": "http://example.test/v1?a=1&b=2",
        "EMPTY": "",
        "UNSET": None,
    }
    # A background command gets them too, and a request's own env var wins over /init's.
    handle = sbx.commands.run(
        "python3 env_check.py", cwd="/home/user", background=True, envs={"GREETING": "from the request"}
    )
    assert json.loads(handle.wait().stdout)["GREETING"] == "from the request"
