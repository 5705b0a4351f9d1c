"""The event stream, ``GET /registry/events``, over an in-memory HTTP connection (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from regdisc import stream
from regdisc.api import RegistryAPI
from regdisc.resource import APIResource
from regdisc.feed import Change, ChangeFeed
from regdisc.lease import LeaseService
from regdisc.model import Instance, Peer
from regdisc.registry import Issued, Registry
from regdisc.site import RegistrySite
from regdisc.store import MemoryStore
from regdisc.stream import EventStream, StreamLimits
from regdisc.validation import InstanceSpec

from .conftest import BOUNDS, START, TOKEN_TTL, fired

ALICE = Peer("CN=alice", "a" * 64, "127.0.0.1:4000")
ADDRESS = IPv4Address("TCP", "127.0.0.1", 4000)


@attrs.frozen
class Event:
    """One event or comment block as a client parses it."""

    id: int | None = None
    event: str | None = None
    data: Any = None
    comment: str | None = None


def parse_events(text: str) -> list[Event]:
    """The complete blocks of an event stream, each a field per line, blocks ended by a blank line."""
    events = []
    for block in text.split("\n\n")[:-1]:
        fields: dict[str, Any] = {}
        data: list[str] = []
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                fields["comment"] = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                fields["id"] = int(value)
            else:
                fields[name] = value
        events.append(Event(data=json.loads("\n".join(data)) if data else None, **fields))
    return events


def dechunk(body: bytes) -> bytes:
    """The complete chunks of a chunked body, joined."""
    out = []
    while True:
        size, found, rest = body.partition(b"\r\n")
        if not found or int(size, 16) == 0 or len(rest) < int(size, 16) + 2:
            return b"".join(out)
        out.append(rest[: int(size, 16)])
        body = rest[int(size, 16) + 2 :]


class Connection:
    """One request to the real site on an in-memory HTTP connection."""

    def __init__(self, site: RegistrySite, target: str, headers: dict[str, str], method: str) -> None:
        self.protocol = site.buildProtocol(ADDRESS)
        self.transport = StringTransport(peerAddress=ADDRESS)
        self.protocol.makeConnection(self.transport)
        lines = [f"{method} {target} HTTP/1.1", "Host: registry"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())

    @property
    def head(self) -> tuple[int, dict[str, str]]:
        text = self.transport.value().partition(b"\r\n\r\n")[0].decode()
        status, *lines = text.split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        return int(status.split(" ")[1]), {k.lower(): v for k, v in headers.items()}

    def body(self) -> bytes:
        return dechunk(self.transport.value().partition(b"\r\n\r\n")[2])

    def events(self) -> list[Event]:
        return parse_events(self.body().decode())

    def changes(self) -> list[Event]:
        """The events, without comments."""
        return [e for e in self.events() if e.comment is None]

    def error(self) -> Any:
        return json.loads(self.body())["error"]

    def pause(self) -> None:
        """The transport's buffer is full: it pauses the channel, its producer."""
        self.transport.producer.pauseProducing()

    def resume(self) -> None:
        self.transport.producer.resumeProducing()

    def close(self) -> None:
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionDone("the client went away")))


@attrs.define
class World:
    """A registry on a clock with its API on a site, and helpers to change and watch it."""

    clock: Clock
    feed: ChangeFeed
    store: MemoryStore
    registry: Registry
    site: RegistrySite

    @classmethod
    def create(cls, clock: Clock, history: int = 10_000) -> World:
        feed = ChangeFeed(history=history)
        store = MemoryStore(feed)
        registry = Registry(store, clock, TOKEN_TTL)
        api = RegistryAPI(registry, BOUNDS, lambda request: ALICE)
        return cls(clock, feed, store, registry, RegistrySite(APIResource(api), reactor=clock))

    def open(self, query: str = "", headers: dict[str, str] | None = None, method: str = "GET") -> Connection:
        return Connection(self.site, "/registry/events" + query, headers or {}, method)

    def register(self, service: str, instance_id: str, ttl: int = 30, **fields: Any) -> Issued:
        spec = InstanceSpec(host="10.0.0.1", port=8080, ttl=ttl, id=instance_id, **fields)
        return fired(ensureDeferred(self.registry.register(service, spec, None, None)))

    def update(self, issued: Issued, **changes: Any) -> Instance:
        i = issued.instance
        return fired(ensureDeferred(self.registry.update(i.service, i.id, changes, issued.token, None)))

    def deregister(self, issued: Issued) -> Instance:
        i = issued.instance
        return fired(ensureDeferred(self.registry.deregister(i.service, i.id, issued.token, None)))


