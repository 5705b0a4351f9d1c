"""InstanceRegistration against real daemons over mutual TLS: a restart, and a hundred at once."""

from __future__ import annotations

from pathlib import Path
from random import Random
from typing import Any, Awaitable, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs

from regdisc.client import InstanceRegistration, RegistryClient

from .harness import Daemon, LocalPKI, client_for, start_daemon

TTL = 2
FRACTION = 1 / 3
JITTER = 0.1
BACKOFF_BASE = 0.2
BACKOFF_CAP = 1.0
STEP = 0.1
PATIENCE = 5.0
"""The longest any condition is waited for, in seconds."""

SHORT_LEASES = {"REGDISC_MIN_TTL": "1"}


@pytest.fixture
def local_pki(tmp_path: Path) -> LocalPKI:
    return LocalPKI.create(tmp_path / "pki")


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> float:
    """Poll ``condition`` every STEP seconds until it holds; fail after PATIENCE seconds.

    Returns the reactor's time when it held.
    """
    deadline = reactor.seconds() + PATIENCE
    while reactor.seconds() < deadline:
        if await condition():
            return reactor.seconds()
        await deferLater(reactor, STEP, lambda: None)
    assert await condition(), f"not within {PATIENCE:g} s: {what}"
    return reactor.seconds()


async def ids(reader: RegistryClient) -> set[str]:
    return {i.id for i in await reader.instances("web")}


def registration(client: Any, name: str, seed: int, stop_timeout: float = 2.0) -> InstanceRegistration:
    return InstanceRegistration(
        client, "web", "10.0.0.1", 8080, clock=reactor, instance_id=name, ttl=TTL,
        heartbeat_fraction=FRACTION, jitter=JITTER, backoff_base=BACKOFF_BASE,
        backoff_cap=BACKOFF_CAP, stop_timeout=stop_timeout, random=Random(seed),
    )


@pytest_twisted.ensureDeferred
async def test_a_registration_survives_a_daemon_restart(local_pki: LocalPKI) -> None:
    """After a restart loses every lease, the instance is back within a heartbeat plus backoff."""
    daemons: list[Daemon] = [await start_daemon(local_pki, reactor, **SHORT_LEASES)]
    # Kept-alive connections, as in production: a stopped daemon drops them.
    registrar = client_for(daemons[0], local_pki.client_tls(local_pki.issue("alice")), reactor, timeout=1.0)
    reader = client_for(daemons[0], local_pki.client_tls(local_pki.issue("bob")), reactor, timeout=1.0)
    web = registration(registrar, "web-1", seed=3)
    try:
        with capturedLogs() as captured:
            web.startService()
            await eventually(lambda: _true(web.registered), "registered")
            assert await ids(reader) == {"web-1"}

            port = daemons[0].port
            await daemons.pop().stop()
            stopped_at = reactor.seconds()
            daemons.append(await start_daemon(local_pki, reactor, port=port, **SHORT_LEASES))
            back_at = await eventually(
                lambda: _contains(reader, "web-1"), "web-1 registered with the new daemon"
            )
            await eventually(lambda: _true(web.consecutive_failures == 0), "a success after the restart")
            await web.stopService()
            assert not web.registered
            assert await ids(reader) == set()

        # One heartbeat interval, then at most one backoff if the heartbeat
        # met the daemon down; plus the poll's step and its round trips.
        allowed = TTL * FRACTION * (1 + JITTER) + BACKOFF_CAP + STEP + 0.3
        assert back_at - stopped_at <= allowed
        events = [e.get("event") for e in captured]
        assert events.count("registration.registered") == 1
        assert events.count("registration.reregistered") == 1
        assert events.count("registration.deregistered") == 1
        assert "registration.deregister_failed" not in events
    finally:
        await web.stopService()
        for daemon in daemons:
            await daemon.stop()
        await registrar.close()
        await reader.close()


@pytest_twisted.ensureDeferred
async def test_a_hundred_registrations_stay_registered(local_pki: LocalPKI) -> None:
    """A hundred registrations sharing one client heartbeat and rotate tokens for three TTLs without a failure."""
    daemon = await start_daemon(local_pki, reactor, REGDISC_TOKEN_TTL="4", **SHORT_LEASES)
    shared = client_for(daemon, local_pki.client_tls(local_pki.issue("fleet")), reactor)
    reader = client_for(daemon, local_pki.client_tls(local_pki.issue("reader")), reactor)
    fleet = [registration(shared, f"web-{n}", seed=n, stop_timeout=5.0) for n in range(100)]
    try:
        with capturedLogs() as captured:
            for member in fleet:
                member.startService()
            await eventually(lambda: _true(all(m.registered for m in fleet)), "all registered")
            started = reactor.seconds()
            await deferLater(reactor, 3 * TTL, lambda: None)

            assert [m.consecutive_failures for m in fleet] == [0] * 100
            assert all(m.last_success is not None and m.last_success > started + 2 * TTL for m in fleet)
            assert len(await reader.instances("web")) == 100

            await gatherResults([m.stopService() for m in fleet])
            assert await reader.instances("web") == []

        names = [e.get("event") for e in captured]
        assert "registration.failed" not in names
        assert "registration.deregister_failed" not in names
        assert names.count("registration.registered") == 100
        assert names.count("registration.deregistered") == 100
        rotated = {e["instance_id"] for e in captured if e.get("event") == "registration.token_rotated"}
        assert len(rotated) == 100  # a 4 s token is rotated at 3.2 s
    finally:
        await gatherResults([m.stopService() for m in fleet])
        await daemon.stop()
        await shared.close()
        await reader.close()


async def _true(value: bool) -> bool:
    return value


async def _contains(reader: RegistryClient, instance_id: str) -> bool:
    return instance_id in await ids(reader)
