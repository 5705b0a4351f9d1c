"""Two registry daemons sharing one etcd, over mutual TLS, as a client sees them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from regdisc.client import RegistryClient, RegistryError

from .etcd_harness import etcd_cluster  # noqa: F401 (a fixture)
from .harness import LocalPKI, client_for, start_daemon


async def until(check: Callable[[], Any], seconds: float = 10.0) -> None:
    """Poll ``check`` every 20 ms, for at most ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if await check():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition not reached in time")


async def loaded(client: RegistryClient) -> bool:
    """Whether the daemon behind ``client`` has loaded the registry (no 503 on discovery)."""
    try:
        await client.services()
    except RegistryError as e:
        if e.code == "backend_unavailable":
            return False
        raise
    return True


@pytest_twisted.async_yield_fixture
async def two_nodes(tmp_path: Path, etcd_cluster: Callable[..., Any]) -> Any:  # noqa: F811
    cluster = etcd_cluster(size=1)
    local = LocalPKI.create(tmp_path / "pki")
    settings = {"REGDISC_STORE": "etcd", "REGDISC_ETCD_ENDPOINTS": ",".join(cluster.endpoints)}
    a = await start_daemon(local, reactor, **settings)
    b = await start_daemon(local, reactor, **settings)
    yield local, a, b
    for daemon in (a, b):
        if daemon.root.running:
            await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_register_on_one_node_discover_on_the_other(two_nodes: Any) -> None:
    """An instance registered through node A is discovered, renewed and removed through node B."""
    local, a, b = two_nodes
    tls = local.client_tls(local.issue("alice"))
    on_a, on_b = client_for(a, tls, reactor), client_for(b, tls, reactor)
    try:
        await until(lambda: loaded(on_a))
        await until(lambda: loaded(on_b))
        registered = await on_a.register("web", "10.0.0.1", 8080, instance_id="web-1")

        async def seen_on_b() -> bool:
            return [i.id for i in await on_b.instances("web")] == ["web-1"]

        await until(seen_on_b)
        await on_b.heartbeat("web", "web-1", registered.token)
        listed = await on_b.watch_instances("web", wait=None)
        assert listed.index == (await on_a.watch_instances("web", wait=None)).index
        await on_b.deregister("web", "web-1", registered.token)

        async def gone_on_a() -> bool:
            return await on_a.instances("web") == []

        await until(gone_on_a)
    finally:
        await on_a.close()
        await on_b.close()


@pytest_twisted.ensureDeferred
async def test_clients_listing_both_nodes_carry_on_when_one_stops(two_nodes: Any) -> None:
    """With node A stopped, a client given both URLs finds everything through node B."""
    local, a, b = two_nodes
    both = client_for([a.url, b.url], local.client_tls(local.issue("bob")), reactor, timeout=2)
    try:
        await until(lambda: loaded(both))
        registered = await both.register("web", "10.0.0.1", 8080, instance_id="web-1")
        await a.stop()
        await both.heartbeat("web", "web-1", registered.token)

        async def listed() -> bool:
            return [i.id for i in await both.instances("web")] == ["web-1"]

        await until(listed)
    finally:
        await both.close()


@pytest_twisted.ensureDeferred
async def test_one_of_many_racing_registrations_wins_across_nodes(two_nodes: Any) -> None:
    """Clients with their own certificates racing to register one id through both nodes:
    exactly one gets 201, every other one 409 instance_exists."""
    from twisted.internet.defer import DeferredList

    local, a, b = two_nodes
    clients = [
        client_for(a if n % 2 else b, local.client_tls(local.issue(f"racer{n}")), reactor)
        for n in range(12)
    ]
    try:
        for client in clients[:2]:
            await until(lambda: loaded(client))
        results = await DeferredList(
            [c.register("web", "10.0.0.1", 8080, instance_id="contested") for c in clients],
            consumeErrors=True,
        )
        winners = [value for ok, value in results if ok]
        losers = [value.value for ok, value in results if not ok]
        assert len(winners) == 1
        assert [e.code for e in losers] == ["instance_exists"] * 11
    finally:
        for client in clients:
            await client.close()