@pytest.fixture
def world(clock: Clock) -> World:
    return World.create(clock)


@pytest.fixture(autouse=True)
def no_stream_outlives_its_test() -> Any:
    assert stream.open_streams() == 0
    yield
    assert stream.open_streams() == 0


def kinds(events: list[Event]) -> list[tuple[int | None, str | None, str]]:
    return [(e.id, e.event, e.data["instance"]["id"]) for e in events]


def assert_gone(world: World) -> None:
    """Nothing of any stream remains: no listener, no timer, none counted open."""
    assert world.feed.listening() == 0
    assert world.clock.getDelayedCalls() == []
    assert stream.open_streams() == 0


# Frames.


def test_change_event_is_id_event_and_one_line_of_json() -> None:
    """A change is sent as ``id``, ``event`` and one ``data`` line holding its JSON."""
    instance = Instance(
        service="web", id="w1", host="h", port=1, status="up", metadata={"note": "a\nb"},
        tags=(), ttl=30, registered_at=START, last_heartbeat_at=START, expires_at=START + 30,
    )
    change = Change(7, "registered", instance)
    sent = stream.change_event(change)
    head, data = sent.split(b"\ndata: ")
    assert head == b"id: 7\nevent: registered"
    assert data.endswith(b"\n\n") and data.count(b"\n") == 2
    assert json.loads(data) == change.to_json()


def test_frame_splits_data_lines_and_comments() -> None:
    """Multi-line data becomes one data field per line; a comment starts with a colon."""
    assert stream.frame("a\nb\r\nc", event="x") == b"event: x\ndata: a\ndata: b\ndata: c\n\n"
    assert stream.comment("keep-alive") == b": keep-alive\n\n"


# Opening a stream.


def test_fresh_stream_says_where_it_starts(world: World) -> None:
    """Without a start, the stream answers 200 event-stream and a ``: revision R`` comment."""
    world.register("web", "w1")
    connection = world.open()
    status, headers = connection.head
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-store"
    assert connection.events() == [Event(comment="revision 1")]
    assert world.feed.listening() == 1 and stream.open_streams() == 1
    connection.close()


@pytest.mark.parametrize(
    "query, headers, field",
    [
        ("?service=Web", {}, "service"),
        ("?service=web&service=", {}, "service"),
        ("?since=abc", {}, "since"),
        ("?since=-1", {}, "since"),
        ("?since=" + "9" * 20, {}, "since"),
        ("?since=3", {"Last-Event-ID": "x3"}, "Last-Event-ID"),
    ],
)
def test_bad_query_is_400_and_opens_nothing(
    world: World, query: str, headers: dict[str, str], field: str
) -> None:
    """A bad service, ``since`` or ``Last-Event-ID`` answers 400 invalid_request and no stream."""
    connection = world.open(query, headers)
    status, response_headers = connection.head
    assert (status, response_headers["content-type"]) == (400, "application/json")
    error = connection.error()
    assert error["code"] == "invalid_request" and field in error["details"]
    assert world.feed.listening() == 0 and stream.open_streams() == 0
    connection.close()  # the idle connection's own timeout goes with it
    assert_gone(world)


def test_head_answers_the_headers_only(world: World) -> None:
    """HEAD answers the stream's headers and holds nothing open."""
    connection = world.open(method="HEAD")
    status, headers = connection.head
    assert (status, headers["content-type"]) == (200, "text/event-stream")
    assert connection.transport.value().endswith(b"\r\n\r\n")
    assert world.feed.listening() == 0 and stream.open_streams() == 0
    connection.close()
    assert_gone(world)


# Live changes.


