"""The HTTP API, route by route and error by error, over StubTreq (no sockets).

Every test is a coroutine run by pytest-twisted and awaits each request, so the
same tests pass over a store whose Deferreds fire later, from the reactor, as
over the in-memory one, whose Deferreds have fired already.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs

from regdisc.api import MAX_BODY, RegistryAPI
from regdisc.resource import APIResource
from regdisc.model import Instance, Peer
from regdisc.registry import Registry
from regdisc.store import MemoryStore

from .conftest import BOUNDS, START, TOKEN_TTL

BASE = "https://registry.test/registry"

ON_THE_REGISTRY_CLOCK = pytest.mark.parametrize("store", ["memory"], indirect=True)
"""For tests that end leases by moving the registry's clock: the memory store's
leases run on it, etcd's on real time (tests/test_etcd_store.py covers those)."""
ALICE = Peer("CN=alice", "a" * 64, "127.0.0.1:1000")
BOB = Peer("CN=bob", "b" * 64, "127.0.0.1:2000")

ANSWER_PATIENCE = 10.0
"""The longest a request may take to be answered, in seconds of real (reactor) time."""
FLUSH_INTERVAL = 0.001
"""How often, in seconds, a pending request's in-memory connection is flushed."""


@attrs.define
class Answer:
    code: int
    body: Any
    headers: Any

    @property
    def data(self) -> Any:
        assert self.code < 300, self.body
        return self.body["data"]

    @property
    def error(self) -> Any:
        assert set(self.body) == {"error"}, self.body
        return self.body["error"]


class Client:
    """Requests to the API as one peer; await each one.

    Over the in-memory store every answer is ready when the request returns, and
    awaiting it takes no reactor turn; over a store that waits on I/O, `delivered`
    waits for it.
    """

    def __init__(self, api: RegistryAPI, peers: dict[str, Peer | None]) -> None:
        self._treq = StubTreq(APIResource(api))
        self.peers = peers

    def as_peer(self, peer: Peer | None) -> Client:
        self.peers["current"] = peer
        return self

    async def delivered(self, d: Deferred) -> Any:
        """The result of ``d``, a Deferred of StubTreq (a response or a body read).

        StubTreq joins client and server by an in-memory connection whose bytes
        move only when it is flushed. If the API's handler finishes later (its
        store's Deferred fires from the reactor), what it writes then waits in
        that connection, so until ``d`` has its result this flushes it, lets the
        global reactor turn (running the store's I/O) and tries again, every
        `FLUSH_INTERVAL` seconds. It fails the test (and cancels ``d``) if there is
        no result after `ANSWER_PATIENCE` seconds. A Deferred that has fired already, as every one
        over the in-memory store has, is answered at once, without a reactor turn.

        ``d.called`` is no sign of an answer: treq's Deferreds are called early and
        then wait on inner ones, which again need flushing. So this waits for a
        callback added last to ``d``, which runs only once its result is final.
        """
        answered: list[Any] = []

        def keep(result: Any) -> Any:
            answered.append(result)
            return result

        d.addBoth(keep)
        deadline = reactor.seconds() + ANSWER_PATIENCE
        while not answered:
            self._treq.flush()
            if answered:
                break
            if reactor.seconds() > deadline:
                d.addErrback(lambda failure: None)
                d.cancel()
                raise AssertionError(f"no answer within {ANSWER_PATIENCE} s")
            await deferLater(reactor, FLUSH_INTERVAL, lambda: None)
        return await d

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        response = await self.delivered(
            self._treq.request(method, BASE + path, data=data, headers=sent, params=params)
        )
        text = await self.delivered(response.content())
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        return Answer(response.code, json.loads(text), response.headers)

    async def register(self, service: str = "web", **fields: Any) -> Answer:
        body = {"host": "10.0.0.1", "port": 8080, **fields}
        return await self.request("POST", f"/services/{service}/instances", body)

    async def snapshot(self) -> Any:
        """Everything discovery shows, to prove a refused request changed nothing."""
        services = (await self.request("GET", "/services")).data["services"]
        return services, [
            (await self.request("GET", f"/services/{s['name']}/instances")).data
            for s in services
        ]


@pytest.fixture
def peers() -> dict[str, Peer | None]:
    return {"current": ALICE}


