"""The ``regdisc`` client verbs, run as real processes against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue

from .harness import Daemon, LocalPKI, client_for, start_daemon


@attrs.frozen
class Result:
    out: str
    err: str
    status: int

    def json(self) -> Any:
        assert self.status == 0, self
        return json.loads(self.out)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def dev_pki(home: Path) -> LocalPKI:
    """A PKI where the daemon's development PKI would be, so the defaults find it."""
    local = LocalPKI.create(home / ".local/share/regdisc/dev-pki")
    local.issue("client")
    return local


@pytest_twisted.async_yield_fixture
async def daemon(dev_pki: LocalPKI) -> Any:
    running = await start_daemon(dev_pki, reactor)
    yield running
    await running.stop()


@pytest.fixture
def env(home: Path, daemon: Daemon) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REGDISC_")}
    return {**clean, "HOME": str(home), "REGDISC_URL": daemon.url}


async def regdisc(env: dict[str, str], *args: str) -> Result:
    """Run ``regdisc ARGS`` as a process, without blocking the reactor."""
    out, err, status = await getProcessOutputAndValue(
        sys.executable, ["-m", "regdisc.cli", *args], env=env, reactor=reactor
    )
    return Result(out.decode(), err.decode(), status)


def one_error_line(result: Result, status: int, *fragments: str) -> None:
    assert result.status == status, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regdisc: error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest_twisted.ensureDeferred
async def test_lifecycle_through_the_command_line(env: dict[str, str]) -> None:
    """register, instances, instance, heartbeat, rotate and deregister work from a shell."""
    empty = await regdisc(env, "services")
    assert (empty.status, empty.out.split()) == (0, ["SERVICE", "INSTANCES"])

    registered = await regdisc(env, "register", "web", "--host", "10.0.0.1", "--port", "8080",
                               "--id", "web-1", "--tag", "blue", "--meta", "zone=a", "--json")
    assert registered.status == 0, registered.err
    token = registered.json()["token"]
    assert registered.json()["instance"]["metadata"] == {"zone": "a"}

    services = await regdisc(env, "services")
    assert services.out.splitlines() == ["SERVICE  INSTANCES", "web      1"]

    table = (await regdisc(env, "instances", "web")).out.splitlines()
    assert table[0].split() == ["ID", "HOST", "PORT", "STATUS", "TTL", "EXPIRES", "TAGS", "METADATA"]
    assert table[1].split()[:5] == ["web-1", "10.0.0.1", "8080", "up", "30"]
    assert table[1].split()[6:] == ["blue", "zone=a"]
    # Columns line up: every row starts its fields where the header does.
    assert table[1].index("10.0.0.1") == table[0].index("HOST")

    shown = await regdisc(env, "instance", "web", "web-1")
    assert "host               10.0.0.1" in shown.out

    beat = await regdisc(env, "heartbeat", "web", "web-1", "--token", token, "--json")
    assert beat.json()["ttl"] == 30

    rotated = await regdisc(env, "rotate", "web", "web-1", "--token", token, "--json")
    new = rotated.json()["token"]
    refused = await regdisc(env, "heartbeat", "web", "web-1", "--token", token)
    one_error_line(refused, 1, "unauthorized (401)")
    assert token not in refused.err

    gone = await regdisc(env, "deregister", "web", "web-1", "--token", new)
    assert gone.out.strip() == "deregistered web/web-1"
    missing = await regdisc(env, "instance", "web", "web-1")
    one_error_line(missing, 1, "instance_not_found (404)")


@pytest_twisted.ensureDeferred
async def test_token_from_the_environment(env: dict[str, str]) -> None:
    """REGDISC_TOKEN stands in for --token, keeping it out of process listings."""
    token = (await regdisc(env, "register", "web", "--host", "h", "--port", "1", "--id", "x",
                           "--json")).json()["token"]
    beat = await regdisc({**env, "REGDISC_TOKEN": token}, "heartbeat", "web", "x")
    assert beat.status == 0, beat.err


@pytest_twisted.ensureDeferred
async def test_instance_filters(env: dict[str, str]) -> None:
    """--status, --tag and --meta narrow the instance list."""
    for name, status, tag, zone in (("a", "up", "x", "1"), ("b", "down", "x", "2"),
                                    ("c", "up", "y", "1")):
        result = await regdisc(env, "register", "web", "--host", "h", "--port", "1", "--id", name,
                               "--status", status, "--tag", tag, "--meta", f"zone={zone}")
        assert result.status == 0, result.err

    async def ids(*filters: str) -> list[str]:
        result = await regdisc(env, "instances", "web", "--json", *filters)
        return [i["id"] for i in result.json()]

    assert await ids("--status", "up") == ["a", "c"]
    assert await ids("--tag", "x") == ["a", "b"]
    assert await ids("--meta", "zone=1", "--tag", "x") == ["a"]


