"""Shared fixtures: a clock, a store, the registry and its API over StubTreq."""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest
import pytest_twisted
from hypothesis import settings
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from regdisc.registry import Registry
from regdisc.store import IStore, MemoryStore
from regdisc.validation import TTLBounds

settings.register_profile("regdisc", deadline=None, derandomize=True, max_examples=200)
settings.load_profile("regdisc")

START = 1_800_000_000.0
"""The test clock's start: a fixed moment, so timestamps in answers are predictable."""

BOUNDS = TTLBounds(default=30, minimum=1, maximum=3600)
TOKEN_TTL = 3600


def fired(d: Deferred) -> Any:
    """The result of a Deferred that has already fired; raise its failure if it failed."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real etcd member for the whole session; each etcd store takes its own prefix."""
    from .etcd_harness import start_cluster

    cluster = start_cluster(tmp_path_factory.mktemp("shared-etcd"), size=1)
    yield cluster
    cluster.stop()


@pytest_twisted.async_yield_fixture(params=["memory", "etcd"])
async def store(request: pytest.FixtureRequest) -> Any:
    """A fresh, empty store of each kind the API must work over; the kind names the test id.

    The etcd store fires its Deferreds from the global reactor, so the tests over
    it must ``await``, never `fired`. Its leases run on etcd's real time, not on
    the registry's `clock`: tests that move the clock to end a lease pin the
    memory store with ``@pytest.mark.parametrize("store", ["memory"], indirect=True)``.
    """
    if request.param == "memory":
        yield MemoryStore()
        return
    from twisted.internet import reactor

    from regdisc.etcd.gateway import EtcdGateway
    from regdisc.etcd.store import EtcdStore

    cluster = request.getfixturevalue("shared_etcd")
    gateway = EtcdGateway(cluster.endpoints, reactor, timeout=5.0)
    etcd = EtcdStore(gateway, f"/test-{uuid.uuid4().hex}/", reactor)
    etcd.startService()
    await etcd.ready
    yield etcd
    etcd.stopService()
    await gateway.close()


@pytest.fixture
def registry(store: IStore, clock: Clock) -> Registry:
    return Registry(store, clock, TOKEN_TTL)
