"""RegistryClient against a real daemon over mutual TLS on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from regdisc.client import (
    InstanceExists,
    InstanceNotFound,
    InvalidRequest,
    Lease,
    Registered,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
    RequestTimedOut,
    ServiceSummary,
    TLSRefused,
    Token,
    TokenExpired,
    Unauthorized,
)

from regdisc.client.errors import error_from_answer

from .harness import Daemon, LocalPKI, client_for, start_daemon


@pytest.fixture
def local_pki(tmp_path: Path) -> LocalPKI:
    return LocalPKI.create(tmp_path / "pki")


@pytest_twisted.async_yield_fixture
async def daemon(local_pki: LocalPKI) -> Any:
    running = await start_daemon(local_pki, reactor)
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture
async def client(daemon: Daemon, local_pki: LocalPKI) -> Any:
    registry = client_for(daemon, local_pki.client_tls(local_pki.issue("alice")), reactor)
    yield registry
    await registry.close()


@pytest_twisted.ensureDeferred
async def test_every_route(client: RegistryClient) -> None:
    """Each method maps one route and answers value objects."""
    registered = await client.register(
        "web", "10.0.0.1", 8080, instance_id="web-1", ttl=20, metadata={"zone": "a"},
        tags=["blue"], status="starting",
    )
    assert isinstance(registered, Registered)
    assert (registered.instance.id, registered.instance.ttl) == ("web-1", 20)
    assert registered.token not in repr(registered)
    lease = await client.heartbeat("web", "web-1", registered.token)
    assert isinstance(lease, Lease) and lease.ttl == 20
    updated = await client.update("web", "web-1", registered.token, status="up", tags=["green"])
    assert (updated.status, updated.tags) == ("up", ("green",))
    assert await client.services() == [ServiceSummary("web", 1)]
    assert [i.id for i in await client.instances("web", status="up", tags=["green"], metadata={})] == ["web-1"]
    assert await client.instances("web", status="down") == []
    assert (await client.instance("web", "web-1")).status == "up"
    rotated = await client.rotate_token("web", "web-1", registered.token)
    assert isinstance(rotated, Token) and rotated.token != registered.token
    with pytest.raises(Unauthorized) as raised:
        await client.heartbeat("web", "web-1", registered.token)
    assert (raised.value.status, raised.value.code) == (401, "unauthorized")
    removed = await client.deregister("web", "web-1", rotated.token)
    assert removed.id == "web-1"
    with pytest.raises(InstanceNotFound) as missing:
        await client.instance("web", "web-1")
    assert missing.value.status == 404 and "register" in missing.value.message


@pytest_twisted.ensureDeferred
async def test_error_answers_are_typed(client: RegistryClient, daemon: Daemon, local_pki: LocalPKI) -> None:
    """Errors arrive as exceptions carrying code, message, status and details."""
    with pytest.raises(InvalidRequest) as invalid:
        await client.register("web", "h", 0)
    assert invalid.value.details == {"port": "must be an integer from 1 to 65535"}
    await client.register("web", "h", 1, instance_id="x")
    bob = client_for(daemon, local_pki.client_tls(local_pki.issue("bob")), reactor)
    try:
        with pytest.raises(InstanceExists) as exists:
            await bob.register("web", "h", 1, instance_id="x")
        assert exists.value.status == 409
    finally:
        await bob.close()


@pytest.mark.parametrize(
    "status, code, kind",
    [
        (400, "invalid_request", InvalidRequest),
        (400, "invalid_json", InvalidRequest),
        (401, "unauthorized", Unauthorized),
        (401, "token_expired", TokenExpired),
        (404, "instance_not_found", InstanceNotFound),
        (409, "instance_exists", InstanceExists),
        (503, "backend_unavailable", RegistryError),
    ],
)
def test_error_codes_map_to_types(status: int, code: str, kind: type) -> None:
    """Each error code of the API becomes its own exception type."""
    error = error_from_answer(status, {"error": {"code": code, "message": "m", "details": {"a": "b"}}})
    assert type(error) is kind
    assert (error.status, error.code, error.message, error.details) == (status, code, "m", {"a": "b"})


def test_an_answer_without_error_body_is_still_an_error() -> None:
    """A proxy's error page still becomes a RegistryError with the status."""
    error = error_from_answer(502, "<html>")
    assert (type(error), error.status, error.code) == (RegistryError, 502, "bad_answer")