@pytest_twisted.ensureDeferred
async def test_bad_input_is_one_line(env: dict[str, str]) -> None:
    """A registration the registry refuses is reported on one line with the fields."""
    result = await regdisc(env, "register", "Web", "--host", "h", "--port", "0")
    one_error_line(result, 1, "invalid_request (400)", "service")


@pytest_twisted.ensureDeferred
async def test_unreachable_registry(env: dict[str, str]) -> None:
    """An unreachable registry exits 3 with one line naming the URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{s.getsockname()[1]}"
    result = await regdisc(env, "services", "--url", url)
    one_error_line(result, 3, url, "cannot connect")


@pytest_twisted.ensureDeferred
async def test_tls_failures_name_the_side(env: dict[str, str], tmp_path: Path) -> None:
    """A TLS failure says whether the registry refused us or we refused it."""
    foreign = LocalPKI.create(tmp_path / "foreign", "foreign CA")
    stranger = foreign.issue("stranger")
    dev = Path(env["HOME"]) / ".local/share/regdisc/dev-pki"
    refused_by_registry = await regdisc(env, "services", "--cert", str(stranger.cert),
                                        "--key", str(stranger.key), "--ca", str(dev / "ca.pem"))
    one_error_line(refused_by_registry, 3, "the registry refused our client certificate")
    refused_by_us = await regdisc(env, "services", "--ca", str(foreign.ca))
    one_error_line(refused_by_us, 3, "we refused the registry's certificate")
    missing = await regdisc(env, "services", "--cert", str(tmp_path / "nothing.pem"))
    one_error_line(missing, 3, "nothing.pem")


@pytest_twisted.ensureDeferred
async def test_failover_between_urls(env: dict[str, str], daemon: Daemon) -> None:
    """Several URLs in REGDISC_URL are tried in turn."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    result = await regdisc({**env, "REGDISC_URL": f"{dead},{daemon.url}"}, "services")
    assert result.status == 0, result.err


@pytest_twisted.ensureDeferred
async def test_usage_errors_and_help(env: dict[str, str]) -> None:
    """Usage errors exit 2; --help works on every verb."""
    assert (await regdisc(env, "register", "web")).status == 2
    assert (await regdisc(env, "instances", "web", "--meta", "novalue")).status == 2
    for verb in ("services", "instances", "instance", "register", "heartbeat", "rotate",
                 "deregister", "pki"):
        result = await regdisc(env, verb, "--help")
        assert result.status == 0 and result.out.startswith("usage: regdisc " + verb)


class _KeepAlive(ProcessProtocol):
    def __init__(self) -> None:
        self.started: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.err = b""

    def errReceived(self, data: bytes) -> None:
        self.err += data
        if b"keeping" in self.err and not self.started.called:
            self.started.callback(None)

    def processEnded(self, reason: Any) -> None:
        if not self.started.called:
            self.started.errback(reason)
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_keep_alive_until_interrupted(env: dict[str, str], daemon: Daemon, dev_pki: LocalPKI) -> None:
    """register --keep-alive keeps the instance registered until SIGINT, then deregisters."""
    protocol = _KeepAlive()
    process = reactor.spawnProcess(
        protocol, sys.executable,
        [sys.executable, "-m", "regdisc.cli", "register", "web", "--host", "h", "--port", "1",
         "--id", "kept", "--ttl", "2", "--keep-alive"],
        env=env,
    )
    observer = client_for(daemon, dev_pki.client_tls(dev_pki.issue("observer")), reactor)
    try:
        protocol.started.addTimeout(30, reactor)
        await protocol.started
        # The registration is made right after the announcement; wait for it, bounded.
        from twisted.internet.task import deferLater

        for _ in range(100):
            if [i.id for i in await observer.instances("web")] == ["kept"]:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert [i.id for i in await observer.instances("web")] == ["kept"]
        process.signalProcess(signal.SIGINT)
        protocol.ended.addTimeout(30, reactor)
        assert await protocol.ended == 0, protocol.err
        assert await observer.instances("web") == []
    finally:
        await observer.close()
        if not protocol.ended.called:
            process.signalProcess(signal.SIGKILL)


def test_tokens_never_look_like_options() -> None:
    """Tokens start with a fixed prefix, so a command line never takes one for an option."""
    from regdisc.tokens import new_token

    assert all(new_token().startswith("rdt_") for _ in range(1000))
