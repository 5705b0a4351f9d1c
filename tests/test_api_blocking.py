"""Blocking queries, the index header and ETags on the discovery routes (StubTreq, Clock)."""

from __future__ import annotations

import json
from random import Random
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from regdisc.api import RegistryAPI
from regdisc.resource import APIResource
from regdisc.registry import Registry
from regdisc.store import MemoryStore

from .conftest import BOUNDS, fired

BASE = "https://registry.test/registry"

# These tests stay synchronous (`fired`) and over the in-memory store only: held
# answers are delivered by moving the registry's Clock and calling StubTreq.flush()
# at chosen moments, and the tests read what only the memory store promises: its
# ChangeFeed's wakeups and waiters, its eviction, and indexes counted from 0.
pytestmark = pytest.mark.parametrize("store", ["memory"], indirect=True)


class Jitterless(Random):
    """A Random whose uniform() is its lower bound, so waits are exact."""

    def uniform(self, a: float, b: float) -> float:
        return a


@pytest.fixture
def treq(registry: Registry) -> StubTreq:
    return StubTreq(APIResource(RegistryAPI(registry, BOUNDS, lambda r: None, random=Jitterless())))


def register(treq: StubTreq, service: str = "web", **fields: Any) -> str:
    body = {"host": "h", "port": 1, **fields}
    response = fired(treq.post(f"{BASE}/services/{service}/instances", json=body))
    assert response.code == 201
    return fired(response.json())["data"]["token"]


class Held:
    """A request whose answer may come later; ``answered`` says whether it has."""

    def __init__(self, d: Any) -> None:
        self.results: list[Any] = []
        self.deferred = d
        d.addBoth(self._keep)

    def _keep(self, result: Any) -> Any:
        self.results.append(result)
        return result

    @property
    def answered(self) -> bool:
        return bool(self.results)

    def response(self) -> Any:
        assert self.results, "no answer yet"
        return self.results[0]


def hold(treq: StubTreq, path: str, **params: str) -> Held:
    return Held(treq.get(BASE + path, params=params))


def index_of(response: Any) -> int:
    return int(response.headers.getRawHeaders("x-regdisc-index")[0])


def test_discovery_answers_carry_the_index(treq: StubTreq) -> None:
    """Discovery answers carry X-Regdisc-Index: the revision of the service's last change."""
    assert index_of(fired(treq.get(f"{BASE}/services/web/instances"))) == 0
    register(treq, "web", id="a")
    register(treq, "api")
    assert index_of(fired(treq.get(f"{BASE}/services/web/instances"))) == 1
    assert index_of(fired(treq.get(f"{BASE}/services/web/instances/a"))) == 1
    assert index_of(fired(treq.get(f"{BASE}/services"))) == 2


def test_blocking_query_returns_early_on_change(treq: StubTreq, clock: Clock) -> None:
    """A blocking query is held until its service changes, then answers the new state."""
    register(treq, "web", id="a")
    held = hold(treq, "/services/web/instances", index="1", wait="30s")
    clock.advance(10)
    treq.flush()
    assert not held.answered
    register(treq, "web", id="b")
    treq.flush()
    response = held.response()
    assert index_of(response) == 2
    assert [i["id"] for i in fired(response.json())["data"]["instances"]] == ["a", "b"]


def test_blocking_query_times_out_with_the_same_index(treq: StubTreq, clock: Clock) -> None:
    """Without a change, a blocking query answers after its wait with the same index."""
    register(treq, "web", id="a")
    held = hold(treq, "/services/web/instances", index="1", wait="5s")
    clock.advance(4.9)
    treq.flush()
    assert not held.answered
    clock.advance(0.1)
    treq.flush()
    response = held.response()
    assert (response.code, index_of(response)) == (200, 1)
    assert clock.getDelayedCalls() == []


def test_wait_defaults_to_a_minute_and_is_capped(treq: StubTreq, clock: Clock) -> None:
    """wait defaults to 60 s; a longer wait is held 10 minutes at most."""
    held = hold(treq, "/services/web/instances", index="0")
    clock.advance(59.9)
    treq.flush()
    assert not held.answered
    clock.advance(0.1)
    treq.flush()
    assert held.answered
    capped = hold(treq, "/services/web/instances", index="0", wait="100m")
    clock.advance(599.9)
    treq.flush()
    assert not capped.answered
    clock.advance(0.1)
    treq.flush()
    assert capped.answered


