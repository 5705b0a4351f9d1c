"""EtcdGateway against real etcd members: keys, txns, leases, watches, failover, quorum loss, TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from regdisc import pki
from regdisc.client.tls import ClientTLS
from regdisc.etcd.gateway import (
    Compacted,
    Compare,
    Delete,
    EtcdError,
    EtcdGateway,
    EtcdUnavailable,
    Event,
    Put,
    TxnResult,
    Watch,
    _LineSplitter,
)

from .etcd_harness import EtcdCluster, etcd_cluster, free_ports, start_cluster  # noqa: F401

STEP = 0.05
PATIENCE = 5.0
"""The longest any condition or answer is waited for, in seconds."""


async def eventually(condition: Callable[[], bool], what: str, patience: float = PATIENCE) -> None:
    """Poll ``condition`` every STEP seconds until it holds; fail after ``patience`` seconds."""
    for _ in range(int(patience / STEP)):
        if condition():
            return
        await deferLater(reactor, STEP, lambda: None)
    assert condition(), f"not within {patience:g} s: {what}"


async def bounded(d: Deferred, patience: float = PATIENCE) -> Any:
    """Await ``d``, failing with TimeoutError after ``patience`` seconds."""
    return await d.addTimeout(patience, reactor)


async def until_available(call: Callable[[], Deferred], patience: float) -> Any:
    """Repeat ``call`` while it fails with EtcdUnavailable, for up to ``patience`` seconds."""
    deadline = reactor.seconds() + patience
    while True:
        try:
            return await bounded(call())
        except EtcdUnavailable:
            if reactor.seconds() > deadline:
                raise
        await deferLater(reactor, STEP, lambda: None)


def next_key(prefix: bytes) -> bytes:
    """The end of the range of keys that start with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One plain-http member shared by the module; each test works under its own prefix."""
    cluster = start_cluster(tmp_path_factory.mktemp("etcd"), size=1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest_twisted.async_yield_fixture
async def gateway(single: EtcdCluster) -> Any:
    g = EtcdGateway(single.endpoints, reactor)
    yield g
    await g.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> bytes:
    return f"/test/{request.node.name}/".encode()


# Keys.


@pytest_twisted.ensureDeferred
async def test_put_then_range(gateway: EtcdGateway, prefix: bytes) -> None:
    """A put key reads back with its value, revisions and version; a missing key reads as none."""
    revision = await bounded(gateway.put(prefix + b"a", b"\x00one"))
    read_at, kvs = await bounded(gateway.range(prefix + b"a"))
    assert read_at == revision
    [kv] = kvs
    assert (kv.key, kv.value, kv.lease) == (prefix + b"a", b"\x00one", 0)
    assert kv.create_revision == kv.mod_revision == revision and kv.version == 1

    again = await bounded(gateway.put(prefix + b"a", b"two"))
    [kv] = (await bounded(gateway.range(prefix + b"a")))[1]
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"two", revision, again, 2)
    assert await bounded(gateway.range(prefix + b"missing")) == (again, [])


@pytest_twisted.ensureDeferred
async def test_prefix_range_and_serializable(gateway: EtcdGateway, prefix: bytes) -> None:
    """A range reads the keys in [key, range_end) in key order; a serializable read sees them too."""
    for name in (b"c", b"a", b"b"):
        await bounded(gateway.put(prefix + name, name * 2))
    await bounded(gateway.put(next_key(prefix), b"outside"))
    _, kvs = await bounded(gateway.range(prefix, next_key(prefix)))
    assert [(kv.key, kv.value) for kv in kvs] == [
        (prefix + b"a", b"aa"), (prefix + b"b", b"bb"), (prefix + b"c", b"cc")
    ]
    _, local = await bounded(gateway.range(prefix, next_key(prefix), serializable=True))
    assert local == kvs


@pytest_twisted.ensureDeferred
async def test_delete(gateway: EtcdGateway, prefix: bytes) -> None:
    """Deleting a range removes its keys and counts them."""
    for name in (b"a", b"b"):
        await bounded(gateway.put(prefix + name, b"x"))
    revision, deleted = await bounded(gateway.delete(prefix, next_key(prefix)))
    assert deleted == 2
    assert await bounded(gateway.range(prefix, next_key(prefix))) == (revision, [])


# Transactions.


@pytest_twisted.ensureDeferred
async def test_create_if_absent_succeeds_once(gateway: EtcdGateway, prefix: bytes) -> None:
    """A txn that creates a key only if its create revision is 0 succeeds once, then takes the failure branch."""
    key = prefix + b"leader"
    absent = [Compare(key, "create", "equal", 0)]
    first = await bounded(gateway.txn(absent, [Put(key, b"alice")], [Put(prefix + b"lost", b"alice")]))
    assert first.succeeded
    second = await bounded(gateway.txn(absent, [Put(key, b"bob")], [Put(prefix + b"lost", b"bob")]))
    assert second == TxnResult(False, first.revision + 1)
    assert [kv.value for kv in (await bounded(gateway.range(key)))[1]] == [b"alice"]
    assert [kv.value for kv in (await bounded(gateway.range(prefix + b"lost")))[1]] == [b"bob"]


@pytest_twisted.ensureDeferred
async def test_txn_on_mod_revision(gateway: EtcdGateway, prefix: bytes) -> None:
    """A txn guarded by the mod revision read succeeds; a second one with the same stale revision fails."""
    key = prefix + b"k"
    revision = await bounded(gateway.put(key, b"v1"))
    unchanged = [Compare(key, "mod", "equal", revision)]
    result = await bounded(gateway.txn(unchanged, [Put(key, b"v2")]))
    assert result == TxnResult(True, revision + 1)
    assert not (await bounded(gateway.txn(unchanged, [Delete(key)]))).succeeded
    assert (await bounded(gateway.txn([Compare(key, "value", "equal", b"v2")], [Delete(key)]))).succeeded
    assert (await bounded(gateway.range(key)))[1] == []


def test_compare_checks_its_fields() -> None:
    """A comparison refuses unknown targets and results, and values of the wrong type."""
    with pytest.raises(ValueError):
        Compare(b"k", "lease", "equal", 0)
    with pytest.raises(ValueError):
        Compare(b"k", "mod", "bigger", 0)
    with pytest.raises(TypeError):
        Compare(b"k", "value", "equal", 3)
    with pytest.raises(TypeError):
        Compare(b"k", "version", "equal", b"3")


# Leases.


@pytest_twisted.ensureDeferred
async def test_lease_lifecycle(gateway: EtcdGateway, prefix: bytes) -> None:
    """A lease is granted, renewed and read; revoking it deletes its keys and leaves it gone."""
    lease, ttl = await bounded(gateway.lease_grant(30))
    assert lease > 0 and ttl == 30
    await bounded(gateway.put(prefix + b"a", b"x", lease=lease))
    await bounded(gateway.txn([], [Put(prefix + b"b", b"y", lease=lease)]))
    assert [kv.lease for kv in (await bounded(gateway.range(prefix, next_key(prefix))))[1]] == [lease, lease]
    assert await bounded(gateway.lease_keepalive(lease)) == 30
    assert 0 < await bounded(gateway.lease_ttl(lease)) <= 30

    assert await bounded(gateway.lease_revoke(lease)) is None
    assert (await bounded(gateway.range(prefix, next_key(prefix))))[1] == []
    assert await bounded(gateway.lease_ttl(lease)) == -1
    assert await bounded(gateway.lease_keepalive(lease)) == 0
    assert await bounded(gateway.lease_revoke(lease)) is None


@pytest_twisted.ensureDeferred
async def test_unknown_lease(gateway: EtcdGateway, prefix: bytes) -> None:
    """Renewing an unknown lease gives 0; attaching a key to one is an error answer."""
    assert await bounded(gateway.lease_keepalive(123456789)) == 0
    with pytest.raises(EtcdError) as raised:
        await bounded(gateway.put(prefix + b"k", b"v", lease=123456789))
    assert raised.value.code == 5 and "lease not found" in raised.value.message


@pytest_twisted.ensureDeferred
async def test_key_goes_when_its_lease_expires(gateway: EtcdGateway, prefix: bytes) -> None:
    """A key on a 1 s lease that is not renewed is deleted within a few seconds."""
    lease, ttl = await bounded(gateway.lease_grant(1))
    assert ttl == 1
    await bounded(gateway.put(prefix + b"k", b"v", lease=lease))
    deadline = reactor.seconds() + 4.0
    while (kvs := (await bounded(gateway.range(prefix + b"k")))[1]) and reactor.seconds() < deadline:
        await deferLater(reactor, 0.1, lambda: None)
    assert kvs == [], "the key outlived its 1 s lease by 3 s"
    assert await bounded(gateway.lease_ttl(lease)) == -1


# Watches.


def recorder() -> tuple[list[tuple[int, list[Event]]], Callable[[int, list[Event]], None]]:
    batches: list[tuple[int, list[Event]]] = []
    return batches, lambda revision, events: batches.append((revision, events))


def flat(batches: list[tuple[int, list[Event]]]) -> list[tuple[str, bytes, bytes, int]]:
    return [(e.kind, e.kv.key, e.kv.value, e.kv.mod_revision) for _, events in batches for e in events]


@pytest_twisted.ensureDeferred
async def test_watch_sees_puts_and_deletes_in_order(gateway: EtcdGateway, prefix: bytes) -> None:
    """A watch from now reports puts and deletes under its prefix in order, with their revisions."""
    start = await bounded(gateway.put(prefix + b"before", b"x"))
    batches, on_events = recorder()
    watch = gateway.watch(prefix, next_key(prefix), start + 1, on_events)
    r1 = await bounded(gateway.put(prefix + b"a", b"1"))
    r2 = await bounded(gateway.put(prefix + b"a", b"2"))
    await bounded(gateway.put(b"/elsewhere", b"x"))
    r3, _ = await bounded(gateway.delete(prefix + b"a"))
    await eventually(lambda: len(flat(batches)) >= 3, "three events")
    assert flat(batches) == [
        ("put", prefix + b"a", b"1", r1),
        ("put", prefix + b"a", b"2", r2),
        ("delete", prefix + b"a", b"", r3),
    ]
    assert all(revision >= events[-1].kv.mod_revision for revision, events in batches)
    assert watch.next_revision == r3 + 1
    watch.stop()
    assert await bounded(watch.done) is None


@pytest_twisted.ensureDeferred
async def test_watch_replays_history(gateway: EtcdGateway, prefix: bytes) -> None:
    """A watch from a past revision first replays what changed since."""
    r1 = await bounded(gateway.put(prefix + b"a", b"1"))
    r2 = await bounded(gateway.put(prefix + b"b", b"2"))
    batches, on_events = recorder()
    watch = gateway.watch(prefix, next_key(prefix), r1, on_events)
    try:
        await eventually(lambda: len(flat(batches)) >= 2, "two replayed events")
        assert flat(batches) == [("put", prefix + b"a", b"1", r1), ("put", prefix + b"b", b"2", r2)]
        r3 = await bounded(gateway.put(prefix + b"c", b"3"))
        await eventually(lambda: len(flat(batches)) >= 3, "a live event after the replay")
        assert flat(batches)[-1] == ("put", prefix + b"c", b"3", r3)
    finally:
        watch.stop()
    assert await bounded(watch.done) is None


@pytest_twisted.ensureDeferred
async def test_watch_from_now_learns_its_revision(gateway: EtcdGateway, prefix: bytes) -> None:
    """A watch from revision 0 starts after the store's revision when it is created."""
    current = await bounded(gateway.put(prefix + b"a", b"1"))
    watch = gateway.watch(prefix + b"a", None, 0, lambda revision, events: None)
    try:
        await eventually(lambda: watch.next_revision != 0, "the watch created")
        assert watch.next_revision == current + 1
    finally:
        watch.stop()