@pytest.fixture
def api(registry: Registry, peers: dict[str, Peer | None]) -> RegistryAPI:
    return RegistryAPI(registry, BOUNDS, lambda request: peers["current"])


@pytest.fixture
def client(api: RegistryAPI, peers: dict[str, Peer | None]) -> Client:
    return Client(api, peers)


def instance_path(service: str, instance_id: str, suffix: str = "") -> str:
    return f"/services/{service}/instances/{instance_id}{suffix}"


# Registration.


@pytest_twisted.ensureDeferred
async def test_register_answers_201_with_instance_and_token(client: Client) -> None:
    """Registering answers 201 with the instance, a token and its expiry."""
    answer = await client.register(
        "web", id="web-1", ttl=10, metadata={"zone": "a"}, tags=["blue"], status="starting"
    )
    assert answer.code == 201
    data = answer.data
    assert data["instance"] == {
        "id": "web-1",
        "service": "web",
        "host": "10.0.0.1",
        "port": 8080,
        "status": "starting",
        "metadata": {"zone": "a"},
        "tags": ["blue"],
        "ttl": 10,
        "registered_at": "2027-01-15T08:00:00.000Z",
        "last_heartbeat_at": "2027-01-15T08:00:00.000Z",
        "expires_at": "2027-01-15T08:00:10.000Z",
    }
    assert data["token"].startswith("rdt_")
    assert len(data["token"]) == 4 + 43  # the prefix, then 256 bits in URL-safe base64
    assert data["token_expires_at"] == "2027-01-15T09:00:00.000Z"
    assert answer.headers.getRawHeaders("cache-control") == ["no-store"]


@pytest_twisted.ensureDeferred
async def test_register_fills_defaults_and_generates_an_id(client: Client) -> None:
    """Without id, ttl or status, the registry picks an id, the default TTL and up."""
    first = (await client.register()).data["instance"]
    second = (await client.register()).data["instance"]
    assert first["id"] != second["id"]
    assert first["ttl"] == BOUNDS.default
    assert first["status"] == "up"
    assert first["metadata"] == {} and first["tags"] == []


@pytest_twisted.ensureDeferred
async def test_tokens_differ_per_registration(client: Client) -> None:
    """Every registration gets its own token."""
    tokens = {(await client.register()).data["token"] for _ in range(20)}
    assert len(tokens) == 20


@pytest_twisted.ensureDeferred
async def test_register_live_id_from_another_client_is_409(client: Client) -> None:
    """Registering a live id from another certificate without its token answers 409."""
    await client.register(id="web-1")
    before = await client.snapshot()
    answer = await client.as_peer(BOB).register(id="web-1", port=9999)
    assert answer.code == 409
    assert answer.error["code"] == "instance_exists"
    assert await client.snapshot() == before


@pytest_twisted.ensureDeferred
async def test_register_with_the_token_is_an_update(client: Client) -> None:
    """Registering a live id with its token updates it (200) and keeps the token."""
    token = (await client.register(id="web-1")).data["token"]
    answer = await client.as_peer(BOB).request(
        "POST", "/services/web/instances", {"id": "web-1", "host": "h2", "port": 81}, token=token
    )
    assert answer.code == 200
    assert answer.data["token"] == token
    assert answer.data["instance"]["host"] == "h2"
    heartbeat = await client.request("PUT", instance_path("web", "web-1", "/heartbeat"), token=token)
    assert heartbeat.code == 200


@pytest_twisted.ensureDeferred
async def test_register_from_the_same_certificate_reregisters(client: Client, clock: Clock) -> None:
    """The registering certificate may register its id again: fresh token, old one refused."""
    old = (await client.register(id="web-1")).data["token"]
    clock.advance(5)
    answer = await client.register(id="web-1", port=9090)
    assert answer.code == 200
    new = answer.data["token"]
    assert new != old
    assert answer.data["instance"]["port"] == 9090
    assert answer.data["instance"]["registered_at"] == "2027-01-15T08:00:05.000Z"
    path = instance_path("web", "web-1", "/heartbeat")
    assert (await client.request("PUT", path, token=old)).code == 401
    assert (await client.request("PUT", path, token=new)).code == 200


