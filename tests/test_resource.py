"""The API's resource: heartbeats and plain reads routed by hand answer exactly as Klein would.

The whole API suite (tests/test_api.py) runs over `APIResource`; these tests
compare it, request by request, with the Klein app alone, and cover what only
the hand-routed lane does: answering without Klein, and a client that leaves
before its answer is ready.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from regdisc.api import RegistryAPI
from regdisc.model import Peer
from regdisc.registry import Registry
from regdisc.resource import APIResource
from regdisc.store import MemoryStore

from .conftest import BOUNDS, TOKEN_TTL, fired

BASE = "https://registry.test"
ALICE = Peer("CN=alice", "a" * 64, "127.0.0.1:1000")


class Refusing(Resource):
    """Stands for the Klein app, to show that a request never reached it."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        raise AssertionError(f"{request.method!r} {request.uri!r} reached the Klein app")


@pytest.fixture
def memory_api(clock: Clock) -> RegistryAPI:
    return RegistryAPI(Registry(MemoryStore(), clock, TOKEN_TTL), BOUNDS, lambda request: ALICE)


def answer(treq: StubTreq, method: str, path: str, token: str | None = None) -> tuple[int, dict[str, Any], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = fired(treq.request(method, BASE + path, headers=headers))
    body = fired(response.content())
    kept = {
        name: response.headers.getRawHeaders(name)
        for name in ("content-type", "etag", "x-regdisc-index", "allow", "cache-control")
    }
    return response.code, kept, body


def register(treq: StubTreq, service: str, instance_id: str) -> str:
    response = fired(treq.post(
        f"{BASE}/registry/services/{service}/instances",
        json={"id": instance_id, "host": "10.0.0.1", "port": 80},
    ))
    assert response.code == 201
    return fired(response.json())["data"]["token"]


REQUESTS = [
    ("PUT", "/registry/services/web/instances/web-1/heartbeat", "token"),
    ("PUT", "/registry/services/web/instances/web-1/heartbeat", None),
    ("PUT", "/registry/services/web/instances/web-1/heartbeat", "rdt_not-the-token"),
    ("PUT", "/registry/services/web/instances/nobody/heartbeat", "token"),
    ("PUT", "/registry/services/Web!/instances/web-1/heartbeat", "token"),
    ("PUT", "/registry/services/web/instances/-bad-/heartbeat", "token"),
    ("PUT", "/registry/services/web/instances/web%2D1/heartbeat", "token"),
    ("PUT", "/registry/services/web/instances/web-1/heartbeat/", "token"),
    ("PUT", "/registry/services/web/instances//heartbeat", "token"),
    ("GET", "/registry/services/web/instances/web-1/heartbeat", "token"),
    ("GET", "/registry/services/web/instances", None),
    ("GET", "/registry/services/web/instances?", None),
    ("GET", "/registry/services/web/instances?status=up", None),
    ("GET", "/registry/services/web/instances/", None),
    ("GET", "/registry/services/nothing/instances", None),
    ("GET", "/registry/services/NO/instances", None),
    ("GET", "/registry/services/w%65b/instances", None),
    ("GET", "/registry/services//instances", None),
    ("HEAD", "/registry/services/web/instances", None),
    ("DELETE", "/registry/services/web/instances", None),
]


@pytest.mark.parametrize(("method", "path", "credential"), REQUESTS)
def test_answers_as_the_klein_app_does(memory_api: RegistryAPI, method: str, path: str, credential: str | None) -> None:
    """Each request gets the same status, headers and body as from the Klein app alone."""
    routed = StubTreq(memory_api.app.resource())
    token = register(routed, "web", "web-1")
    sent = token if credential == "token" else credential
    by_klein = answer(routed, method, path, sent)
    by_resource = answer(StubTreq(APIResource(memory_api)), method, path, sent)
    assert by_resource == by_klein


def test_heartbeats_and_plain_reads_skip_the_klein_app(memory_api: RegistryAPI) -> None:
    """A heartbeat and a read without a query are answered without the Klein app."""
    token = register(StubTreq(memory_api.app.resource()), "web", "web-1")
    resource = APIResource(memory_api)
    resource._routed = Refusing()
    treq = StubTreq(resource)
    code, _, body = answer(treq, "PUT", "/registry/services/web/instances/web-1/heartbeat", token)
    assert code == 200 and b'"expires_at"' in body
    code, _, body = answer(treq, "GET", "/registry/services/web/instances")
    assert code == 200 and b'"web-1"' in body
    code, _, body = answer(treq, "PUT", "/registry/services/web/instances/web-1/heartbeat", "rdt_wrong")
    assert code == 401 and b'"unauthorized"' in body


class PendingStore(MemoryStore):
    """A memory store whose renewals, once ``holding``, wait until the test lets them go."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.pending: list[tuple[Deferred, Any]] = []
        self.cancelled = 0

    def renew(self, current: Any, now: float) -> Deferred:
        renewed = super().renew(current, now)
        if not self.holding:
            return renewed

        def cancelled(d: Deferred) -> None:
            self.cancelled += 1

        waiting: Deferred = Deferred(cancelled)
        renewed.addCallback(lambda result: self.pending.append((waiting, result)))
        return waiting


def heartbeat_request(token: str) -> DummyRequest:
    request = DummyRequest([b"registry", b"services", b"web", b"instances", b"web-1", b"heartbeat"])
    request.method = b"PUT"
    request.path = b"/registry/services/web/instances/web-1/heartbeat"
    request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    return request


def test_a_later_answer_is_written_when_ready(clock: Clock) -> None:
    """When the store answers later, the heartbeat's answer is written then."""
    store = PendingStore()
    api = RegistryAPI(Registry(store, clock, TOKEN_TTL), BOUNDS, lambda request: ALICE)
    token = register(StubTreq(api.app.resource()), "web", "web-1")
    store.holding = True
    request = heartbeat_request(token)
    APIResource(api).render(request)
    assert request.finished == 0
    waiting, result = store.pending.pop()
    waiting.callback(result)
    assert request.finished == 1
    assert b'"expires_at"' in b"".join(request.written)


def test_a_client_that_leaves_cancels_its_request(clock: Clock) -> None:
    """A client gone before its answer cancels the work, and nothing is written."""
    store = PendingStore()
    api = RegistryAPI(Registry(store, clock, TOKEN_TTL), BOUNDS, lambda request: ALICE)
    token = register(StubTreq(api.app.resource()), "web", "web-1")
    store.holding = True
    request = heartbeat_request(token)
    APIResource(api).render(request)
    request.processingFailed(Failure(ConnectionDone()))  # what a lost connection does to it
    assert store.cancelled == 1
    assert request.written == [] and request.finished == 0


class FailingReads(MemoryStore):
    """A store whose listing of a service fails unexpectedly."""

    def instances(self, service: str, now: float) -> Deferred:
        return fail(RuntimeError("disk on fire"))


def test_an_unexpected_failure_in_the_hand_lane_is_a_logged_500(clock: Clock) -> None:
    """A plain read whose store fails answers 500 internal_error, logged, as through Klein."""
    api = RegistryAPI(Registry(FailingReads(), clock, TOKEN_TTL), BOUNDS, lambda request: ALICE)
    resource = APIResource(api)
    resource._routed = Refusing()
    with capturedLogs() as events:
        code, headers, body = answer(StubTreq(resource), "GET", "/registry/services/web/instances")
    assert code == 500 and headers["content-type"] == ["application/json"]
    assert json.loads(body) == {"error": {"code": "internal_error", "message": "internal error"}}
    [event] = [e for e in events if e.get("event") == "http.internal_error"]
    assert "disk on fire" in event["log_failure"].getTraceback()