@pytest_twisted.ensureDeferred
async def test_watch_from_compacted_revision(gateway: EtcdGateway, prefix: bytes) -> None:
    """A watch from before the compaction fails with Compacted and calls back nothing."""
    r1 = await bounded(gateway.put(prefix + b"a", b"1"))
    r2 = await bounded(gateway.put(prefix + b"a", b"2"))
    await bounded(gateway.compact(r2))
    batches, on_events = recorder()
    watch = gateway.watch(prefix, next_key(prefix), r1, on_events)
    with pytest.raises(Compacted) as raised:
        await bounded(watch.done)
    assert raised.value.compact_revision == r2
    assert batches == []
    with pytest.raises(EtcdError) as old:
        await bounded(gateway.compact(r1))
    assert old.value.code == 11


@pytest_twisted.ensureDeferred
async def test_close_stops_watches(single: EtcdCluster, prefix: bytes) -> None:
    """Closing the gateway stops its watches: their done fires with None."""
    g = EtcdGateway(single.endpoints, reactor)
    watch: Watch = g.watch(prefix, next_key(prefix), 0, lambda revision, events: None)
    await eventually(lambda: watch.next_revision != 0, "the watch created")
    await bounded(g.close())
    assert await bounded(watch.done) is None


def test_lines_are_split_whatever_the_chunks() -> None:
    """Stream chunks are joined and split into lines: one object may span chunks, one chunk may hold several."""
    lines: list[bytes] = []
    split = _LineSplitter(lines.append)
    for chunk in (b'{"result":', b'{"a":1}}\n{"result":{}}\n', b"\n", b'{"x"', b":2}\n"):
        split(chunk)
    assert lines == [b'{"result":{"a":1}}', b'{"result":{}}', b'{"x":2}']


