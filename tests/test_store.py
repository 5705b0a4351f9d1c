"""The in-memory store: liveness at read time, revisions, and heap-driven eviction."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from regdisc.errors import Conflict, InstanceExists
from regdisc.model import Credentials, Instance, Registration
from regdisc.store import IStore, MemoryStore

from .conftest import fired


@pytest.fixture
def store() -> MemoryStore:
    """A memory store: these tests read its own workings (its heap, its revisions)."""
    return MemoryStore()


def registration(instance_id: str = "i", service: str = "web", now: float = 0.0, ttl: int = 10) -> Registration:
    instance = Instance(
        service=service,
        id=instance_id,
        host="h",
        port=1,
        status="up",
        metadata={},
        tags=(),
        ttl=ttl,
        registered_at=now,
        last_heartbeat_at=now,
        expires_at=now + ttl,
    )
    return Registration(instance, Credentials(b"hash", now + 100, None))


def test_memory_store_provides_the_interface() -> None:
    """MemoryStore declares and honours IStore."""
    from zope.interface.verify import verifyObject

    assert verifyObject(IStore, MemoryStore())


def test_create_then_get(store: MemoryStore) -> None:
    """A created registration is found, with a revision assigned."""
    stored = fired(store.create(registration(), 0))
    assert stored.revision > 0
    assert fired(store.get("web", "i", 5)) == stored


def test_get_hides_expired_registrations(store: MemoryStore) -> None:
    """A registration is gone from get, services and instances once its lease ends."""
    fired(store.create(registration(ttl=10), 0))
    assert fired(store.get("web", "i", 9.999)) is not None
    assert fired(store.get("web", "i", 10)) is None
    assert fired(store.services(10)) == []
    assert fired(store.instances("web", 10)) == []


def test_create_refuses_a_live_key(store: MemoryStore) -> None:
    """Creating over a live registration fails with InstanceExists."""
    fired(store.create(registration(), 0))
    with pytest.raises(InstanceExists):
        fired(store.create(registration(), 5))


def test_create_replaces_an_expired_key(store: MemoryStore) -> None:
    """Creating over an expired, not yet evicted registration succeeds."""
    fired(store.create(registration(), 0))
    fired(store.create(registration(now=20), 20))
    assert len(store) == 1
    assert fired(store.get("web", "i", 25)).instance.registered_at == 20


def test_replace_refuses_an_outdated_read(store: MemoryStore) -> None:
    """A write based on an old revision fails with Conflict and changes nothing."""
    first = fired(store.create(registration(), 0))
    second = fired(store.replace(first, attrs.evolve(first, instance=attrs.evolve(first.instance, port=2))))
    assert second.revision > first.revision
    with pytest.raises(Conflict):
        fired(store.replace(first, first))
    with pytest.raises(Conflict):
        fired(store.delete(first))
    with pytest.raises(Conflict):
        fired(store.renew(first, 1))
    assert fired(store.get("web", "i", 1)) == second


def test_renew_keeps_the_revision(store: MemoryStore) -> None:
    """A renewal extends the lease without counting as a change."""
    stored = fired(store.create(registration(ttl=10), 0))
    renewed = fired(store.renew(stored, 8))
    assert renewed.expires_at == 18
    found = fired(store.get("web", "i", 15))
    assert found.revision == stored.revision
    assert fired(store.replace(stored, found)) is not None


def test_delete_removes(store: MemoryStore) -> None:
    """A deleted registration is gone, and its service too when it was the last."""
    stored = fired(store.create(registration(), 0))
    fired(store.delete(stored))
    assert fired(store.get("web", "i", 1)) is None
    assert fired(store.services(1)) == []
    assert len(store) == 0


def test_evict_expired_costs_what_expires(store: MemoryStore) -> None:
    """Eviction only visits the deadlines that have passed."""
    for n in range(1000):
        fired(store.create(registration(f"i{n}", ttl=10 + n), 0))
    first = fired(store.get("web", "i0", 0)).instance
    assert store.evict_expired(10.5, limit=100) == [first]
    assert len(store._deadlines) == 999  # one popped, the rest untouched


def test_evict_respects_the_limit(store: MemoryStore) -> None:
    """At most ``limit`` registrations are evicted per call; the rest wait."""
    for n in range(25):
        fired(store.create(registration(f"i{n}"), 0))
    assert len(store.evict_expired(10, 10)) == 10
    assert len(store.evict_expired(10, 10)) == 10
    assert len(store.evict_expired(10, 10)) == 5
    assert len(store) == 0


def test_renewed_registrations_are_not_evicted(store: MemoryStore) -> None:
    """A stale deadline left by a renewal evicts nothing."""
    stored = fired(store.create(registration(ttl=10), 0))
    fired(store.renew(stored, 9))
    assert store.evict_expired(15, 100) == []
    assert [i.id for i in store.evict_expired(19, 100)] == ["i"]


def test_heap_stays_bounded_under_renewals(store: MemoryStore) -> None:
    """Renewals do not grow the deadline heap without bound."""
    stored = [fired(store.create(registration(f"i{n}"), 0)) for n in range(10)]
    for tick in range(1, 1000):
        for s in stored:
            fired(store.renew(s, tick))
    assert len(store._deadlines) <= 4 * len(store) + 64 + 1


operations = st.lists(
    st.tuples(
        st.sampled_from(["create", "renew", "delete", "evict", "advance"]),
        st.integers(0, 7),
        st.integers(1, 20),
    ),
    max_size=80,
)


@given(operations)
def test_eviction_matches_a_brute_force_model(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the mix of writes, eviction removes exactly the expired registrations."""
    store = MemoryStore()
    model: dict[str, float] = {}  # id -> expires_at
    now = 0.0
    for op, key, amount in ops:
        instance_id = f"i{key}"
        current = fired(store.get("web", instance_id, now))
        if op == "create" and current is None:
            fired(store.create(registration(instance_id, now=now, ttl=amount), now))
            model[instance_id] = now + amount
        elif op == "renew" and current is not None:
            fired(store.renew(current, now))
            model[instance_id] = now + current.instance.ttl
        elif op == "delete" and current is not None:
            fired(store.delete(current))
            del model[instance_id]
        elif op == "evict":
            evicted = {i.id for i in store.evict_expired(now, 1000)}
            expected = {k for k, expires in model.items() if expires <= now}
            assert evicted == expected
            for k in expected:
                del model[k]
        elif op == "advance":
            now += amount / 2
        live = {i.id for i in fired(store.instances("web", now))}
        assert live == {k for k, expires in model.items() if now < expires}
