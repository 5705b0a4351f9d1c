"""ServiceWatcher against real daemons over mutual TLS: changes pushed by held queries, an outage, a restart."""

from __future__ import annotations

from pathlib import Path
from random import Random
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs

from regdisc.client import RegistryClient, ServiceWatcher

from .harness import Daemon, LocalPKI, client_for, start_daemon

WAIT = 30.0
"""The watchers' wait: far longer than any test, so only a change can end a held query."""
BACKOFF = 0.1
STEP = 0.02
PATIENCE = 5.0
"""The longest any condition is waited for, in seconds."""


@pytest.fixture
def local_pki(tmp_path: Path) -> LocalPKI:
    return LocalPKI.create(tmp_path / "pki")


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Check ``condition`` every STEP seconds until it holds; fail after PATIENCE seconds."""
    for _ in range(int(PATIENCE / STEP)):
        if condition():
            return
        await deferLater(reactor, STEP, lambda: None)
    assert condition(), f"not within {PATIENCE:g} s: {what}"


def ids(watcher: ServiceWatcher) -> set[str]:
    return {i.id for i in watcher.instances("web")}


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e.get("event") == name]


@pytest_twisted.ensureDeferred
async def test_watcher_sees_changes_within_a_round_trip(local_pki: LocalPKI) -> None:
    """With a 30 s wait and no polling, registrations and removals reach the watcher in well under a second."""
    daemon = await start_daemon(local_pki, reactor)
    registrar = client_for(daemon, local_pki.client_tls(local_pki.issue("alice")), reactor)
    reader = client_for(daemon, local_pki.client_tls(local_pki.issue("bob")), reactor, timeout=1.0)
    watcher = ServiceWatcher(reader, ["web"], clock=reactor, wait=WAIT, random=Random(5))
    seen: list[tuple[float, set[str]]] = []
    watcher.subscribe(lambda service, instances: seen.append((reactor.seconds(), {i.id for i in instances})))
    try:
        with capturedLogs() as captured:
            watcher.startService()
            await eventually(lambda: watcher.index("web") is not None, "the first answer")
            assert watcher.index("web") == 0 and ids(watcher) == set()
            # Let the blocking query reach the registry and be held there.
            await deferLater(reactor, 0.2, lambda: None)

            started = reactor.seconds()
            registered = await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
            await eventually(lambda: ids(watcher) == {"web-1"}, "web-1 seen")
            assert seen[-1][0] - started < 1.0
            first = watcher.index("web")
            assert first is not None and first > 0

            started = reactor.seconds()
            await registrar.deregister("web", "web-1", registered.token)
            await eventually(lambda: ids(watcher) == set(), "web-1 gone")
            assert seen[-1][0] - started < 1.0
            assert watcher.index("web") > first  # type: ignore[operator]
        assert [s for _, s in seen] == [{"web-1"}, set()]
        assert watcher.consecutive_failures("web") == 0
        assert events(captured, "watcher.not_held") == []
        assert events(captured, "watcher.refresh_failed") == []
    finally:
        watcher.stopService()
        await daemon.stop()
        await registrar.close()
        await reader.close()


@pytest_twisted.ensureDeferred
async def test_held_queries_come_back_after_the_wait(local_pki: LocalPKI) -> None:
    """An idle service's held query answers after each wait: staleness stays near the wait, the index still."""
    daemon = await start_daemon(local_pki, reactor)
    reader = client_for(daemon, local_pki.client_tls(local_pki.issue("bob")), reactor, timeout=1.0)
    watcher = ServiceWatcher(reader, ["web"], clock=reactor, wait=0.3, random=Random(5))
    try:
        with capturedLogs() as captured:
            watcher.startService()
            await eventually(lambda: watcher.last_success("web") is not None, "the first answer")
            arrivals = {watcher.last_success("web")}
            for _ in range(int(1.5 / STEP)):
                await deferLater(reactor, STEP, lambda: None)
                arrivals.add(watcher.last_success("web"))
                assert watcher.staleness("web") < 0.3 * 17 / 16 + 0.5  # type: ignore[operator]
        assert 3 <= len(arrivals) <= 7  # about one answer per 0.3 s, not a tight loop
        assert watcher.index("web") == 0 and watcher.consecutive_failures("web") == 0
        assert events(captured, "watcher.not_held") == []
    finally:
        watcher.stopService()
        await daemon.stop()
        await reader.close()