# Failover.


def failovers(captured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in captured if e.get("event") == "etcd.failover"]


@pytest_twisted.ensureDeferred
async def test_failover_past_dead_endpoint(single: EtcdCluster, prefix: bytes) -> None:
    """An endpoint that refuses connections is passed over, logged, and not tried first next time."""
    [dead_port] = free_ports(1)
    dead = f"http://127.0.0.1:{dead_port}"
    g = EtcdGateway([dead, *single.endpoints], reactor)
    try:
        with capturedLogs() as captured:
            await bounded(g.put(prefix + b"k", b"v"))
            assert g.current_endpoint == single.endpoints[0]
            await bounded(g.range(prefix + b"k"))
        [logged] = failovers(captured)
        assert logged["endpoint"] == dead and "cannot connect" in logged["reason"]
    finally:
        await g.close()


@pytest_twisted.ensureDeferred
async def test_error_answer_is_not_failed_over(single: EtcdCluster, prefix: bytes) -> None:
    """An error answer fails the call at once, without trying another endpoint."""
    [dead_port] = free_ports(1)
    g = EtcdGateway([*single.endpoints, f"http://127.0.0.1:{dead_port}"], reactor)
    try:
        with capturedLogs() as captured:
            with pytest.raises(EtcdError):
                await bounded(g.put(prefix + b"k", b"v", lease=987654321))
        assert failovers(captured) == []
    finally:
        await g.close()


