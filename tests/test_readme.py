"""README.rst's two commands are true: CI runs the test command, and the run command works."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def named_block(name: str) -> str:
    """The one-line body of the README's code block with ``:name: name``."""
    text = (ROOT / "README.rst").read_text()
    match = re.search(
        rf"\.\. code-block:: shell\n   :name: {name}\n\n   (?P<command>.+)\n", text
    )
    assert match, f"README.rst has no code block named {name}"
    return match["command"].strip()


def test_readme_is_valid_restructuredtext() -> None:
    """README.rst parses without a warning, so it renders as written."""
    import docutils.core

    docutils.core.publish_doctree(
        (ROOT / "README.rst").read_text(),
        settings_overrides={"halt_level": 2, "report_level": 5},
    )


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run's last command is the README's test command."""
    lines = [
        line.strip()
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert lines[-1] == named_block("test-command")


def test_test_command_installs_the_test_extras() -> None:
    """The test command installs the project with its test extras before pytest."""
    assert named_block("test-command") == "./scripts/run-tests"
    script = (ROOT / "scripts/run-tests").read_text()
    assert "pip install" in script and "'.[test]'" in script
    assert script.rstrip().endswith('-m pytest "$@"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_checkout(destination: Path) -> None:
    """The project's files, as a fresh clone would have them."""
    ignored = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis", "dropin.cache")
    shutil.copytree(ROOT, destination, ignore=ignored)


def wait_for_listening(process: subprocess.Popen[str], deadline: float) -> list[str]:
    """Read the daemon's output until it says it listens; bounded by ``deadline``."""
    seen: list[str] = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "starting on" in line:
            return seen
    raise AssertionError("the daemon did not start:\n" + "".join(seen[-40:]))


def call(
    context: ssl.SSLContext, port: int, method: str, path: str,
    body: Any = None, token: str | None = None,
) -> tuple[int, Any]:
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    headers = {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, "/registry" + path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_run_command_serves_a_round_trip(tmp_path: Path) -> None:
    """The README's run command, on a fresh folder, installs and serves register to deregister."""
    checkout, home = tmp_path / "regdisc", tmp_path / "home"
    copy_checkout(checkout)
    home.mkdir()
    port = free_port()
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("REGDISC_", "VIRTUAL_ENV", "PYTHON"))
    }
    env.update(HOME=str(home), REGDISC_PORT=str(port), REGDISC_LOG_FORMAT="json")
    process = subprocess.Popen(
        ["bash", "-c", named_block("run-command")],
        cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output = wait_for_listening(process, time.monotonic() + 600)
        pki = home / ".local/share/regdisc/dev-pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client-key.pem"))

        status, body = call(context, port, "POST", "/services/web/instances",
                            {"id": "web-1", "host": "10.0.0.5", "port": 8080, "ttl": 30})
        assert status == 201, body
        token = body["data"]["token"]
        status, body = call(context, port, "PUT", "/services/web/instances/web-1/heartbeat",
                            token=token)
        assert (status, body["data"]["ttl"]) == (200, 30)
        status, body = call(context, port, "GET", "/services/web/instances")
        assert [i["id"] for i in body["data"]["instances"]] == ["web-1"]
        status, body = call(context, port, "DELETE", "/services/web/instances/web-1",
                            token=token)
        assert status == 200
        status, body = call(context, port, "GET", "/services")
        assert body == {"data": {"services": []}}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    lines = [json.loads(line) for line in (output + rest.splitlines(True))
             if line.startswith("{")]
    events = [line.get("event") for line in lines]
    assert "tls.development_pki" in events
    assert "instance.registered" in events and "instance.deregistered" in events
    assert token not in "".join(output) + rest


def test_setup_cfg_lists_every_package() -> None:
    """Every package folder under regdisc/ is listed for installation, with the drop-in."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "regdisc").rglob("__init__.py")
    }
    assert listed == found | {"twisted.plugins"}
