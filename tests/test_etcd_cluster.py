"""Two registry daemons on a real three-member etcd cluster, through member and node failures.

Each test starts its own cluster (fast elections: heartbeat 50 ms, election
500 ms) and two in-process daemons, A and B, over mutual TLS, and drives them
with `RegistryClient` as a client would. Every wait is a bounded poll on the
reactor; the figures a test measures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import uuid
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from regdisc.client import (
    ClientTLS,
    Registered,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
)

from .etcd_harness import EtcdCluster, EtcdMember, etcd_cluster  # noqa: F401 (a fixture)
from .harness import Daemon, LocalPKI, client_for, start_daemon

T = TypeVar("T")

GATEWAY_TIMEOUT = 2.0
"""EtcdGateway's per-call time-out, which the daemons use."""
STEP = 0.05
"""The pause between two polls, in seconds."""
CLIENT_TIMEOUT = 3
SERVICE = "web"


async def pause(seconds: float = STEP) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> float:
    """Poll ``check`` every `STEP` until it holds; fire with the time that took.

    Fails after ``seconds`` (plus the last check's own duration).
    """
    started = reactor.seconds()
    while True:
        if await check():
            return reactor.seconds() - started
        if reactor.seconds() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        await pause()


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` says "try again later": 503 backend_unavailable, or no answer."""
    if isinstance(error, RegistryError):
        return error.status == 503 and error.code == "backend_unavailable"
    return isinstance(error, RegistryUnavailable)


async def retried(attempt: Callable[[], Awaitable[T]], seconds: float, what: str) -> tuple[T, float]:
    """Repeat ``attempt`` while the registry is unavailable; fire with its result and the time taken."""
    started = reactor.seconds()
    while True:
        try:
            return await attempt(), reactor.seconds() - started
        except (RegistryError, RegistryUnavailable) as e:
            if not unavailable(e):
                raise
            if reactor.seconds() - started > seconds:
                raise AssertionError(f"{what}: still failing after {seconds:g} s: {e}") from e
        await pause()


async def loaded(client: RegistryClient) -> bool:
    """Whether the daemon behind ``client`` has loaded the registry (no 503 on discovery)."""
    try:
        await client.services()
    except RegistryError as e:
        if e.code == "backend_unavailable":
            return False
        raise
    return True


async def listed_ids(client: RegistryClient, service: str = SERVICE) -> list[str]:
    """The ids of ``service`` as the client's node lists them, in the node's order (duplicates kept)."""
    return [i.id for i in await client.instances(service)]


def members_but(cluster: EtcdCluster, *excluded: EtcdMember) -> list[EtcdMember]:
    return [m for m in cluster.members if all(m is not e for e in excluded)]


@attrs.define
class Deployment:
    """A three-member etcd cluster, two daemons on it, and clients of them."""

    cluster: EtcdCluster
    pki: LocalPKI
    a: Daemon
    b: Daemon
    tls: ClientTLS
    _clients: list[RegistryClient] = attrs.Factory(list)

    def client(self, *daemons: Daemon) -> RegistryClient:
        """A client of the daemons' URLs, in that order; closed after the test."""
        client = client_for([d.url for d in daemons], self.tls, reactor, timeout=CLIENT_TIMEOUT)
        self._clients.append(client)
        return client

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        for daemon in (self.a, self.b):
            if daemon.root.running:
                await daemon.stop()


@pytest_twisted.async_yield_fixture
async def deployment(tmp_path: Path, etcd_cluster: Callable[..., EtcdCluster]) -> Any:  # noqa: F811
    cluster = etcd_cluster(size=3)
    local = LocalPKI.create(tmp_path / "pki")
    settings = {
        "REGDISC_STORE": "etcd",
        "REGDISC_ETCD_ENDPOINTS": ",".join(cluster.endpoints),
        "REGDISC_ETCD_PREFIX": f"/regdisc-{uuid.uuid4().hex}/",
    }
    a = await start_daemon(local, reactor, **settings)
    b = await start_daemon(local, reactor, **settings)
    setup = Deployment(cluster, local, a, b, local.client_tls(local.issue("alice")))
    try:
        for daemon in (a, b):
            await until(partial(loaded, setup.client(daemon)), 10, f"{daemon.url} loaded")
        yield setup
    finally:
        await setup.close()


async def register_some(
    deployment: Deployment, ids: list[str], ttl: int, service: str = SERVICE
) -> dict[str, Registered]:
    """Register ``ids`` alternately through A and B; fire with each one's registration."""
    on_a, on_b = deployment.client(deployment.a), deployment.client(deployment.b)
    done = {}
    for n, instance_id in enumerate(ids):
        client = on_a if n % 2 == 0 else on_b
        done[instance_id] = await client.register(
            service, "10.0.0.1", 8000 + n, instance_id=instance_id, ttl=ttl
        )
    return done


async def both_list(deployment: Deployment, wanted: list[str], seconds: float = 5.0) -> None:
    """Wait until A and B both list exactly ``wanted``, each id once."""
    on_a, on_b = deployment.client(deployment.a), deployment.client(deployment.b)

    async def check() -> bool:
        return all([await listed_ids(c) == sorted(wanted) for c in (on_a, on_b)])

    await until(check, seconds, f"both nodes list {sorted(wanted)}")


async def raw_discovery(daemon: Daemon, tls: ClientTLS, service: str = SERVICE) -> tuple[int, float | None, list[str]]:
    """GET a service's instances from one daemon: (status, X-Regdisc-Mirror-Age, ids)."""
    http = HTTPClient(Agent(reactor, contextFactory=tls.policy(), pool=HTTPConnectionPool(reactor, persistent=False)))
    response = await http.get(
        f"{daemon.url}/registry/services/{service}/instances",
        headers={"Accept": ["application/json"]},
        timeout=CLIENT_TIMEOUT,
    )
    body = await response.json()
    raw = response.headers.getRawHeaders("X-Regdisc-Mirror-Age")
    age = float(raw[-1]) if raw else None
    ids = [i["id"] for i in body["data"]["instances"]] if response.code == 200 else []
    return response.code, age, ids


def statuses(members: list[EtcdMember]) -> list[dict[str, Any]]:
    return [m.status() for m in members]


@pytest.mark.parametrize("how", ["stop", "kill"])
@pytest_twisted.ensureDeferred
async def test_the_registry_survives_losing_the_etcd_leader(deployment: Deployment, how: str) -> None:
    """With the etcd leader stopped (SIGTERM) or killed (SIGKILL), writes through both
    nodes work again once a new leader is elected; nothing registered before is lost or
    doubled, and old tokens still renew; the member rejoins and the cluster is healthy.
    """
    before = [f"web-{n}" for n in range(6)]
    tokens = await register_some(deployment, before, ttl=30)
    await both_list(deployment, before)
    on_a, on_b = deployment.client(deployment.a), deployment.client(deployment.b)

    leader = deployment.cluster.leader()
    assert leader is not None
    started = reactor.seconds()
    getattr(leader, how)()
    stopped = reactor.seconds()

    # The first write through each node, as soon as the cluster takes one.
    _, recovered_a = await retried(
        lambda: on_a.register(SERVICE, "10.0.1.1", 9001, instance_id="after-a", ttl=30),
        10, "register through A after losing the leader",
    )
    _, recovered_b = await retried(
        lambda: on_b.register(SERVICE, "10.0.1.2", 9002, instance_id="after-b", ttl=30),
        10, "register through B after losing the leader",
    )
    print(
        f"\n[leader {how}] {leader.name}: stop took {stopped - started:.3f} s; "
        f"first write through A {recovered_a:.3f} s after, then through B {recovered_b:.3f} s"
    )
    new_leader = deployment.cluster.leader()
    assert new_leader is not None and new_leader is not leader

    # Leases granted before the leader went still renew, through either node.
    for n, instance_id in enumerate(before):
        lease = await (on_a if n % 2 else on_b).heartbeat(SERVICE, instance_id, tokens[instance_id].token)
        assert lease.ttl == 30
    await both_list(deployment, before + ["after-a", "after-b"])

    leader.start(wait=False)

    async def healthy() -> bool:
        return leader.healthy()

    rejoined = await until(healthy, 15, f"{leader.name} healthy again")
    assert all(m.running and m.healthy() for m in deployment.cluster.members)
    assert deployment.cluster.leader() is not None

    async def caught_up() -> bool:
        revisions = {s["header"]["revision"] for s in statuses(deployment.cluster.members)}
        return len(revisions) == 1

    await until(caught_up, 5, "every member at the same revision")
    print(f"[leader {how}] {leader.name} healthy {rejoined:.3f} s after its restart")
    await on_b.heartbeat(SERVICE, "web-0", tokens["web-0"].token)
    await both_list(deployment, before + ["after-a", "after-b"])


@pytest_twisted.ensureDeferred
async def test_without_quorum_writes_fail_fast_and_discovery_serves_the_mirror(deployment: Deployment) -> None:
    """With 2 of 3 members down, a write answers 503 backend_unavailable within a few
    gateway time-outs, while both nodes answer discovery from their mirror with a
    growing X-Regdisc-Mirror-Age; once the members are back, writes work again and
    the mirror age falls back near 0.
    """
    before = [f"web-{n}" for n in range(4)]
    await register_some(deployment, before, ttl=30)
    await both_list(deployment, before)
    on_a, on_b = deployment.client(deployment.a), deployment.client(deployment.b)

    leader = deployment.cluster.leader()
    assert leader is not None
    down = [leader, members_but(deployment.cluster, leader)[0]]
    for member in down:
        member.stop()

    for client, name in ((on_a, "A"), (on_b, "B")):
        started = reactor.seconds()
        with pytest.raises(RegistryError) as raised:
            await client.register(SERVICE, "10.0.2.1", 9100, instance_id=f"refused-{name}", ttl=30)
        took = reactor.seconds() - started
        print(f"\n[no quorum] register through {name} answered {raised.value.status} in {took:.3f} s")
        assert (raised.value.status, raised.value.code) == (503, "backend_unavailable")
        assert took < 3 * GATEWAY_TIMEOUT

    nodes = {"A": deployment.a, "B": deployment.b}
    first = {}
    for name, daemon in nodes.items():
        code, age, ids = await raw_discovery(daemon, deployment.tls)
        assert (code, ids) == (200, sorted(before))
        assert age is not None, f"node {name}: no X-Regdisc-Mirror-Age"
        first[name] = age
    await pause(1.0)
    for name, daemon in nodes.items():
        code, age, ids = await raw_discovery(daemon, deployment.tls)
        assert (code, ids) == (200, sorted(before))
        assert age is not None and age >= first[name] + 0.9
        print(f"[no quorum] node {name} mirror age {first[name]:.3f} s, 1 s later {age:.3f} s")

    for member in down:
        member.start(wait=False)
    _, recovered = await retried(
        lambda: on_a.register(SERVICE, "10.0.2.2", 9101, instance_id="back-a", ttl=30),
        15, "register through A after quorum returns",
    )
    await on_b.register(SERVICE, "10.0.2.3", 9102, instance_id="back-b", ttl=30)
    print(f"[no quorum] members restarted; first write through A {recovered:.3f} s after")
    await both_list(deployment, before + ["back-a", "back-b"])

    ages: list[float | None] = []

    async def fresh_mirrors() -> bool:
        ages[:] = [(await raw_discovery(d, deployment.tls))[1] for d in nodes.values()]
        return all(age is not None and age < 0.5 for age in ages)

    await until(fresh_mirrors, 3, "both mirror ages near 0")
    print(f"[no quorum] mirror ages after the writes: A {ages[0]:.3f} s, B {ages[1]:.3f} s")
    deployment.cluster.wait_healthy(patience=10)


@pytest_twisted.ensureDeferred
async def test_instances_without_heartbeats_are_evicted_on_every_node(deployment: Deployment) -> None:
    """Instances registered through A and renewed through B outlive their TTL while
    renewed, and leave both nodes' discovery within TTL + 1.5 s of their last heartbeat.
    """
    ttl = 2
    ids = [f"short-{n}" for n in range(5)]
    on_a, on_b = deployment.client(deployment.a), deployment.client(deployment.b)
    tokens = {}
    for n, instance_id in enumerate(ids):
        tokens[instance_id] = await on_a.register(SERVICE, "10.0.3.1", 9200 + n, instance_id=instance_id, ttl=ttl)
    registered = reactor.seconds()
    await both_list(deployment, ids)

    last: dict[str, float] = {}

    async def beat(instance_id: str) -> None:
        lease = await on_b.heartbeat(SERVICE, instance_id, tokens[instance_id].token)
        assert lease.ttl == ttl
        last[instance_id] = reactor.seconds()

    while reactor.seconds() - registered < 2 * ttl:
        await gatherResults([Deferred.fromCoroutine(beat(i)) for i in ids])
        await pause(0.5)
    # Alive past twice their TTL, thanks to heartbeats through the other node.
    assert await listed_ids(on_a) == ids
    assert await listed_ids(on_b) == ids

    gone: dict[str, dict[str, float]] = {"A": {}, "B": {}}
    deadline = max(last.values()) + ttl + 3.0
    while reactor.seconds() < deadline and not all(len(g) == len(ids) for g in gone.values()):
        for name, client in (("A", on_a), ("B", on_b)):
            present = set(await listed_ids(client))
            now = reactor.seconds()
            for instance_id in ids:
                if instance_id not in present:
                    gone[name].setdefault(instance_id, now)
        await pause()

    for name in ("A", "B"):
        delays = {i: gone[name][i] - last[i] for i in gone[name]}
        print(
            f"\n[eviction] node {name}: delay after last heartbeat (ttl {ttl} s): "
            + ", ".join(f"{i} {d:.3f} s" for i, d in sorted(delays.items()))
        )
        assert sorted(delays) == ids, f"node {name} still lists {sorted(set(ids) - set(delays))}"
        assert max(delays.values()) <= ttl + 1.5
        assert min(delays.values()) >= ttl - 0.5  # renewed for a full TTL, not cut short


@pytest_twisted.ensureDeferred
async def test_a_client_of_both_nodes_carries_on_when_one_stops(deployment: Deployment) -> None:
    """With node A stopped, nothing registered is lost, and a client given both URLs
    registers, renews and lists through B.
    """
    before = [f"web-{n}" for n in range(4)]
    tokens = await register_some(deployment, before, ttl=30)
    both = deployment.client(deployment.a, deployment.b)
    tokens["both-1"] = await both.register(SERVICE, "10.0.4.1", 9300, instance_id="both-1", ttl=30)
    await both_list(deployment, before + ["both-1"])
    assert both.urls[0] == deployment.a.url

    await deployment.a.stop()

    on_b = deployment.client(deployment.b)
    assert await listed_ids(on_b) == sorted(before + ["both-1"])
    for instance_id, registered in tokens.items():
        lease = await both.heartbeat(SERVICE, instance_id, registered.token)
        assert lease.ttl == 30
    tokens["both-2"] = await both.register(SERVICE, "10.0.4.2", 9301, instance_id="both-2", ttl=30)
    assert await listed_ids(both) == sorted(before + ["both-1", "both-2"])
    await both.deregister(SERVICE, "web-0", tokens["web-0"].token)
    assert await listed_ids(both) == sorted(before[1:] + ["both-1", "both-2"])
    assert await listed_ids(on_b) == sorted(before[1:] + ["both-1", "both-2"])


@pytest_twisted.ensureDeferred
async def test_a_quiet_current_mirror_reports_a_small_age(deployment: Deployment) -> None:
    """With etcd healthy and nothing changing, X-Regdisc-Mirror-Age stays near 0 on both
    nodes: their watches are open, so their mirrors are current.
    """
    await register_some(deployment, ["quiet-0"], ttl=30)
    await both_list(deployment, ["quiet-0"])
    await pause(1.5)
    for daemon in (deployment.a, deployment.b):
        code, age, ids = await raw_discovery(daemon, deployment.tls)
        assert (code, ids) == (200, ["quiet-0"])
        assert age is not None and age < 1.0, f"{daemon.url}: mirror age {age} s with etcd healthy"
