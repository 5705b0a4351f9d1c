"""The event stream from a real daemon over mutual TLS on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from regdisc import stream

from .harness import LocalPKI, client_for, start_daemon
from .test_stream import Event, parse_events

PATIENCE = 10.0
"""The longest anything is waited for, in seconds."""


@pytest.fixture
def local_pki(tmp_path: Path) -> LocalPKI:
    return LocalPKI.create(tmp_path / "pki")


class Reader:
    """Collects an event stream as it arrives; stops it on request."""

    def __init__(self) -> None:
        self._text = ""
        self.events: list[Event] = []
        self._waiting: list[tuple[int, Deferred]] = []
        self._stop = False

    def __call__(self, data: bytes) -> None:
        if self._stop:
            raise Finished()  # treq.collect then closes the connection
        self._text += data.decode()
        self.events = parse_events(self._text)
        self._wake()

    def _wake(self) -> None:
        for count, d in list(self._waiting):
            if len(self.events) >= count:
                self._waiting.remove((count, d))
                d.callback(self.events[:count])

    def first(self, count: int) -> Deferred:
        """Fires with the first ``count`` events once they have arrived."""
        d: Deferred = Deferred()
        self._waiting.append((count, d))
        self._wake()
        return d.addTimeout(PATIENCE, reactor)

    def stop(self) -> None:
        """Hang up when the next data arrives."""
        self._stop = True


class Finished(Exception):
    """The test has read enough."""


class LogWatch:
    """Log events as they are published, to wait for one."""

    def __init__(self) -> None:
        self._waiting: list[tuple[str, Deferred]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        for name, d in list(self._waiting):
            if event.get("event") == name:
                self._waiting.remove((name, d))
                d.callback(event)

    def next(self, name: str) -> Deferred:
        """Fires with the next event named ``name``."""
        d: Deferred = Deferred()
        self._waiting.append((name, d))
        return d.addTimeout(PATIENCE, reactor)


@pytest.fixture
def log_watch() -> Iterator[LogWatch]:
    watch = LogWatch()
    globalLogPublisher.addObserver(watch)
    yield watch
    globalLogPublisher.removeObserver(watch)


@pytest_twisted.ensureDeferred
async def test_events_reach_a_client_over_mutual_tls(local_pki: LocalPKI, log_watch: LogWatch) -> None:
    """A client certificate's stream sees its service's changes as they happen, and resumes."""
    daemon = await start_daemon(local_pki, reactor)
    tls = local_pki.client_tls(local_pki.issue("alice"))
    registrar = client_for(daemon, tls, reactor)
    http = HTTPClient(
        Agent(reactor, contextFactory=tls.policy(), pool=HTTPConnectionPool(reactor, persistent=False))
    )
    collecting: list[Deferred] = []

    async def open_stream(query: str, **headers: str) -> Reader:
        response = await http.get(
            daemon.url + "/registry/events" + query, headers=headers, unbuffered=True
        ).addTimeout(PATIENCE, reactor)
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
        reader = Reader()
        collecting.append(treq.collect(response, reader).addErrback(lambda f: f.trap(Finished)))
        return reader

    try:
        reader = await open_stream("?service=web")
        assert await reader.first(1) == [Event(comment="revision 0")]

        registered = await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
        await registrar.register("api", "10.0.0.2", 8080, instance_id="api-1", ttl=60)
        await registrar.deregister("web", "web-1", registered.token)
        events = await reader.first(3)
        assert [(e.id, e.event, e.data["instance"]["id"]) for e in events[1:]] == [
            (1, "registered", "web-1"),
            (3, "deregistered", "web-1"),
        ]
        assert events[1].data["instance"]["host"] == "10.0.0.1"

        # The reader hangs up at the next event; the daemon then drops the stream.
        closed = log_watch.next("stream.closed")
        reader.stop()
        await registrar.register("web", "10.0.0.3", 8080, instance_id="web-2", ttl=60)
        await collecting[0].addTimeout(PATIENCE, reactor)
        await closed
        assert stream.open_streams() == 0

        resumed = await open_stream("?service=web&since=0", **{"Last-Event-ID": "1"})
        replayed = await resumed.first(2)
        assert [(e.id, e.event, e.data["instance"]["id"]) for e in replayed] == [
            (3, "deregistered", "web-1"),
            (4, "registered", "web-2"),
        ]
    finally:
        await registrar.close()
        await daemon.stop()
        for collected in collecting:
            collected.addErrback(lambda f: None)  # the daemon's stop cut what was still open