@pytest_twisted.ensureDeferred
async def test_all_endpoints_dead(prefix: bytes) -> None:
    """With no endpoint listening, a call fails with EtcdUnavailable naming each endpoint."""
    ports = free_ports(2)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    g = EtcdGateway(urls, reactor, timeout=1.0)
    try:
        with pytest.raises(EtcdUnavailable) as raised:
            await bounded(g.range(prefix))
        assert all(url in raised.value.reason for url in urls)
        watch = g.watch(prefix, None, 0, lambda revision, events: None)
        with pytest.raises(EtcdUnavailable):
            await bounded(watch.done)
    finally:
        await g.close()


@pytest_twisted.ensureDeferred
async def test_failover_when_a_member_stops(etcd_cluster: Callable[..., EtcdCluster], prefix: bytes) -> None:
    """When the member that answered last stops, the next call succeeds through another member."""
    cluster = etcd_cluster(3)
    g = EtcdGateway(cluster.endpoints, reactor)
    try:
        await bounded(g.put(prefix + b"k", b"1"))
        first = g.current_endpoint
        cluster.member_at(first).stop()
        with capturedLogs() as captured:
            await bounded(g.put(prefix + b"k", b"2"))
        assert g.current_endpoint != first
        assert [e["endpoint"] for e in failovers(captured)] == [first]
        assert cluster.leader() not in (None, cluster.member_at(first))
        [kv] = (await bounded(g.range(prefix + b"k")))[1]
        assert kv.value == b"2"
    finally:
        await g.close()