def test_changes_arrive_in_order_with_increasing_ids(world: World) -> None:
    """Register, update and deregister arrive as events in order, each id its revision."""
    connection = world.open()
    issued = world.register("web", "w1")
    world.update(issued, status="down")
    world.deregister(issued)
    events = connection.changes()
    assert kinds(events) == [(1, "registered", "w1"), (2, "updated", "w1"), (3, "deregistered", "w1")]
    assert events[1].data["instance"]["status"] == "down"
    assert [e.data["revision"] for e in events] == [1, 2, 3]
    assert all(e.data["service"] == "web" and e.data["kind"] == e.event for e in events)
    connection.close()


def test_eviction_is_an_evicted_event(world: World) -> None:
    """An instance the lease manager evicts arrives as an ``evicted`` event."""
    leases = LeaseService(world.store, world.clock, interval=1)
    leases.startService()
    connection = world.open("?service=web")
    world.register("web", "w1", ttl=5)
    world.clock.advance(4)
    assert kinds(connection.changes()) == [(1, "registered", "w1")]
    world.clock.advance(1)
    assert kinds(connection.changes()) == [(1, "registered", "w1"), (2, "evicted", "w1")]
    connection.close()
    fired(leases.stopService())
    assert_gone(world)


def test_a_stream_of_one_service_sees_no_other(world: World) -> None:
    """A stream of some services is sent their changes only; one of none is sent all."""
    web = world.open("?service=web")
    both = world.open("?service=web&service=api")
    everything = world.open()
    world.register("web", "w1")
    world.register("api", "a1")
    world.register("db", "d1")
    assert kinds(web.changes()) == [(1, "registered", "w1")]
    assert kinds(both.changes()) == [(1, "registered", "w1"), (2, "registered", "a1")]
    assert [e.id for e in everything.changes()] == [1, 2, 3]
    for connection in (web, both, everything):
        connection.close()
    assert_gone(world)


def test_keep_alive_comments_follow_the_clock(world: World) -> None:
    """A ``: keep-alive`` comment is sent every 15 seconds, not before."""
    connection = world.open()
    world.clock.advance(14.9)
    assert connection.events() == [Event(comment="revision 0")]
    world.clock.advance(0.1)
    assert connection.events()[1:] == [Event(comment="keep-alive")]
    world.clock.advance(15)
    assert connection.events()[1:] == [Event(comment="keep-alive")] * 2
    connection.close()
    assert_gone(world)


# Resuming.


def test_reconnecting_with_last_event_id_loses_and_repeats_nothing(world: World) -> None:
    """Reconnecting with the last id seen replays exactly the changes missed since."""
    first = world.open("?service=web")
    issued = world.register("web", "w1")
    world.register("api", "a1")
    world.update(issued, status="down")
    seen = first.changes()
    first.close()
    world.deregister(issued)
    world.register("web", "w2")
    world.register("api", "a2")
    second = world.open("?service=web", {"Last-Event-ID": str(seen[-1].id)})
    world.register("web", "w3")
    replayed = second.changes()
    assert kinds(seen) == [(1, "registered", "w1"), (3, "updated", "w1")]
    assert kinds(replayed) == [(4, "deregistered", "w1"), (5, "registered", "w2"), (7, "registered", "w3")]
    assert second.events()[0].comment is None  # a resumed stream starts with its events
    second.close()
    assert_gone(world)


def test_last_event_id_takes_precedence_over_since(world: World) -> None:
    """``Last-Event-ID`` wins over ``since``; ``since`` alone replays from there."""
    for n in range(4):
        world.register("web", f"w{n}")
    by_header = world.open("?since=0", {"Last-Event-ID": "2"})
    by_query = world.open("?since=3")
    assert [e.id for e in by_header.changes()] == [3, 4]
    assert [e.id for e in by_query.changes()] == [4]
    by_header.close()
    by_query.close()