def test_jitter_stays_within_a_sixteenth(registry: Registry, clock: Clock) -> None:
    """The random extra wait lies between 0 and wait/16."""

    class Highest(Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    treq = StubTreq(APIResource(RegistryAPI(registry, BOUNDS, lambda r: None, random=Highest())))
    held = hold(treq, "/services/web/instances", index="0", wait="16s")
    clock.advance(16.99)
    treq.flush()
    assert not held.answered
    clock.advance(0.01)
    treq.flush()
    assert held.answered


def test_a_change_to_one_service_wakes_no_watcher_of_another(
    treq: StubTreq, store: MemoryStore, clock: Clock
) -> None:
    """Watchers of B stay held while A changes; the feed counts no wakeup for them."""
    on_b = [hold(treq, "/services/b/instances", index="0", wait="30s") for _ in range(10)]
    on_a = hold(treq, "/services/a/instances", index="0", wait="30s")
    register(treq, "a")
    treq.flush()
    assert on_a.answered
    assert not any(held.answered for held in on_b)
    assert store.feed.wakeups == 1


def test_services_list_blocks_too(treq: StubTreq, clock: Clock) -> None:
    """GET /registry/services blocks until the set of services or their counts change."""
    register(treq, "web", id="a")
    held = hold(treq, "/services", index="1", wait="30s")
    register(treq, "web", id="b")
    treq.flush()
    assert fired(held.response().json())["data"]["services"] == [{"name": "web", "instances": 2}]


def test_an_index_from_the_future_answers_at_once(treq: StubTreq) -> None:
    """An index above the registry's revision (it restarted) answers at once."""
    response = fired(treq.get(f"{BASE}/services/web/instances", params={"index": "99", "wait": "30s"}))
    assert index_of(response) == 0


def test_eviction_wakes_blocking_queries(treq: StubTreq, store: MemoryStore, clock: Clock) -> None:
    """A lease that ends wakes the watchers once the lease manager evicts it."""
    register(treq, "web", id="a", ttl=5)
    held = hold(treq, "/services/web/instances", index="1", wait="60s")
    clock.advance(5)
    store.evict_expired(clock.seconds(), 100)
    treq.flush()
    assert fired(held.response().json())["data"]["instances"] == []


@pytest.mark.parametrize("params, field", [({"index": "x"}, "index"), ({"index": "-1"}, "index"),
                                          ({"index": "1", "wait": "soon"}, "wait"),
                                          ({"index": "1", "wait": "5h"}, "wait")])
def test_bad_index_or_wait_is_400(treq: StubTreq, params: dict[str, str], field: str) -> None:
    """A malformed index or wait answers 400 naming it."""
    response = fired(treq.get(f"{BASE}/services/web/instances", params=params))
    body = fired(response.json())
    assert (response.code, body["error"]["code"]) == (400, "invalid_request")
    assert field in body["error"]["details"]


def test_etag_and_304(treq: StubTreq, clock: Clock) -> None:
    """An unchanged answer has the same strong ETag, and If-None-Match gets 304 without a body."""
    token = register(treq, "web", id="a")
    first = fired(treq.get(f"{BASE}/services/web/instances"))
    etag = first.headers.getRawHeaders("etag")[0]
    assert etag.startswith('"') and etag.endswith('"')
    again = fired(treq.get(f"{BASE}/services/web/instances", headers={"If-None-Match": etag}))
    assert again.code == 304
    assert fired(again.content()) == b""
    assert index_of(again) == 1
    clock.advance(1)
    fired(treq.put(f"{BASE}/services/web/instances/a/heartbeat",
                   headers={"Authorization": f"Bearer {token}"}))
    changed = fired(treq.get(f"{BASE}/services/web/instances", headers={"If-None-Match": etag}))
    # The heartbeat moved expires_at: the body differs, so the tag does.
    assert changed.code == 200
    assert changed.headers.getRawHeaders("etag")[0] != etag
    body = fired(changed.content())
    assert json.loads(body)["data"]["instances"][0]["id"] == "a"


def test_a_client_that_leaves_releases_its_waiter(treq: StubTreq, store: MemoryStore) -> None:
    """Cancelling a held query (the client went away) drops its waiter."""
    held = hold(treq, "/services/web/instances", index="0", wait="30s")
    assert store.feed.waiting() == 1
    held.deferred.addErrback(lambda failure: None)  # the cancelled request's own failure
    held.deferred.cancel()
    treq.flush()
    assert store.feed.waiting() == 0
