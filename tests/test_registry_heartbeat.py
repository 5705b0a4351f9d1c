"""Heartbeats recognised against the store's own copy (`IStore.cached`), and what falls back."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from regdisc.errors import InstanceNotFound, Unauthorized
from regdisc.model import Registration
from regdisc.registry import Registry
from regdisc.store import MemoryStore
from regdisc.tokens import hash_token
from regdisc.validation import InstanceSpec

from .conftest import START, TOKEN_TTL, fired


class CountingStore(MemoryStore):
    """A memory store that counts reads, and can be given a copy to answer from `cached`."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.copy: Registration | None = None
        self.use_copy = False

    def get(self, service: str, instance_id: str, now: float) -> Deferred:
        self.reads += 1
        return super().get(service, instance_id, now)

    def cached(self, service: str, instance_id: str, now: float) -> Registration | None:
        return self.copy if self.use_copy else super().cached(service, instance_id, now)


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def registry(store: CountingStore, clock: Clock) -> Registry:
    return Registry(store, clock, TOKEN_TTL)


def registered(registry: Registry) -> str:
    spec = InstanceSpec(host="h", port=1, ttl=10, id="web-1")
    issued = fired(ensureDeferred(registry.register("web", spec, None, None)))
    return str(issued.token)


def test_a_heartbeat_with_the_token_reads_nothing(registry: Registry, store: CountingStore, clock: Clock) -> None:
    """A holder of the valid token renews without a read of the store."""
    token = registered(registry)
    reads = store.reads
    clock.advance(5)
    renewed = fired(registry.heartbeat("web", "web-1", token, None))
    assert renewed.expires_at == START + 15
    assert store.reads == reads


def test_a_refused_heartbeat_takes_the_full_path(registry: Registry, store: CountingStore) -> None:
    """A wrong token is refused after a read, and logged as every refusal is."""
    registered(registry)
    reads = store.reads
    with capturedLogs() as events:
        with pytest.raises(Unauthorized):
            fired(registry.heartbeat("web", "web-1", "rdt_wrong", None))
    assert store.reads == reads + 1
    assert [e["event"] for e in events] == ["auth.failed"]


def test_a_copy_behind_a_rotation_still_accepts_the_new_token(registry: Registry, store: CountingStore) -> None:
    """When the node's copy still holds the old token, the new one is checked against the store itself."""
    token = registered(registry)
    store.copy = fired(store.get("web", "web-1", START))
    store.use_copy = True
    fresh, _ = fired(registry.rotate("web", "web-1", token, None))
    assert store.copy.credentials.token_hash == hash_token(token)  # the copy is behind
    renewed = fired(registry.heartbeat("web", "web-1", fresh, None))
    assert renewed.id == "web-1"


def test_a_copy_of_a_removed_instance_answers_not_found(registry: Registry, store: CountingStore) -> None:
    """A copy that outlived its instance fails its renewal, and the read that follows finds nothing."""
    token = registered(registry)
    store.copy = fired(store.get("web", "web-1", START))
    fired(registry.deregister("web", "web-1", token, None))
    store.use_copy = True
    with pytest.raises(InstanceNotFound):
        fired(registry.heartbeat("web", "web-1", token, None))


def test_a_renewal_that_finds_the_copy_changed_retries_on_a_fresh_read(
    registry: Registry, store: CountingStore, clock: Clock
) -> None:
    """A `Conflict` on renewing the copy sends the heartbeat down the full path, which renews."""
    token = registered(registry)
    current = fired(store.get("web", "web-1", START))
    store.copy = attrs.evolve(current, revision=current.revision - 1)  # an older write
    store.use_copy = True
    clock.advance(3)
    renewed = fired(registry.heartbeat("web", "web-1", token, None))
    assert renewed.expires_at == START + 13


def test_other_failures_of_the_renewal_are_not_retried(registry: Registry, store: CountingStore) -> None:
    """A backend failure on renewing the copy is the heartbeat's answer, not a reason to read."""
    token = registered(registry)
    reads = store.reads

    def broken(current: Any, now: float) -> Deferred:
        return fail(RuntimeError("backend down"))

    store.renew = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        fired(registry.heartbeat("web", "web-1", token, None))
    assert store.reads == reads