@ON_THE_REGISTRY_CLOCK
@pytest_twisted.ensureDeferred
async def test_register_over_an_expired_instance_creates_it_anew(client: Client, clock: Clock) -> None:
    """An id whose lease ended may be registered by anyone: 201."""
    await client.register(id="web-1", ttl=5)
    clock.advance(5)
    answer = await client.as_peer(BOB).register(id="web-1")
    assert answer.code == 201


@pytest_twisted.ensureDeferred
async def test_register_without_peer_certificate_cannot_reregister(client: Client) -> None:
    """With no known certificate, a live id can only be taken over with its token."""
    await client.as_peer(None).register(id="web-1")
    assert (await client.register(id="web-1")).code == 409


# Update, heartbeat, rotation, deregistration.


@pytest_twisted.async_fixture
async def registered(client: Client) -> str:
    """The token of web/web-1, registered by ALICE with a TTL of 10 s."""
    return (await client.register(id="web-1", ttl=10, tags=["a"], metadata={"k": "v"})).data["token"]


@pytest_twisted.ensureDeferred
async def test_update_changes_only_named_fields_and_renews(
    client: Client, registered: str, clock: Clock
) -> None:
    """An update changes the fields it names, keeps the rest and renews the lease."""
    clock.advance(4)
    answer = await client.request(
        "PUT", instance_path("web", "web-1"), {"status": "down", "ttl": 20}, token=registered
    )
    instance = answer.data["instance"]
    assert (instance["status"], instance["ttl"]) == ("down", 20)
    assert (instance["host"], instance["port"], instance["tags"]) == ("10.0.0.1", 8080, ["a"])
    assert instance["metadata"] == {"k": "v"}
    assert instance["last_heartbeat_at"] == "2027-01-15T08:00:04.000Z"
    assert instance["expires_at"] == "2027-01-15T08:00:24.000Z"
    assert instance["registered_at"] == "2027-01-15T08:00:00.000Z"


@pytest_twisted.ensureDeferred
async def test_update_needs_a_field(client: Client, registered: str) -> None:
    """An empty update is refused with invalid_request."""
    answer = await client.request("PUT", instance_path("web", "web-1"), {}, token=registered)
    assert (answer.code, answer.error["code"]) == (400, "invalid_request")


@pytest_twisted.ensureDeferred
async def test_update_rejects_id_change(client: Client, registered: str) -> None:
    """An update cannot rename an instance."""
    answer = await client.request("PUT", instance_path("web", "web-1"), {"id": "x"}, token=registered)
    assert answer.code == 400
    assert "id" in answer.error["details"]


@pytest_twisted.ensureDeferred
async def test_heartbeat_renews_the_lease(client: Client, registered: str, clock: Clock) -> None:
    """A heartbeat answers the TTL and the new expiry, and keeps the instance alive."""
    clock.advance(9)
    answer = await client.request("PUT", instance_path("web", "web-1", "/heartbeat"), token=registered)
    assert answer.data == {"ttl": 10, "expires_at": "2027-01-15T08:00:19.000Z"}
    clock.advance(9)
    assert (await client.request("GET", instance_path("web", "web-1"))).code == 200


@pytest_twisted.ensureDeferred
async def test_rotation_replaces_the_token_at_once(client: Client, registered: str) -> None:
    """Rotating answers a new token; the old one stops working at once."""
    answer = await client.request("POST", instance_path("web", "web-1", "/token"), token=registered)
    new = answer.data["token"]
    assert new != registered
    assert answer.data["token_expires_at"] == "2027-01-15T09:00:00.000Z"
    assert answer.headers.getRawHeaders("cache-control") == ["no-store"]
    path = instance_path("web", "web-1", "/heartbeat")
    assert (await client.request("PUT", path, token=registered)).error["code"] == "unauthorized"
    assert (await client.request("PUT", path, token=new)).code == 200


@pytest_twisted.ensureDeferred
async def test_rotation_extends_the_token_lifetime(client: Client, clock: Clock) -> None:
    """A rotated token lives a full token TTL from the rotation."""
    old = (await client.register(id="web-2", ttl=3600)).data["token"]
    path = instance_path("web", "web-2", "/heartbeat")
    clock.advance(TOKEN_TTL - 10)
    assert (await client.request("PUT", path, token=old)).code == 200
    new = (await client.request("POST", instance_path("web", "web-2", "/token"), token=old)).data
    clock.advance(20)
    assert (await client.request("PUT", path, token=new["token"])).code == 200


