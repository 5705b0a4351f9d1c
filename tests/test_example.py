"""The README's client example runs as documented, under twistd, against a real daemon."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater

from .harness import LocalPKI, client_for, start_daemon

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples/hello.tac"


def test_readme_shows_the_example_as_it_is() -> None:
    """README.rst carries examples/hello.tac word for word."""
    readme = (ROOT / "README.rst").read_text()
    indented = "\n".join(("   " + line) if line else "" for line in EXAMPLE.read_text().splitlines())
    assert indented in readme


class _Twistd(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


async def until(predicate: Any, seconds: float = 15.0) -> None:
    """Poll ``predicate`` (an async callable) every 0.05 s, at most ``seconds``."""
    for _ in range(int(seconds / 0.05)):
        if await predicate():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not reached in time")


@pytest_twisted.ensureDeferred
async def test_hello_registers_itself_and_discovers_a_greeter(tmp_path: Path) -> None:
    """hello.tac registers as hello, serves a greeter it discovered, and deregisters on stop."""
    home = tmp_path / "home"
    dev_pki = LocalPKI.create(home / ".local/share/regdisc/dev-pki")
    dev_pki.issue("client")
    daemon = await start_daemon(dev_pki, reactor)
    observer = client_for(daemon, dev_pki.client_tls(dev_pki.issue("observer")), reactor)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGDISC_")}
    env.update(HOME=str(home), REGDISC_URL=daemon.url, HELLO_PORT=str(port))
    twistd = _Twistd()
    process = reactor.spawnProcess(
        twistd, sys.executable,
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "-y", str(EXAMPLE)],
        env=env, path=str(tmp_path),
    )
    try:
        await observer.register("greeter", "10.0.0.9", 7000, instance_id="g1", ttl=60)

        async def registered() -> bool:
            return [i.id for i in await observer.instances("hello")] != []

        await until(registered)
        [hello] = await observer.instances("hello")
        assert (hello.host, hello.port) == ("127.0.0.1", port)

        async def greets() -> bool:
            response = await treq.get(f"http://127.0.0.1:{port}/", timeout=5)
            return "10.0.0.9:7000" in await response.text()

        await until(greets)
        process.signalProcess(signal.SIGTERM)
        twistd.ended.addTimeout(30, reactor)
        await twistd.ended
        assert await observer.instances("hello") == [], twistd.output.decode()
    finally:
        if not twistd.ended.called:
            process.signalProcess(signal.SIGKILL)
        await observer.close()
        await daemon.stop()