@pytest_twisted.ensureDeferred
async def test_fails_over_to_the_next_url(daemon: Daemon, local_pki: LocalPKI) -> None:
    """A dead URL is skipped, and the one that answered is tried first next time."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    registry = client_for([dead, daemon.url], local_pki.client_tls(local_pki.issue("dave")), reactor)
    try:
        assert await registry.services() == []
        assert registry._current == 1
        assert await registry.services() == []
    finally:
        await registry.close()


@pytest_twisted.ensureDeferred
async def test_all_urls_dead_is_unavailable(local_pki: LocalPKI) -> None:
    """When no URL answers, RegistryUnavailable names the last one tried."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{s.getsockname()[1]}"
    registry = client_for([url], local_pki.client_tls(local_pki.issue("erin")), reactor)
    try:
        with pytest.raises(RegistryUnavailable) as raised:
            await registry.services()
        assert raised.value.url == url and "cannot connect" in raised.value.reason
    finally:
        await registry.close()


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out(local_pki: LocalPKI) -> None:
    """A peer that accepts and never answers fails with RequestTimedOut."""
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory, Protocol

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    registry = client_for(
        [f"https://127.0.0.1:{port.getHost().port}"],
        local_pki.client_tls(local_pki.issue("frank")), reactor, timeout=0.5,
    )
    try:
        with pytest.raises(RequestTimedOut):
            await registry.services()
    finally:
        await registry.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls_refusals_name_the_side(daemon: Daemon, local_pki: LocalPKI, tmp_path: Path) -> None:
    """A foreign client certificate is refused by the registry; a foreign registry by us."""
    foreign = LocalPKI.create(tmp_path / "foreign", "foreign CA")
    from regdisc.client import ClientTLS

    mixed = ClientTLS.from_files(foreign.issue("mallory").cert, foreign.directory / "mallory-key.pem", local_pki.ca)
    registry = client_for(daemon, mixed, reactor)
    try:
        with pytest.raises(TLSRefused) as by_registry:
            await registry.services()
        assert by_registry.value.side == "registry"
    finally:
        await registry.close()
    distrustful = ClientTLS.from_files(
        local_pki.issue("grace").cert, local_pki.directory / "grace-key.pem", foreign.ca
    )
    registry = client_for(daemon, distrustful, reactor)
    try:
        with pytest.raises(TLSRefused) as by_us:
            await registry.services()
        assert by_us.value.side == "client"
    finally:
        await registry.close()


@pytest_twisted.ensureDeferred
async def test_cancelling_stops_at_once_and_tries_no_other_url(local_pki: LocalPKI) -> None:
    """A cancelled request fails with CancelledError at once; no further URL is tried."""
    from twisted.internet.defer import CancelledError
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import deferLater

    contacted: list[int] = []

    class Silent(Protocol):
        def connectionMade(self) -> None:
            contacted.append(self.transport.getHost().port)

    ports = [
        await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Silent))
        for _ in range(2)
    ]
    urls = [f"https://127.0.0.1:{p.getHost().port}" for p in ports]
    registry = client_for(urls, local_pki.client_tls(local_pki.issue("henry")), reactor, timeout=5)
    try:
        answer = registry.services()
        for _ in range(100):  # bounded: until the first server has the connection
            if contacted:
                break
            await deferLater(reactor, 0.01, lambda: None)
        answer.cancel()
        with pytest.raises(CancelledError):
            await answer
        await deferLater(reactor, 0.1, lambda: None)
        assert contacted == [ports[0].getHost().port]
    finally:
        await registry.close()
        for port in ports:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_stopped_daemon_drops_kept_alive_connections(local_pki: LocalPKI) -> None:
    """After the daemon stops, a pooled connection gets no further answer."""
    running = await start_daemon(local_pki, reactor)
    registry = client_for(running, local_pki.client_tls(local_pki.issue("ivan")), reactor, timeout=2)
    try:
        assert await registry.services() == []
        await running.stop()
        with pytest.raises(RegistryUnavailable):
            await registry.services()
    finally:
        await registry.close()
