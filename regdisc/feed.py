"""The change feed: one ordered history of visible changes, and who waits for them.

Every write advances the registry revision. Writes that change what
discovery shows (an instance registered, updated, deregistered or evicted)
are also recorded as a `Change`, kept in a bounded history, and wake exactly
the waiters of the service they touch.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from .model import Instance

KINDS = ("registered", "updated", "deregistered", "evicted")

SERVICES = None
"""The key that stands for the service list itself in `ChangeFeed.wait`."""

Listener = Callable[["Change"], None]

WAKE_BATCH = 100
"""Waiters woken per reactor turn, when the feed has a clock to take turns by."""


@attrs.frozen
class Change:
    """A visible change: its revision, its kind (one of `KINDS`) and the instance."""

    revision: int
    kind: str
    instance: Instance

    def to_json(self) -> dict[str, object]:
        return {
            "revision": self.revision,
            "kind": self.kind,
            "service": self.instance.service,
            "instance": self.instance.to_json(),
        }


class ChangeFeed:
    """The registry revision, a bounded history of changes, and per-service waiters.

    Waiting costs nothing while nothing changes: a waiter is a Deferred in the
    list of the one service it watches (or of the service list).

    Given a ``clock``, a change wakes `WAKE_BATCH` waiters per reactor turn:
    each woken waiter writes its answer in that turn, and TLS sends what a turn
    wrote only in the next, so waking a thousand at once would hold back the
    first answer until the last was written. Without one, all wake at once.
    """

    def __init__(self, history: int = 10_000, clock: IReactorTime | None = None) -> None:
        self.revision = 0
        self._history: deque[Change] = deque(maxlen=history)
        self._dropped = 0  # the revision of the newest change pushed out of history
        self._service_revisions: dict[str, int] = {}
        self._services_revision = 0
        self._waiters: dict[str | None, list[Deferred]] = {}
        # Listeners by the service they follow; under None, those that follow all.
        self._listeners: dict[str | None, dict[object, Listener]] = {}
        self._clock = clock
        self.wakeups = 0
        """How many waiters have been woken by changes, for benchmarks."""

    # Revisions.

    def advance(self) -> int:
        """A new revision for a write that changes nothing visible (a token rotation)."""
        self.revision += 1
        return self.revision

    def observe(self, revision: int) -> None:
        """Catch up with a revision made elsewhere (a shared backend's), never going back."""
        self.revision = max(self.revision, revision)

    def service_revision(self, service: str | None) -> int:
        """The revision of the last change to ``service``, or to the service list for None."""
        if service is SERVICES:
            return self._services_revision
        return self._service_revisions.get(service, 0)

    # Changes.

    def record(self, kind: str, instance: Instance, revision: int | None = None) -> Change:
        """Record a visible change at a new revision (or at ``revision``, already advanced)."""
        if revision is None:
            revision = self.advance()
        else:
            self.observe(revision)
        change = Change(revision, kind, instance)
        if len(self._history) == self._history.maxlen:
            self._dropped = self._history[0].revision
        self._history.append(change)
        service = instance.service
        self._service_revisions[service] = revision
        woken = [service]
        if kind != "updated":  # only these change which services have instances, or how many
            self._services_revision = revision
            woken.append(SERVICES)
        for key in woken:
            waiters = self._waiters.pop(key, None)
            if waiters:
                self._wake(waiters, revision)
        for key in (None, service):
            for listener in list(self._listeners.get(key, {}).values()):
                listener(change)
        return change

    def _wake(self, waiters: list[Deferred], revision: int) -> None:
        now, later = waiters, []
        if self._clock is not None and len(waiters) > WAKE_BATCH:
            now, later = waiters[:WAKE_BATCH], waiters[WAKE_BATCH:]
            self._clock.callLater(0, self._wake, later, revision)
        for waiter in now:
            if not waiter.called:  # it was cancelled while it waited for its turn
                self.wakeups += 1
                waiter.callback(revision)

    def since(self, revision: int, services: Iterable[str] | None = None) -> list[Change] | None:
        """The changes after ``revision``, oldest first; None if some were already dropped."""
        if revision < self._dropped:
            return None
        wanted = None if services is None else frozenset(services)
        return [
            c for c in self._history
            if c.revision > revision and (wanted is None or c.instance.service in wanted)
        ]

    # Waiting.

    def wait(self, service: str | None, after: int) -> Deferred:
        """Fires with the revision once ``service`` (or the service list) changes after ``after``.

        Fires at once if it already has. Cancelling the Deferred forgets the waiter.
        """
        current = self.service_revision(service)
        if current > after:
            return succeed(current)
        waiters = self._waiters.setdefault(service, [])

        def forget(waiter: Deferred) -> None:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiters.get(service) is waiters:
                del self._waiters[service]

        waiter: Deferred = Deferred(forget)
        waiters.append(waiter)
        return waiter

    def waiting(self) -> int:
        """How many waiters are held."""
        return sum(len(w) for w in self._waiters.values())

    def listening(self) -> int:
        """How many listeners follow the feed."""
        return len({token for following in self._listeners.values() for token in following})

    def listen(self, listener: Listener, services: Iterable[str] | None = None) -> Callable[[], None]:
        """Call ``listener`` with every later change (of ``services`` only, if given).

        Returns the function that stops it.
        """
        token = object()
        keys: list[str | None] = [None] if services is None else list(set(services))
        for key in keys:
            self._listeners.setdefault(key, {})[token] = listener

        def stop() -> None:
            for key in keys:
                following = self._listeners.get(key, {})
                following.pop(token, None)
                if not following:
                    self._listeners.pop(key, None)

        return stop
