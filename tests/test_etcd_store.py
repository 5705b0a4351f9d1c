"""EtcdStore against a real etcd: two registry nodes sharing one registry, in real time."""

from __future__ import annotations

import uuid
from typing import Any, Callable

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater

from regdisc.errors import BackendUnavailable, InstanceExists, InstanceNotFound
from regdisc.etcd.gateway import EtcdGateway
from regdisc.etcd.store import EtcdStore
from regdisc.feed import Change
from regdisc.model import Peer
from regdisc.registry import Registry
from regdisc.tokens import hash_token
from regdisc.validation import InstanceSpec

from .etcd_harness import etcd_cluster  # noqa: F401 (a fixture)

ALICE = Peer("CN=alice", "a" * 64, "127.0.0.1:1")
BOB = Peer("CN=bob", "b" * 64, "127.0.0.1:2")


@attrs.define
class Node:
    """A registry node: its store on the shared etcd, and the registry over it."""

    store: EtcdStore
    registry: Registry
    gateway: EtcdGateway
    changes: list[Change]


async def start_node(endpoints: list[str], prefix: str, timeout: float = 2.0) -> Node:
    gateway = EtcdGateway(endpoints, reactor, timeout=timeout)
    store = EtcdStore(gateway, prefix, reactor)
    changes: list[Change] = []
    store.feed.listen(changes.append)
    store.startService()
    await store.ready
    return Node(store, Registry(store, reactor, 3600), gateway, changes)


async def stop_node(node: Node) -> None:
    node.store.stopService()
    await node.gateway.close()