@pytest_twisted.ensureDeferred
async def test_deregister_answers_the_removed_instance(client: Client, registered: str) -> None:
    """Deregistering answers the instance as it was; it is then gone."""
    answer = await client.request("DELETE", instance_path("web", "web-1"), token=registered)
    assert answer.data["instance"]["id"] == "web-1"
    assert (await client.request("GET", instance_path("web", "web-1"))).code == 404
    assert (await client.request("GET", "/services")).data == {"services": []}


# Tokens.


@pytest.mark.parametrize(
    "method, suffix, body",
    [
        ("PUT", "", {"port": 1}),
        ("PUT", "/heartbeat", None),
        ("POST", "/token", None),
        ("DELETE", "", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_token_is_required(
    client: Client, registered: str, method: str, suffix: str, body: Any
) -> None:
    """Every instance operation refuses a missing, malformed or wrong token with 401."""
    before = await client.snapshot()
    path = instance_path("web", "web-1", suffix)
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "},
                    {"Authorization": "Bearer wrong"}):
        answer = await client.request(method, path, body, headers=headers)
        assert answer.code == 401
        assert answer.error["code"] == "unauthorized"
        assert answer.headers.getRawHeaders("www-authenticate")[0].startswith("Bearer")
        assert registered not in json.dumps(answer.body)
    assert await client.snapshot() == before


@pytest_twisted.ensureDeferred
async def test_token_of_one_instance_fails_for_another(client: Client, registered: str) -> None:
    """A token of one instance never works for another, even of the same client."""
    await client.register(id="web-2")
    answer = await client.request("PUT", instance_path("web", "web-2", "/heartbeat"), token=registered)
    assert answer.error["code"] == "unauthorized"


@pytest_twisted.ensureDeferred
async def test_token_of_same_id_in_another_service_fails(client: Client, registered: str) -> None:
    """Ids are scoped by service: web-1 of another service has its own token."""
    await client.register("api", id="web-1")
    answer = await client.request("PUT", instance_path("api", "web-1", "/heartbeat"), token=registered)
    assert answer.error["code"] == "unauthorized"


@pytest_twisted.ensureDeferred
async def test_expired_token_answers_token_expired(client: Client, clock: Clock) -> None:
    """A token past its lifetime answers 401 token_expired."""
    token = (await client.register(id="web-1", ttl=3600)).data["token"]
    clock.advance(TOKEN_TTL - 1)
    await client.request("PUT", instance_path("web", "web-1", "/heartbeat"), token=token)
    clock.advance(1)
    answer = await client.request("PUT", instance_path("web", "web-1", "/heartbeat"), token=token)
    assert (answer.code, answer.error["code"]) == (401, "token_expired")
    assert answer.headers.getRawHeaders("www-authenticate") == ['Bearer error="invalid_token"']


@pytest_twisted.ensureDeferred
async def test_expired_token_is_no_registration_update(client: Client, clock: Clock) -> None:
    """An expired token does not let another client update by registering."""
    token = (await client.register(id="web-1", ttl=3600)).data["token"]
    clock.advance(TOKEN_TTL - 1)
    await client.request("PUT", instance_path("web", "web-1", "/heartbeat"), token=token)
    clock.advance(1)
    answer = await client.as_peer(BOB).request(
        "POST", "/services/web/instances", {"id": "web-1", "host": "h", "port": 1}, token=token
    )
    assert answer.code == 409


@pytest.mark.parametrize("suffix, method", [("", "PUT"), ("/heartbeat", "PUT"), ("/token", "POST"), ("", "DELETE"), ("", "GET")])
@pytest_twisted.ensureDeferred
async def test_unknown_instance_is_404(client: Client, registered: str, suffix: str, method: str) -> None:
    """Operations on an unknown instance answer 404 instance_not_found."""
    body = {"port": 1} if method == "PUT" and not suffix else None
    answer = await client.request(method, instance_path("web", "nope", suffix), body, token=registered)
    assert (answer.code, answer.error["code"]) == (404, "instance_not_found")


@ON_THE_REGISTRY_CLOCK
@pytest_twisted.ensureDeferred
async def test_expired_instance_is_404_before_eviction(client: Client, registered: str, clock: Clock) -> None:
    """Once its lease ends, an instance answers 404 even before the lease manager runs."""
    clock.advance(10)
    answer = await client.request("PUT", instance_path("web", "web-1", "/heartbeat"), token=registered)
    assert answer.error["code"] == "instance_not_found"


@pytest_twisted.ensureDeferred
async def test_tokens_never_appear_in_logs_or_instances(client: Client) -> None:
    """No token reaches a log event or an instance's JSON."""
    with capturedLogs() as events:
        answer = await client.register(id="web-1")
        token = answer.data["token"]
        await client.as_peer(BOB).register(id="web-1")
        await client.request("PUT", instance_path("web", "web-1", "/heartbeat"), token="wrong")
        rotated = await client.request("POST", instance_path("web", "web-1", "/token"), token=token)
        new = rotated.data["token"]
        listed = await client.request("GET", "/services/web/instances")
    assert events, "lifecycle events are logged"
    text = repr(events)
    assert token not in text and new not in text
    assert token not in json.dumps(listed.body) and new not in json.dumps(listed.body)


@pytest_twisted.ensureDeferred
async def test_lifecycle_events_are_logged(client: Client, clock: Clock) -> None:
    """Registration, update, re-registration, rotation and deregistration are logged."""
    with capturedLogs() as events:
        token = (await client.register(id="web-1")).data["token"]
        await client.request("PUT", instance_path("web", "web-1"), {"port": 2}, token=token)
        token = (await client.register(id="web-1")).data["token"]
        token = (await client.request("POST", instance_path("web", "web-1", "/token"), token=token)).data["token"]
        await client.request("DELETE", instance_path("web", "web-1"), token=token)
        await client.request("DELETE", instance_path("web", "web-1"), token="x")
    # Only the registry's own events: a store doing I/O may log too (a new connection).
    events = [e for e in events if e.get("log_namespace") == "regdisc.registry.Registry"]
    kinds = [e.get("event") for e in events]
    assert kinds == [
        "instance.registered",
        "instance.updated",
        "instance.reregistered",
        "instance.token_rotated",
        "instance.deregistered",
    ]
    assert all(e["peer_subject"] == "CN=alice" for e in events)


@pytest_twisted.ensureDeferred
async def test_auth_failures_are_logged_with_the_peer(client: Client, registered: str) -> None:
    """A refused token is logged as a security event naming the peer and its address."""
    with capturedLogs() as events:
        await client.as_peer(BOB).request("PUT", instance_path("web", "web-1", "/heartbeat"), token="bad")
    [event] = [e for e in events if e.get("log_namespace") == "regdisc.registry.Registry"]
    assert event["event"] == "auth.failed"
    assert (event["peer_subject"], event["peer_address"]) == ("CN=bob", "127.0.0.1:2000")
    assert event["code"] == "unauthorized"


# Discovery.


@ON_THE_REGISTRY_CLOCK
@pytest_twisted.ensureDeferred
async def test_services_lists_live_services_sorted_with_counts(client: Client, clock: Clock) -> None:
    """The service list is sorted by name and counts only live instances."""
    await client.register("web", ttl=5)
    await client.register("web", ttl=50)
    await client.register("api", ttl=50)
    await client.register("cache", ttl=5)
    assert (await client.request("GET", "/services")).data == {
        "services": [
            {"name": "api", "instances": 1},
            {"name": "cache", "instances": 1},
            {"name": "web", "instances": 2},
        ]
    }
    clock.advance(5)
    assert (await client.request("GET", "/services")).data == {
        "services": [{"name": "api", "instances": 1}, {"name": "web", "instances": 1}]
    }


@pytest_twisted.ensureDeferred
async def test_instances_of_unknown_service_is_empty(client: Client) -> None:
    """An unknown service has an empty instance list, not an error."""
    answer = await client.request("GET", "/services/nothing/instances")
    assert answer.data == {"service": "nothing", "instances": []}


@pytest_twisted.ensureDeferred
async def test_instances_are_sorted_by_id(client: Client) -> None:
    """Instances come sorted by id."""
    for instance_id in ("c", "a", "b"):
        await client.register(id=instance_id)
    ids = [i["id"] for i in (await client.request("GET", "/services/web/instances")).data["instances"]]
    assert ids == ["a", "b", "c"]


@ON_THE_REGISTRY_CLOCK
@pytest_twisted.ensureDeferred
async def test_expired_instances_are_never_listed(client: Client, clock: Clock) -> None:
    """Discovery drops an instance the moment its lease ends, lease manager or not."""
    await client.register(id="web-1", ttl=5)
    clock.advance(4.999)
    assert len((await client.request("GET", "/services/web/instances")).data["instances"]) == 1
    clock.advance(0.001)
    assert (await client.request("GET", "/services/web/instances")).data["instances"] == []
    assert (await client.request("GET", instance_path("web", "web-1"))).code == 404


@pytest_twisted.ensureDeferred
async def test_instance_filters(client: Client) -> None:
    """status, tag (all must match) and meta.KEY filters narrow the list."""
    await client.register(id="a", status="up", tags=["x", "y"], metadata={"zone": "1"})
    await client.register(id="b", status="down", tags=["x"], metadata={"zone": "2"})
    await client.register(id="c", status="up", tags=["y"], metadata={"zone": "1", "v": "2"})

    async def ids(params: Any) -> list[str]:
        answer = await client.request("GET", "/services/web/instances", params=params)
        return [i["id"] for i in answer.data["instances"]]

    assert await ids({"status": "up"}) == ["a", "c"]
    assert await ids([("tag", "x")]) == ["a", "b"]
    assert await ids([("tag", "x"), ("tag", "y")]) == ["a"]
    assert await ids({"meta.zone": "1"}) == ["a", "c"]
    assert await ids({"meta.zone": "1", "meta.v": "2"}) == ["c"]
    assert await ids({"status": "up", "tag": "x", "meta.zone": "1"}) == ["a"]
    assert await ids({"meta.zone": "3"}) == []


@pytest_twisted.ensureDeferred
async def test_bad_status_filter_is_400(client: Client) -> None:
    """A status filter that names no status answers 400 naming the field."""
    answer = await client.request("GET", "/services/web/instances", params={"status": "sleepy"})
    assert (answer.code, answer.error["code"]) == (400, "invalid_request")
    assert "status" in answer.error["details"]


@pytest_twisted.ensureDeferred
async def test_get_instance(client: Client, registered: str) -> None:
    """Reading one instance answers it."""
    answer = await client.request("GET", instance_path("web", "web-1"))
    assert answer.data["instance"]["id"] == "web-1"
    assert "token" not in json.dumps(answer.body)


# Bad input.


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400_invalid_json(client: Client) -> None:
    """A body that is not JSON answers 400 invalid_json and changes nothing."""
    for raw in (b"{", b"", b"\xff\xfe", b"{'a': 1}"):
        answer = await client.request("POST", "/services/web/instances", raw=raw)
        assert (answer.code, answer.error["code"]) == (400, "invalid_json"), raw
    assert await client.snapshot() == ([], [])


@pytest.mark.parametrize(
    "body, fields",
    [
        ({}, {"host", "port"}),
        ({"host": "h"}, {"port"}),
        ([], {"body"}),
        ("x", {"body"}),
        ({"host": 1, "port": "80"}, {"host", "port"}),
        ({"host": "h", "port": 0}, {"port"}),
        ({"host": "h", "port": 65536}, {"port"}),
        ({"host": "h", "port": True}, {"port"}),
        ({"host": "h", "port": 1.5}, {"port"}),
        ({"host": "-bad-", "port": 1}, {"host"}),
        ({"host": "a" * 64 + ".com", "port": 1}, {"host"}),
        ({"host": "h", "port": 1, "ttl": 0}, {"ttl"}),
        ({"host": "h", "port": 1, "ttl": 3601}, {"ttl"}),
        ({"host": "h", "port": 1, "ttl": "30"}, {"ttl"}),
        ({"host": "h", "port": 1, "status": "sleepy"}, {"status"}),
        ({"host": "h", "port": 1, "metadata": []}, {"metadata"}),
        ({"host": "h", "port": 1, "metadata": {"k": 1}}, {"metadata"}),
        ({"host": "h", "port": 1, "metadata": {"bad key": "v"}}, {"metadata"}),
        ({"host": "h", "port": 1, "metadata": {"k": "v" * 1025}}, {"metadata"}),
        ({"host": "h", "port": 1, "metadata": {f"k{i}": "v" for i in range(65)}}, {"metadata"}),
        ({"host": "h", "port": 1, "tags": "a"}, {"tags"}),
        ({"host": "h", "port": 1, "tags": [1]}, {"tags"}),
        ({"host": "h", "port": 1, "tags": [""]}, {"tags"}),
        ({"host": "h", "port": 1, "tags": ["x" * 129]}, {"tags"}),
        ({"host": "h", "port": 1, "tags": [str(i) for i in range(65)]}, {"tags"}),
        ({"host": "h", "port": 1, "id": "has space"}, {"id"}),
        ({"host": "h", "port": 1, "id": "x" * 129}, {"id"}),
        ({"host": "h", "port": 1, "id": 7}, {"id"}),
        ({"host": "h", "port": 1, "colour": "red"}, {"colour"}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_registration_is_400_naming_each_field(
    client: Client, body: Any, fields: set[str]
) -> None:
    """A missing, mistyped or out-of-range field answers 400 naming each such field."""
    answer = await client.request("POST", "/services/web/instances", body)
    assert (answer.code, answer.error["code"]) == (400, "invalid_request")
    assert set(answer.error["details"]) == fields
    assert await client.snapshot() == ([], [])


@pytest_twisted.ensureDeferred
async def test_invalid_update_changes_nothing(client: Client, registered: str) -> None:
    """A bad update answers 400 and leaves the instance as it was."""
    before = await client.snapshot()
    answer = await client.request(
        "PUT", instance_path("web", "web-1"), {"port": 0, "status": "x"}, token=registered
    )
    assert set(answer.error["details"]) == {"port", "status"}
    assert await client.snapshot() == before


@pytest_twisted.ensureDeferred
async def test_host_accepts_names_and_ip_literals(client: Client) -> None:
    """Host names and IPv4/IPv6 literals are accepted; IPv6 is normalised."""
    for host, shown in (("db.internal", "db.internal"), ("10.1.2.3", "10.1.2.3"),
                        ("2001:DB8::1", "2001:db8::1"), ("localhost", "localhost")):
        assert (await client.register(host=host)).data["instance"]["host"] == shown


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "a" * 64, "wéb"])
@pytest_twisted.ensureDeferred
async def test_bad_service_name_is_400(client: Client, name: str) -> None:
    """A service name that is not a lowercase DNS label answers 400 on every route."""
    for method, path in (
        ("POST", f"/services/{name}/instances"),
        ("GET", f"/services/{name}/instances"),
        ("GET", f"/services/{name}/instances/x"),
        ("PUT", f"/services/{name}/instances/x/heartbeat"),
    ):
        body = {"host": "h", "port": 1} if method == "POST" else None
        answer = await client.request(method, path, body)
        assert (answer.code, answer.error["code"]) == (400, "invalid_request"), (method, path)
        assert "service" in answer.error["details"]


@pytest_twisted.ensureDeferred
async def test_bad_instance_id_in_path_is_400(client: Client) -> None:
    """An instance id in a path that breaks the id rules answers 400."""
    answer = await client.request("GET", "/services/web/instances/" + "x" * 129)
    assert (answer.code, answer.error["details"].keys()) == (400, {"id"})


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
@pytest_twisted.ensureDeferred
async def test_non_json_body_is_415(client: Client, content_type: str | None) -> None:
    """A body that is not sent as application/json answers 415."""
    headers = {"Content-Type": content_type} if content_type else {}
    answer = await (client.request(
        "POST", "/services/web/instances", raw=b'{"host":"h","port":1}', headers=headers
    ) if content_type else _post_without_content_type(client))
    assert (answer.code, answer.error["code"]) == (415, "unsupported_media_type")
    assert await client.snapshot() == ([], [])


async def _post_without_content_type(client: Client) -> Answer:
    response = await client.delivered(
        client._treq.request("POST", BASE + "/services/web/instances", data=b'{"host":"h","port":1}')
    )
    return Answer(
        response.code, json.loads(await client.delivered(response.content())), response.headers
    )


@pytest_twisted.ensureDeferred
async def test_json_with_charset_is_accepted(client: Client) -> None:
    """application/json with a charset parameter is JSON."""
    answer = await client.request(
        "POST",
        "/services/web/instances",
        raw=b'{"host":"h","port":1}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert answer.code == 201


@pytest_twisted.ensureDeferred
async def test_body_over_64_kib_is_413(client: Client) -> None:
    """A body over 64 KiB answers 413 and changes nothing."""
    body = {"host": "h", "port": 1, "metadata": {"k": "v" * MAX_BODY}}
    answer = await client.request("POST", "/services/web/instances", body)
    assert (answer.code, answer.error["code"]) == (413, "payload_too_large")
    assert await client.snapshot() == ([], [])


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404_not_found(client: Client) -> None:
    """An unknown path answers 404 not_found as JSON."""
    for path in ("/nothing", "/services/web/instances/a/b/c", "/services/web"):
        answer = await client.request("GET", path)
        assert (answer.code, answer.error["code"]) == (404, "not_found")


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(client: Client) -> None:
    """A method a path does not take answers 405 with an Allow header."""
    answer = await client.request("PATCH", instance_path("web", "x"))
    assert (answer.code, answer.error["code"]) == (405, "method_not_allowed")
    allowed = answer.headers.getRawHeaders("allow")[0]
    assert set(allowed.split(", ")) >= {"GET", "PUT", "DELETE"}
    assert (await client.request("DELETE", "/services")).code == 405


class BrokenStore(MemoryStore):
    """A store whose discovery reads fail unexpectedly."""

    def services(self, now: float) -> Any:
        return fail(RuntimeError("disk on fire: secret-ish detail"))


@pytest_twisted.ensureDeferred
async def test_unexpected_error_is_500_without_traceback(clock: Clock) -> None:
    """An unexpected exception answers 500 internal_error and is logged with its traceback."""
    peers: dict[str, Peer | None] = {"current": None}
    api = RegistryAPI(Registry(BrokenStore(), clock, TOKEN_TTL), BOUNDS, lambda r: None)
    with capturedLogs() as events:
        answer = await Client(api, peers).request("GET", "/services")
    assert answer.code == 500
    assert answer.body == {"error": {"code": "internal_error", "message": "internal error"}}
    [event] = [e for e in events if e.get("event") == "http.internal_error"]
    assert "disk on fire" in event["log_failure"].getTraceback()


@pytest_twisted.ensureDeferred
async def test_clock_start_is_the_documented_moment() -> None:
    """The fixtures' clock starts at 2027-01-15T08:00:00Z, which the tests above rely on."""
    from regdisc.model import rfc3339

    assert rfc3339(START) == "2027-01-15T08:00:00.000Z"


@pytest_twisted.ensureDeferred
async def test_discovery_renders_once_per_change(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated reads of an unchanged service reuse one rendering; a heartbeat renders anew."""
    token = (await client.register(id="web-1")).data["token"]
    rendered: list[str] = []
    original = Instance.to_json

    def counting(self: Instance) -> dict[str, Any]:
        rendered.append(self.id)
        return original(self)

    monkeypatch.setattr(Instance, "to_json", counting)
    first = [(await client.request("GET", "/services/web/instances")).body for _ in range(5)]
    assert rendered == ["web-1"] and all(body == first[0] for body in first)
    await client.request("PUT", instance_path("web", "web-1", "/heartbeat"), token=token)
    await client.request("GET", "/services/web/instances")
    assert rendered == ["web-1", "web-1"]


@pytest_twisted.ensureDeferred
async def test_a_mirrored_store_says_how_old_its_view_is(client: Client, store: Any) -> None:
    """Discovery over a mirrored store (etcd) carries X-Regdisc-Mirror-Age; memory does not."""
    answer = await client.request("GET", "/services")
    age = answer.headers.getRawHeaders("x-regdisc-mirror-age")
    if store.mirror_age() is None:
        assert age is None
    else:
        assert float(age[0]) >= 0


@pytest_twisted.ensureDeferred
async def test_discovery_waits_for_the_store_to_load(clock: Clock) -> None:
    """Until its store has loaded, a node answers discovery with 503 and Retry-After."""
    from twisted.internet.defer import Deferred

    loading = MemoryStore()
    loading.ready = Deferred()
    api = RegistryAPI(Registry(loading, clock, TOKEN_TTL), BOUNDS, lambda r: None)
    client = Client(api, {"current": None})
    answer = await client.request("GET", "/services/web/instances")
    assert (answer.code, answer.error["code"]) == (503, "backend_unavailable")
    assert answer.headers.getRawHeaders("retry-after") == ["1"]
    loading.ready.callback(None)
    assert (await client.request("GET", "/services/web/instances")).code == 200