def test_a_change_during_replay_is_sent_once(world: World) -> None:
    """A change recorded while the history is replayed is sent once, after it."""
    world.register("web", "w1")
    original = world.feed.since
    issued: list[Issued] = []

    def since_then_change(revision: int, services: Any = None) -> Any:
        replay = original(revision, services)
        issued.append(world.register("web", "w2"))  # the listener hears it, mid-start
        return replay + original(replay[-1].revision, services)  # and so does the history

    world.feed.since = since_then_change  # type: ignore[method-assign]
    connection = world.open("?since=0")
    assert kinds(connection.changes()) == [(1, "registered", "w1"), (2, "registered", "w2")]
    connection.close()


def test_history_overflow_answers_resync_with_the_current_state(clock: Clock) -> None:
    """When the history no longer reaches back, a ``resync`` event carries the live instances."""
    world = World.create(clock, history=5)
    issued = [world.register("web", f"w{n}") for n in range(4)]
    world.register("api", "a0")
    for one in issued[:3]:
        world.deregister(one)
    connection = world.open("?service=web&service=db", {"Last-Event-ID": "1"})
    [resync] = connection.events()
    assert (resync.id, resync.event) == (8, "resync")
    assert resync.data["revision"] == 8
    assert {name: [i["id"] for i in found] for name, found in resync.data["services"].items()} == {
        "db": [],
        "web": ["w3"],
    }
    world.deregister(issued[3])
    assert kinds(connection.changes()[1:]) == [(9, "deregistered", "w3")]
    connection.close()
    assert_gone(world)


def test_resync_of_every_service_lists_those_with_instances(clock: Clock) -> None:
    """An unfiltered resync holds every service with a live instance."""
    world = World.create(clock, history=2)
    for service in ("web", "api", "db"):
        world.register(service, service + "1")
    connection = world.open("?since=0")
    [resync] = connection.events()
    assert resync.event == "resync"
    assert sorted(resync.data["services"]) == ["api", "db", "web"]
    connection.close()


def test_since_ahead_of_the_registry_resyncs(world: World) -> None:
    """A start after the registry's revision (it restarted) resyncs rather than waits."""
    world.register("web", "w1")
    connection = world.open("?service=web", {"Last-Event-ID": "500"})
    world.register("web", "w2")
    events = connection.changes()
    assert [(e.id, e.event) for e in events] == [(1, "resync"), (2, "registered")]
    assert [i["id"] for i in events[0].data["services"]["web"]] == ["w1"]
    connection.close()


def test_a_failed_start_answers_500_and_leaves_nothing(world: World) -> None:
    """A stream that fails while starting answers 500 and holds nothing open."""

    def broken(revision: int, services: Any = None) -> Any:
        raise RuntimeError("history on fire")

    world.feed.since = broken  # type: ignore[method-assign]
    with capturedLogs() as events:
        connection = world.open("?since=0")
    assert connection.head[0] == 500
    assert connection.error()["code"] == "internal_error"
    assert [e["event"] for e in events if e.get("log_failure")] == ["http.internal_error"]
    connection.close()
    assert_gone(world)


# Slow readers.


def test_a_paused_stream_queues_then_flushes_in_order(world: World) -> None:
    """While the transport is paused changes wait, and arrive in order once it resumes."""
    connection = world.open()
    connection.pause()
    for n in range(3):
        world.register("web", f"w{n}")
    world.clock.advance(15)  # no keep-alive onto a full buffer
    assert connection.events() == [Event(comment="revision 0")]
    connection.resume()
    assert [e.id for e in connection.changes()] == [1, 2, 3]
    assert stream.open_streams() == 1
    connection.close()
    assert_gone(world)


def test_a_slow_reader_is_dropped_and_logged(world: World) -> None:
    """A reader that stays paused past 1000 queued events is disconnected and logged."""
    connection = world.open()
    connection.pause()
    with capturedLogs() as events:
        for n in range(1000):
            world.register("web", f"w{n}")
        assert not connection.transport.disconnecting
        world.register("web", "last")  # the write succeeds; only the stream is dropped
    assert connection.transport.disconnecting
    [dropped] = [e for e in events if e.get("event") == "stream.slow_consumer_dropped"]
    assert dropped["peer_address"] == ALICE.address
    assert dropped["peer_subject"] == ALICE.subject
    assert dropped["queued_events"] == 1001
    assert_gone(world)  # at once, before the connection is even closed
    connection.close()
    assert_gone(world)
    assert len(world.store) == 1001