async def until(check: Callable[[], Any], seconds: float = 10.0) -> None:
    """Poll ``check`` every 20 ms, for at most ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if await check():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition not reached in time")


@pytest_twisted.async_yield_fixture
async def nodes(etcd_cluster: Callable[..., Any]) -> Any:  # noqa: F811
    cluster = etcd_cluster(size=1)
    prefix = f"/regdisc-{uuid.uuid4().hex}/"
    a = await start_node(cluster.endpoints, prefix)
    b = await start_node(cluster.endpoints, prefix)
    yield a, b, cluster
    await stop_node(a)
    await stop_node(b)


def spec(instance_id: str | None = "web-1", ttl: int = 30) -> InstanceSpec:
    return InstanceSpec(host="10.0.0.1", port=80, ttl=ttl, id=instance_id)


@pytest_twisted.ensureDeferred
async def test_a_change_on_one_node_is_seen_on_the_other(nodes: Any) -> None:
    """Register on A, then heartbeat, rotate and deregister on B; both feeds agree."""
    a, b, _ = nodes
    issued = await a.registry.register("web", spec(), None, ALICE)
    written = reactor.seconds()

    async def b_sees_it() -> bool:
        return [i.id for i in await b.registry.instances("web")] == ["web-1"]

    await until(b_sees_it)
    # The README's bound on how late another node shows a change.
    assert reactor.seconds() - written < 1.0
    assert b.registry.revision("web") == a.registry.revision("web") > 0
    await b.registry.heartbeat("web", "web-1", issued.token, BOB)
    token, _ = await b.registry.rotate("web", "web-1", issued.token, BOB)
    await b.registry.deregister("web", "web-1", token, BOB)

    async def a_sees_it_gone() -> bool:
        return await a.registry.instances("web") == []

    await until(a_sees_it_gone)
    kinds_a = [(c.kind, c.revision) for c in a.changes]
    kinds_b = [(c.kind, c.revision) for c in b.changes]
    assert [k for k, _ in kinds_a] == ["registered", "deregistered"]
    assert kinds_a == kinds_b  # the same changes, at the same etcd revisions
    with pytest.raises(InstanceNotFound):
        await a.registry.heartbeat("web", "web-1", token, ALICE)


@pytest_twisted.ensureDeferred
async def test_the_writing_node_shows_its_change_at_once(nodes: Any) -> None:
    """A node answers discovery with its own write as soon as the write returns."""
    a, _, _ = nodes
    await a.registry.register("web", spec(), None, ALICE)
    assert [i.id for i in await a.registry.instances("web")] == ["web-1"]


@pytest_twisted.ensureDeferred
async def test_a_lapsed_lease_is_evicted_on_every_node(nodes: Any) -> None:
    """Without heartbeats, etcd ends the lease and both nodes drop the instance as evicted."""
    a, b, _ = nodes
    await a.registry.register("web", spec(ttl=1), None, ALICE)
    started = reactor.seconds()

    async def gone_everywhere() -> bool:
        return await a.registry.instances("web") == [] and await b.registry.instances("web") == []

    await until(gone_everywhere, seconds=6)
    # etcd's lessor checks leases every 500 ms; the watch adds milliseconds.
    assert reactor.seconds() - started < 1 + 2.0
    assert [c.kind for c in b.changes] == ["registered", "evicted"]


@pytest_twisted.ensureDeferred
async def test_heartbeats_keep_a_short_lease_alive(nodes: Any) -> None:
    """Heartbeats through either node keep the lease alive past its TTL."""
    a, b, _ = nodes
    issued = await a.registry.register("web", spec(ttl=1), None, ALICE)
    for node in (a, b, a, b, a, b):
        await deferLater(reactor, 0.4, lambda: None)
        await node.registry.heartbeat("web", "web-1", issued.token, ALICE)
    assert [i.id for i in await b.registry.instances("web")] == ["web-1"]


@pytest_twisted.ensureDeferred
async def test_exactly_one_of_many_concurrent_registrations_wins(nodes: Any) -> None:
    """Many clients registering one id through both nodes at once: one wins, the rest get 409."""
    a, b, _ = nodes
    attempts = [
        (a if n % 2 else b).registry.register("web", spec("shared"), None, Peer(f"CN=c{n}", f"{n:064x}", "x"))
        for n in range(20)
    ]
    results = await DeferredList([ensureDeferred(c) for c in attempts], consumeErrors=True)
    won = [r for ok, r in results if ok]
    lost = [r for ok, r in results if not ok]
    assert len(won) == 1
    assert all(f.check(InstanceExists) for f in lost)


@pytest_twisted.ensureDeferred
async def test_without_etcd_writes_fail_fast_and_discovery_serves_the_mirror(nodes: Any) -> None:
    """With etcd down, a write answers 503 within its time-out; discovery keeps the mirror."""
    a, _, cluster = nodes
    await a.registry.register("web", spec(), None, ALICE)
    cluster.stop()
    started = reactor.seconds()
    with pytest.raises(BackendUnavailable) as raised:
        await a.registry.register("web", spec("web-2"), None, ALICE)
    assert raised.value.status == 503
    assert reactor.seconds() - started < 3 * 2.0
    assert [i.id for i in await a.registry.instances("web")] == ["web-1"]
    assert a.store.mirror_age() is not None


class TwiceSent(EtcdGateway):
    """A gateway whose txns reach etcd twice, as after a time-out and a failover."""

    def txn(self, compare: Any, success: Any, failure: Any = ()) -> Any:
        async def twice() -> Any:
            await super(TwiceSent, self).txn(compare, success, failure)
            return await super(TwiceSent, self).txn(compare, success, failure)

        return ensureDeferred(twice())


@pytest_twisted.ensureDeferred
async def test_a_registration_sent_twice_still_wins(etcd_cluster: Callable[..., Any]) -> None:  # noqa: F811
    """If a registration's txn reached etcd before a retry, the retry's failure is no 409."""
    cluster = etcd_cluster(size=1)
    gateway = TwiceSent(cluster.endpoints, reactor, timeout=2.0)
    store = EtcdStore(gateway, f"/regdisc-{uuid.uuid4().hex}/", reactor)
    store.startService()
    try:
        await store.ready
        registry = Registry(store, reactor, 3600)
        issued = await registry.register("web", spec(), None, ALICE)
        assert issued.outcome == "created"
        with pytest.raises(InstanceExists):
            await registry.register("web", spec(), None, BOB)
    finally:
        store.stopService()
        await gateway.close()


@pytest_twisted.ensureDeferred
async def test_a_new_token_renews_on_a_node_that_has_not_seen_the_rotation(nodes: Any) -> None:
    """A heartbeat on B right after a rotation on A, with the new token, renews (B reads etcd itself)."""
    a, b, _ = nodes
    issued = await a.registry.register("web", spec(), None, ALICE)

    async def b_holds_it() -> bool:
        return b.store.cached("web", "web-1", reactor.seconds()) is not None

    await until(b_holds_it)
    fresh, _ = await a.registry.rotate("web", "web-1", issued.token, ALICE)
    renewed = await b.registry.heartbeat("web", "web-1", fresh, BOB)
    assert renewed.id == "web-1"


@pytest_twisted.ensureDeferred
async def test_the_mirror_vouches_for_nothing_once_it_has_lost_etcd(nodes: Any) -> None:
    """`cached` answers from the mirror while its watch is current, and None after it is lost."""
    a, b, cluster = nodes
    issued = await a.registry.register("web", spec(), None, ALICE)

    async def b_holds_it() -> bool:
        return b.store.cached("web", "web-1", reactor.seconds()) is not None

    await until(b_holds_it)
    assert b.store.cached("web", "web-1", reactor.seconds()).credentials.token_hash == hash_token(issued.token)
    cluster.stop()

    async def b_lost_etcd() -> bool:
        return (b.store.mirror_age() or 0.0) > 0.0

    await until(b_lost_etcd)
    assert b.store.cached("web", "web-1", reactor.seconds()) is None