@pytest_twisted.ensureDeferred
async def test_no_quorum_fails_fast_then_recovers(
    etcd_cluster: Callable[..., EtcdCluster], prefix: bytes
) -> None:
    """Without a quorum a put fails with EtcdUnavailable within the time-out, and a watch ends;
    once the members are back, puts succeed again."""
    timeout = 1.0
    cluster = etcd_cluster(3)
    g = EtcdGateway(cluster.endpoints, reactor, timeout=timeout)
    try:
        await bounded(g.put(prefix + b"k", b"1"))
        survivor = cluster.member_at(g.current_endpoint)
        watch = g.watch(prefix, next_key(prefix), 0, lambda revision, events: None)
        await eventually(lambda: watch.next_revision != 0, "the watch created")
        stopped = [m for m in cluster.members if m is not survivor]
        for member in stopped:
            member.stop()

        started = reactor.seconds()
        with pytest.raises(EtcdUnavailable) as raised:
            await bounded(g.put(prefix + b"k", b"2"))
        took = reactor.seconds() - started
        assert took < 3 * timeout, f"took {took:.2f} s"
        assert survivor.client_url in raised.value.reason
        # The survivor loses its leader within an election time-out or two,
        # and etcd then ends the watch rather than leave it silent.
        with pytest.raises(EtcdUnavailable):
            await bounded(watch.done)

        for member in stopped:
            member.start(wait=False)
        await until_available(lambda: g.put(prefix + b"k", b"3"), patience=10.0)
        [kv] = (await bounded(g.range(prefix + b"k")))[1]
        assert kv.value == b"3"
        assert cluster.leader() is not None
    finally:
        await g.close()


# TLS.


@implementer(IPolicyForHTTPS)
class _NoClientCertificate:
    """Trusts the cluster's CA but presents no certificate of its own."""

    def __init__(self, authority: Any) -> None:
        self._authority = authority

    def policy(self) -> IPolicyForHTTPS:
        return self

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._authority)


@pytest_twisted.ensureDeferred
async def test_tls_with_client_certificate(etcd_cluster: Callable[..., EtcdCluster], prefix: bytes) -> None:
    """Over https a gateway with a client certificate from the CA puts, reads and watches."""
    cluster = etcd_cluster(1, tls=True)
    assert cluster.endpoints[0].startswith("https://127.0.0.1:")
    g = EtcdGateway(cluster.endpoints, reactor, tls=cluster.client_tls)
    try:
        batches, on_events = recorder()
        revision = await bounded(g.put(prefix + b"k", b"v"))
        watch = g.watch(prefix, next_key(prefix), revision, on_events)
        await eventually(lambda: len(flat(batches)) == 1, "the put replayed")
        assert flat(batches) == [("put", prefix + b"k", b"v", revision)]
        watch.stop()
        assert [kv.value for kv in (await bounded(g.range(prefix + b"k")))[1]] == [b"v"]
    finally:
        await g.close()


@pytest_twisted.ensureDeferred
async def test_tls_refuses_clients_without_a_good_certificate(
    etcd_cluster: Callable[..., EtcdCluster], tmp_path: Path, prefix: bytes
) -> None:
    """etcd refuses a client that presents no certificate, or one from another CA."""
    cluster = etcd_cluster(1, tls=True)
    assert cluster.tls is not None and cluster.client_tls is not None
    foreign_ca, foreign_key = pki.make_ca("foreign CA")
    cert, key = pki.issue_certificate(foreign_ca, foreign_key, "mallory", server=False)
    pki.write_cert(tmp_path / "mallory.pem", cert)
    pki.write_key(tmp_path / "mallory-key.pem", key)
    foreign = ClientTLS.from_files(tmp_path / "mallory.pem", tmp_path / "mallory-key.pem", cluster.tls.ca)
    for tls in (_NoClientCertificate(cluster.client_tls.authority), foreign):
        g = EtcdGateway(cluster.endpoints, reactor, tls=tls, timeout=1.0)
        try:
            with pytest.raises(EtcdUnavailable) as raised:
                await bounded(g.put(prefix + b"k", b"v"))
            assert "TLS" in raised.value.reason or "connection lost" in raised.value.reason, raised.value.reason
        finally:
            await g.close()