# Going away.


def test_disconnect_leaves_nothing_behind(world: World) -> None:
    """When the client goes away, the listener and the keep-alive timer go too."""
    connection = world.open("?service=web")
    world.clock.advance(20)
    with capturedLogs() as events:
        connection.close()
        world.register("web", "w1")
    assert_gone(world)
    assert [e for e in events if e.get("log_failure") is not None] == []


# The stream on its own, with its limits and collaborators given.


class PushRequest(DummyRequest):
    """A DummyRequest that takes a push producer and can lose its connection."""

    def __init__(self) -> None:
        super().__init__([])
        self.producer: Any = None
        self.channel = attrs.make_class("Channel", ["transport"])(StringTransport())

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def lose(self) -> None:
        self.channel = None
        for d in self._finishedDeferreds:
            d.errback(Failure(ConnectionDone()))

    def text(self) -> str:
        return b"".join(self.written).decode()


def test_a_byte_limit_drops_a_slow_reader(world: World) -> None:
    """The queue is bounded in bytes as well as in events."""
    request = PushRequest()
    limits = StreamLimits(keepalive=5, max_events=100, max_bytes=2000)
    events = EventStream.of_registry(request, world.registry, None, None, limits)
    events.start(None)
    request.producer.pauseProducing()
    world.register("web", "w1", metadata={"k": "v" * 500})
    world.register("web", "w2", metadata={"k": "v" * 500})
    assert not request.channel.transport.disconnecting
    world.register("web", "w3", metadata={"k": "v" * 500})
    assert request.channel.transport.disconnecting
    assert request.producer is None
    assert_gone(world)


def test_changes_during_a_slow_snapshot_follow_the_resync(world: World) -> None:
    """Changes recorded while the resync snapshot is read come after it, none lost."""
    world.register("web", "w1")
    request = PushRequest()
    snapshot: Deferred = Deferred()
    events = EventStream(
        request, world.feed, world.clock, lambda services: snapshot, frozenset({"web"}), ALICE
    )
    events.start(99)
    issued = world.register("web", "w2")
    snapshot.callback({"web": []})
    world.deregister(issued)
    parsed = parse_events(request.text())
    assert [(e.id, e.event) for e in parsed] == [(1, "resync"), (2, "registered"), (3, "deregistered")]
    request.lose()
    assert_gone(world)


def test_a_snapshot_that_never_ends_cannot_hoard_changes(world: World) -> None:
    """Changes held for a resync that does not come are bounded like the queue."""
    request = PushRequest()
    events = EventStream(
        request, world.feed, world.clock, lambda services: Deferred(), limits=StreamLimits(max_events=2)
    )
    events.start(5)
    with capturedLogs() as logged:
        for n in range(3):
            world.register("web", f"w{n}")
    [dropped] = [e for e in logged if e.get("event") == "stream.slow_consumer_dropped"]
    assert dropped["queued_events"] == 3
    assert request.channel.transport.disconnecting
    assert_gone(world)


def test_going_away_during_the_snapshot_cancels_it(world: World) -> None:
    """A client that leaves while the snapshot is read stops it; nothing is sent."""
    request = PushRequest()
    snapshot: Deferred = Deferred()
    events = EventStream(request, world.feed, world.clock, lambda services: snapshot)
    done = events.start(5)
    request.lose()
    assert snapshot.called  # cancelled
    assert_gone(world)
    done.cancel()  # as Klein does
    assert request.text() == ""
    done.addErrback(lambda failure: None)


def test_a_failed_snapshot_is_logged_and_drops_the_client(world: World) -> None:
    """A snapshot that fails is logged and the connection cut."""
    request = PushRequest()
    snapshot: Deferred = Deferred()
    events = EventStream(request, world.feed, world.clock, lambda services: snapshot)
    events.start(5)
    with capturedLogs() as logged:
        snapshot.errback(RuntimeError("store on fire"))
    [failure] = [e for e in logged if e.get("event") == "stream.resync_failed"]
    assert "store on fire" in failure["log_failure"].getTraceback()
    assert request.channel.transport.disconnecting
    assert_gone(world)
