"""ServiceWatcher against real daemons over mutual TLS, through an outage and a restart."""

from __future__ import annotations

from pathlib import Path
from random import Random
from typing import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from regdisc.client import RegistryClient, ServiceWatcher

from .harness import Daemon, LocalPKI, client_for, start_daemon

INTERVAL = 0.2
STEP = 0.05
PATIENCE = 5.0
"""The longest any condition is waited for, in seconds."""


@pytest.fixture
def local_pki(tmp_path: Path) -> LocalPKI:
    return LocalPKI.create(tmp_path / "pki")


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` every STEP seconds until it holds; fail after PATIENCE seconds."""
    for _ in range(int(PATIENCE / STEP)):
        if condition():
            return
        await deferLater(reactor, STEP, lambda: None)
    assert condition(), f"not within {PATIENCE:g} s: {what}"


def ids(watcher: ServiceWatcher) -> set[str]:
    return {i.id for i in watcher.instances("web")}


@pytest_twisted.ensureDeferred
async def test_watcher_rides_out_a_daemon_restart(local_pki: LocalPKI) -> None:
    """The watcher serves its last list through an outage and takes the new daemon's list after."""
    daemons: list[Daemon] = [await start_daemon(local_pki, reactor)]
    # Not persistent: a stopped daemon's listener is gone, but a kept-alive
    # connection to it would go on answering.
    registrar = client_for(daemons[0], local_pki.client_tls(local_pki.issue("alice")), reactor, persistent=False)
    reader: RegistryClient = client_for(
        daemons[0], local_pki.client_tls(local_pki.issue("bob")), reactor, persistent=False, timeout=1.0
    )
    watcher = ServiceWatcher(
        reader, ["web"], clock=reactor, interval=INTERVAL, jitter=0.1, backoff_cap=2 * INTERVAL,
        random=Random(5),
    )
    changes: list[set[str]] = []
    watcher.subscribe(lambda service, instances: changes.append({i.id for i in instances}))
    try:
        watcher.startService()
        await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
        await eventually(lambda: ids(watcher) == {"web-1"}, "web-1 seen")
        assert watcher.consecutive_failures("web") == 0
        assert watcher.pick("web").id == "web-1"  # type: ignore[union-attr]

        port = daemons[0].port
        await daemons.pop().stop()
        await eventually(lambda: watcher.consecutive_failures("web") >= 2, "two failed refreshes")
        last = watcher.last_success("web")
        stale = watcher.staleness("web")
        assert ids(watcher) == {"web-1"}
        await eventually(lambda: watcher.staleness("web") > stale + INTERVAL, "staleness growing")  # type: ignore[operator]
        assert watcher.last_success("web") == last and ids(watcher) == {"web-1"}
        assert watcher.pick("web", "round_robin").id == "web-1"  # type: ignore[union-attr]

        daemons.append(await start_daemon(local_pki, reactor, port=port))
        await registrar.register("web", "10.0.0.2", 8080, instance_id="web-2", ttl=60)
        await eventually(lambda: ids(watcher) == {"web-2"}, "web-2 replaces web-1")
        assert watcher.consecutive_failures("web") == 0
        assert watcher.last_success("web") > last  # type: ignore[operator]
        assert watcher.staleness("web") < 2 * INTERVAL  # type: ignore[operator]
        # The new daemon may be polled once before web-2 is registered there.
        assert changes[0] == {"web-1"} and changes[-1] == {"web-2"}
        assert changes[1:-1] in ([], [set()])
    finally:
        watcher.stopService()
        for daemon in daemons:
            await daemon.stop()
        await registrar.close()
        await reader.close()