@pytest_twisted.ensureDeferred
async def test_watcher_rides_out_a_daemon_restart(local_pki: LocalPKI) -> None:
    """The watcher serves its last list through an outage and takes the new daemon's list and lower index after."""
    daemons: list[Daemon] = [await start_daemon(local_pki, reactor)]
    # Not persistent: a stopped daemon's listener is gone, but a kept-alive
    # connection to it would go on answering.
    registrar = client_for(daemons[0], local_pki.client_tls(local_pki.issue("alice")), reactor, persistent=False)
    reader: RegistryClient = client_for(
        daemons[0], local_pki.client_tls(local_pki.issue("bob")), reactor, persistent=False, timeout=1.0
    )
    watcher = ServiceWatcher(
        reader, ["web"], clock=reactor, wait=WAIT, backoff_base=BACKOFF, backoff_cap=4 * BACKOFF,
        random=Random(5),
    )
    changes: list[set[str]] = []
    watcher.subscribe(lambda service, instances: changes.append({i.id for i in instances}))
    try:
        with capturedLogs() as captured:
            watcher.startService()
            await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
            await eventually(lambda: ids(watcher) == {"web-1"}, "web-1 seen")
            # Churn another instance so the old registry's index of web is well ahead of a new one's.
            for _ in range(3):
                churn = await registrar.register("web", "10.0.0.9", 8080, instance_id="web-x", ttl=60)
                await registrar.deregister("web", "web-x", churn.token)
            # Seven visible changes, each at a revision of its own.
            await eventually(lambda: watcher.index("web") >= 7, "the churn seen")  # type: ignore[operator]
            assert ids(watcher) == {"web-1"}
            old_index = watcher.index("web")
            assert watcher.consecutive_failures("web") == 0
            assert watcher.pick("web").id == "web-1"  # type: ignore[union-attr]

            seen_before = len(changes)
            port = daemons[0].port
            await daemons.pop().stop()  # this drops the held query's connection
            await eventually(lambda: watcher.consecutive_failures("web") >= 2, "two failed queries")
            last = watcher.last_success("web")
            stale = watcher.staleness("web")
            assert ids(watcher) == {"web-1"} and watcher.index("web") == old_index
            await eventually(lambda: watcher.staleness("web") > stale + 0.2, "staleness growing")  # type: ignore[operator]
            assert watcher.last_success("web") == last and ids(watcher) == {"web-1"}
            assert watcher.pick("web", "round_robin").id == "web-1"  # type: ignore[union-attr]

            daemons.append(await start_daemon(local_pki, reactor, port=port))
            await registrar.register("web", "10.0.0.2", 8080, instance_id="web-2", ttl=60)
            await eventually(lambda: ids(watcher) == {"web-2"}, "web-2 replaces web-1")
            assert watcher.consecutive_failures("web") == 0
            assert watcher.last_success("web") > last  # type: ignore[operator]
            assert watcher.staleness("web") < 1.0  # type: ignore[operator]
            assert 0 < watcher.index("web") < old_index  # type: ignore[operator]
        [reset] = events(captured, "watcher.index_reset")
        assert reset["held"] == old_index and reset["index"] < old_index
        # The churn was followed (each state, unless two changes beat one round
        # trip); the outage changed nothing; the new daemon may answer once
        # before web-2 is registered there.
        assert changes[0] == {"web-1"} and changes[seen_before - 1] == {"web-1"}
        assert all(c in ({"web-1"}, {"web-1", "web-x"}) for c in changes[:seen_before])
        assert changes[seen_before:] in ([{"web-2"}], [set(), {"web-2"}])
    finally:
        watcher.stopService()
        for daemon in daemons:
            await daemon.stop()
        await registrar.close()
        await reader.close()
