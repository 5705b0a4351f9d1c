"""Server-Sent Events of the change feed: the frame format and the stream that sends it.

``GET /registry/events`` answers ``text/event-stream``. Each visible change is
one event: ``id`` its revision, ``event`` its kind, ``data`` its JSON on one
line. A ``resync`` event carries the current instances when the history no
longer reaches back to where the client asked to start. Comments (``: ...``)
say where a fresh stream starts and keep idle connections open.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any, Awaitable, Callable, Iterable, Mapping

import attrs
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from .errors import InvalidRequest
from .feed import Change, ChangeFeed
from .model import Instance, Peer
from .registry import Registry
from .validation import check_service

__all__ = [
    "CONTENT_TYPE",
    "EventStream",
    "StreamLimits",
    "change_event",
    "comment",
    "current_instances",
    "followed_services",
    "frame",
    "open_streams",
    "resync_event",
    "start_revision",
]

CONTENT_TYPE = "text/event-stream"

_REVISION = re.compile(r"[0-9]{1,19}")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the only line ends of the SSE grammar

Snapshot = Callable[["frozenset[str] | None"], Awaitable[Mapping[str, Iterable[Instance]]]]
"""Fetches the live instances of the followed services (all, for None), by service."""


@attrs.frozen
class StreamLimits:
    """How often a stream sends a keep-alive, and how much it queues for a slow reader."""

    keepalive: float = 15.0
    max_events: int = 1000
    max_bytes: int = 1024 * 1024


# Frames.


def frame(data: str, event: str | None = None, id: int | None = None) -> bytes:
    """One event: its ``id`` and ``event`` fields, then a ``data`` field per line of ``data``."""
    fields = []
    if id is not None:
        fields.append(f"id: {id}")
    if event is not None:
        fields.append(f"event: {event}")
    fields.extend("data: " + line for line in _LINE_BREAK.split(data))
    return ("\n".join(fields) + "\n\n").encode("utf-8")


def comment(text: str) -> bytes:
    """A comment, which clients ignore: ``: text``."""
    return ("".join(": " + line + "\n" for line in _LINE_BREAK.split(text)) + "\n").encode("utf-8")


def change_event(change: Change) -> bytes:
    """The event of one change: id the revision, event the kind, data its JSON."""
    return frame(_json(change.to_json()), event=change.kind, id=change.revision)


def resync_event(revision: int, services: Mapping[str, Iterable[Instance]]) -> bytes:
    """A ``resync`` event: the live instances of each service, as of ``revision``."""
    state = {name: [i.to_json() for i in instances] for name, instances in services.items()}
    return frame(_json({"revision": revision, "services": state}), event="resync", id=revision)


def _json(value: Any) -> str:
    # No indent: json.dumps then escapes every line break, so data is one line.
    return json.dumps(value, separators=(",", ":"))


# The query.


def followed_services(request: IRequest) -> frozenset[str] | None:
    """The ``service`` arguments (each a valid name, else 400); None when there are none."""
    values = request.args.get(b"service")
    if not values:
        return None
    return frozenset(check_service(v.decode("utf-8", "replace")) for v in values)


def start_revision(request: IRequest) -> int | None:
    """Where the client resumes: ``Last-Event-ID`` if sent and not blank, else ``since``."""
    header = request.getHeader("Last-Event-ID")
    if header is not None and header.strip():
        return _revision(header.strip(), "Last-Event-ID")
    values = request.args.get(b"since")
    if not values:
        return None
    return _revision(values[-1].decode("ascii", "replace"), "since")


def _revision(text: str, name: str) -> int:
    if not _REVISION.fullmatch(text):
        raise InvalidRequest(f"invalid {name}", {name: "must be a revision: a whole number from 0"})
    return int(text)


async def current_instances(
    registry: Registry, services: frozenset[str] | None
) -> dict[str, list[Instance]]:
    """The live instances of ``services``, or of every service with one for None."""
    if services is None:
        names = [name for name, _ in await registry.services()]
    else:
        names = sorted(services)
    return {name: await registry.instances(name) for name in names}


# The stream.

_open: set[EventStream] = set()


def open_streams() -> int:
    """How many event streams this process is sending."""
    return len(_open)


@implementer(IPushProducer)
class EventStream:
    """The changes of a feed as Server-Sent Events on one request.

    It listens before it replays, so no change falls between the two, and it
    never sends a revision at or below one it has sent. While the transport is
    paused it queues, up to its limits; past them it drops the client. It is
    the request's producer, so Twisted pauses and resumes it.
    """

    log = Logger()

    def __init__(
        self,
        request: IRequest,
        feed: ChangeFeed,
        clock: IReactorTime,
        snapshot: Snapshot,
        services: frozenset[str] | None = None,
        peer: Peer | None = None,
        limits: StreamLimits = StreamLimits(),
    ) -> None:
        self._request = request
        self._feed = feed
        self._clock = clock
        self._snapshot = snapshot
        self._services = services
        self._peer = peer
        self._limits = limits
        self._last = 0  # the revision the client has reached
        self._pending: list[Change] | None = None  # changes that arrive while starting
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._paused = False
        self._stopped = False
        self._unlisten: Callable[[], None] | None = None
        self._keepalive: LoopingCall | None = None
        self._resyncing: Deferred | None = None
        self._done: Deferred = Deferred(lambda _: self.stop())

    @classmethod
    def of_registry(
        cls,
        request: IRequest,
        registry: Registry,
        services: frozenset[str] | None,
        peer: Peer | None,
        limits: StreamLimits = StreamLimits(),
    ) -> EventStream:
        """A stream of ``registry``'s feed, on its clock."""
        return cls(
            request,
            registry.feed,
            registry.clock,
            lambda followed: current_instances(registry, followed),
            services,
            peer,
            limits,
        )

    def start(self, since: int | None) -> Deferred:
        """Answer 200 and stream from ``since`` (None: from now).

        The Deferred fires only for a HEAD request; cancelling it ends the
        stream, as Klein does when the client goes away.
        """
        request = self._request
        request.setResponseCode(200)
        request.setHeader("Content-Type", CONTENT_TYPE)
        request.setHeader("Cache-Control", "no-store")
        if request.method == b"HEAD":
            return succeed(b"")
        _open.add(self)
        try:
            self._begin(since)
        except BaseException:
            self.stop()  # leave no listener or timer behind a failed start
            raise
        return self._done

    def _begin(self, since: int | None) -> None:
        request = self._request
        request.notifyFinish().addErrback(lambda _: self.stop())
        request.registerProducer(self, True)
        self._pending = []
        self._unlisten = self._feed.listen(self._arrived, self._services)
        current = self._feed.revision
        self.log.debug(
            "event stream opened from {since}", event="stream.opened", since=since,
            services=None if self._services is None else sorted(self._services),
            **self._peer_fields(),
        )
        if since is None:
            self._last = current
            self._send(comment(f"revision {current}"))
            self._started()
            return
        # A revision ahead of the feed comes from before a restart, which
        # counts anew: only a resync puts that client right.
        replay = self._feed.since(since, self._services) if since <= current else None
        request.write(b"")  # the headers, now, whatever the first event waits on
        if replay is None:
            resyncing = ensureDeferred(self._resync(current))
            if not resyncing.called:
                self._resyncing = resyncing
            return
        self._last = since
        for change in replay:
            self._deliver(change)
        self._started()

    def stop(self) -> None:
        """Stop listening, queueing and keeping alive; nothing of the stream remains."""
        if self._stopped:
            return
        self._stopped = True
        _open.discard(self)
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        if self._resyncing is not None:
            self._resyncing.cancel()
            self._resyncing = None
        self._pending = None
        self._queue.clear()
        self._queued_bytes = 0
        if getattr(self._request, "channel", None) is not None:
            self._request.unregisterProducer()
        self.log.debug("event stream closed", event="stream.closed", **self._peer_fields())

    # IPushProducer: the transport's buffer filled up, or drained.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._queue and not self._stopped:
            queued = b"".join(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._request.write(queued)

    def stopProducing(self) -> None:
        self.stop()

    # Sending.

    async def _resync(self, revision: int) -> None:
        """Send the current state as of ``revision``, then go live."""
        try:
            state = await self._snapshot(self._services)
        except CancelledError:
            return
        except Exception:
            self._resyncing = None
            self.log.failure(
                "event stream resync failed", event="stream.resync_failed", **self._peer_fields()
            )
            self._drop()
            return
        # Done waiting: from here, stopping must not cancel this coroutine.
        self._resyncing = None
        if self._stopped:
            return
        # The snapshot holds at least every change up to ``revision``; changes
        # after it follow as events, and applying one twice changes nothing.
        self._last = revision
        self._send(resync_event(revision, state))
        self._started()

    def _started(self) -> None:
        """Send what arrived while starting, then go live with keep-alives."""
        pending, self._pending = self._pending or [], None
        for change in pending:
            self._deliver(change)
        if self._stopped:
            return
        self._keepalive = LoopingCall(self._keep_alive)
        self._keepalive.clock = self._clock
        self._keepalive.start(self._limits.keepalive, now=False)

    def _arrived(self, change: Change) -> None:
        # Called inside the feed's record(): a failure here must not fail the write.
        try:
            if self._pending is not None:
                self._pending.append(change)
                if len(self._pending) > self._limits.max_events:  # a snapshot that never ends
                    self._overflowed(len(self._pending), None)
            else:
                self._deliver(change)
        except Exception:
            self.log.failure("event stream failed", event="stream.failed", **self._peer_fields())
            self._drop()

    def _deliver(self, change: Change) -> None:
        if change.revision <= self._last:
            return
        self._last = change.revision
        self._send(change_event(change))

    def _keep_alive(self) -> None:
        if not self._paused and not self._queue:
            self._request.write(comment("keep-alive"))

    def _send(self, data: bytes) -> None:
        if self._stopped:
            return
        if not self._paused and not self._queue:
            self._request.write(data)
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        limits = self._limits
        if len(self._queue) > limits.max_events or self._queued_bytes > limits.max_bytes:
            self._overflowed(len(self._queue), self._queued_bytes)

    def _overflowed(self, events: int, size: int | None) -> None:
        self.log.warn(
            "dropped a slow event stream reader at {peer_address}: {queued_events} events waiting",
            event="stream.slow_consumer_dropped",
            queued_events=events,
            queued_bytes=size,
            **self._peer_fields(),
        )
        self._drop()

    def _drop(self) -> None:
        """Stop and cut the connection: aborted, as a polite close would wait on the reader."""
        channel = getattr(self._request, "channel", None)
        self.stop()
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def _peer_fields(self) -> dict[str, str | None]:
        peer = self._peer
        if peer is not None:
            return {
                "peer_subject": peer.subject,
                "peer_fingerprint": peer.fingerprint,
                "peer_address": peer.address,
            }
        address = self._request.getClientAddress()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        return {
            "peer_subject": None,
            "peer_fingerprint": None,
            "peer_address": f"{host}:{port}" if host is not None else None,
        }
