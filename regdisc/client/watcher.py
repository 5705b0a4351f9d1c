"""`ServiceWatcher`: a discovery cache that follows services' instance lists with blocking queries."""

from __future__ import annotations

from random import Random
from typing import Any, Callable, Iterable, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..model import SERVICE_NAME, Instance
from .errors import RegistryError, RegistryUnavailable
from .http import MAX_WAIT, InstanceList

STRATEGIES = ("random", "round_robin")
"""The ways `ServiceWatcher.pick` can choose an instance."""

DEFAULT_WAIT = 60.0
"""How long the registry holds a watcher's query while nothing changes, by default."""

Subscriber = Callable[[str, list[Instance]], object]
"""Called with a service and its new instance list when that list changes."""


class InstanceSource(Protocol):
    """What the watcher needs of a `RegistryClient`: `RegistryClient.watch_instances`."""

    def watch_instances(self, service: str, *, index: int = 0, wait: float | None = 60.0) -> Deferred:
        """Fires with an `InstanceList`; ``wait=None`` reads at once, else it blocks."""
        ...


@attrs.define(eq=False)
class _Watched:
    """What the watcher knows of one service, and the state of its queries."""

    service: str
    instances: list[Instance] = attrs.Factory(list)
    index: int | None = None  # the index of the last answer; None until the first
    last_success: float | None = None
    failures: int = 0
    not_held: bool = False  # the registry answers without holding: polled every wait seconds
    call: IDelayedCall | None = None
    pending: Deferred | None = None
    last_picked: str | None = None  # the round-robin cursor: an id, so it survives list changes


class ServiceWatcher(Service):
    """Keeps the instance lists of watched services fresh and serves them from memory.

    Each service is followed on its own with blocking queries, one request in
    flight at a time. The first is a plain read; each later one carries the
    index of the last answer, and the registry holds it until the service
    changes or ``wait`` seconds (plus up to a sixteenth) pass. The next
    request goes out as soon as an answer arrives, so a change reaches the
    watcher within a round trip, and an idle service costs one request per
    ``wait``. An answer whose index is lower than the one held means the
    registry restarted and counts anew: its list and index are taken, and
    the next query carries that index (Consul's rule).

    After a failure the last known list and index are kept, and the retry
    waits a delay drawn uniformly (full jitter) between ``backoff_base / 10``
    and the ceiling ``min(backoff_cap, backoff_base * 2 ** (failures - 1))``.

    A registry that answers a held query early with the same index does not
    hold queries (an older registry, or a proxy that drops the query string):
    the watcher then polls it every ``wait`` seconds, give or take ``jitter``
    (a fraction), rather than ask again in a tight loop.

    ``interval`` is the former name of ``wait``, still accepted.
    """

    log = Logger()

    def __init__(
        self,
        client: InstanceSource,
        services: Iterable[str],
        *,
        clock: IReactorTime,
        wait: float | None = None,
        interval: float | None = None,
        jitter: float = 0.1,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        random: Random | None = None,
    ) -> None:
        if interval is not None:
            if wait is not None:
                raise TypeError("give wait or its former name interval, not both")
            wait = interval
        if wait is None:
            wait = DEFAULT_WAIT
        if not 0 < wait <= MAX_WAIT:
            raise ValueError(f"wait must be above 0 and at most {MAX_WAIT:g} seconds, not {wait!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {jitter!r}")
        if not backoff_base > 0:
            raise ValueError(f"backoff_base must be positive, not {backoff_base!r}")
        if not backoff_cap > 0:
            raise ValueError(f"backoff_cap must be positive, not {backoff_cap!r}")
        self._client = client
        self._clock = clock
        self._wait = float(wait)
        self._jitter = float(jitter)
        self._backoff_base = float(backoff_base)
        self._backoff_cap = float(backoff_cap)
        self._random = random if random is not None else Random()
        self._states: dict[str, _Watched] = {}
        self._subscribers: dict[object, Subscriber] = {}
        for service in services:
            self.watch(service)

    # The service's life.

    @property
    def wait(self) -> float:
        """How long the registry may hold each query while nothing changes, in seconds."""
        return self._wait

    def startService(self) -> None:
        """Query every watched service at once; each then follows its own answers."""
        super().startService()
        for state in list(self._states.values()):
            if self._states.get(state.service) is state:
                self._refresh(state)

    def stopService(self) -> None:
        """Cancel every scheduled retry and every request in flight, held queries too."""
        super().stopService()
        for state in self._states.values():
            self._halt(state)

    # What is watched.

    @property
    def services(self) -> list[str]:
        """The watched services, sorted."""
        return sorted(self._states)

    def watch(self, service: str) -> None:
        """Watch ``service`` too, querying it at once if running; watching twice is a no-op."""
        if not isinstance(service, str) or not SERVICE_NAME.fullmatch(service):
            raise ValueError(f"not a service name: {service!r}")
        if service in self._states:
            return
        state = _Watched(service)
        self._states[service] = state
        if self.running:
            self._refresh(state)

    def unwatch(self, service: str) -> None:
        """Stop watching ``service`` and forget its list; raises KeyError if not watched."""
        self._halt(self._state(service))
        del self._states[service]

    # Serving from memory.

    def instances(self, service: str) -> list[Instance]:
        """The last known instances of ``service`` (every status); ``[]`` before the first answer."""
        return list(self._state(service).instances)

    def pick(self, service: str, strategy: str = "random") -> Instance | None:
        """One ``up`` instance of ``service`` by ``strategy`` (`STRATEGIES`), or None if none is up."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        state = self._state(service)
        up = sorted((i for i in state.instances if i.status == "up"), key=lambda i: i.id)
        if not up:
            return None
        if strategy == "random":
            return self._random.choice(up)
        # The next id after the last one picked, so instances that come and go
        # neither reset the cycle nor make it skip or repeat the others.
        chosen = next((i for i in up if state.last_picked is None or i.id > state.last_picked), up[0])
        state.last_picked = chosen.id
        return chosen

    # Freshness.

    def index(self, service: str) -> int | None:
        """The index of the last answer for ``service`` (its revision), or None before the first."""
        return self._state(service).index

    def last_success(self, service: str) -> float | None:
        """When the last answer for ``service`` arrived (clock seconds), or None if none did."""
        return self._state(service).last_success

    def staleness(self, service: str) -> float | None:
        """Seconds since the last answer for ``service`` arrived, or None if none did.

        A held query is an answer not given yet, so while the registry is
        healthy and the service idle, staleness grows to about
        ``wait * 17 / 16`` plus a round trip before the held answer comes back
        and resets it (a change resets it sooner). Beyond that, the held query
        did not come back in time: the registry or the way to it is in
        trouble. Pick `is_stale`'s ``max_age`` above it, such as ``2 * wait``.
        """
        last = self._state(service).last_success
        return None if last is None else self._clock.seconds() - last

    def is_stale(self, service: str, max_age: float) -> bool:
        """Whether no answer for ``service`` arrived, or none within ``max_age`` seconds.

        While healthy, `staleness` reaches about ``wait * 17 / 16``: a
        ``max_age`` below that calls an idle, healthy service stale.
        """
        age = self.staleness(service)
        return age is None or age > max_age

    def consecutive_failures(self, service: str) -> int:
        """How many queries of ``service`` failed since the last answer."""
        return self._state(service).failures

    # Change notification.

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(service, instances)`` on each change of a list; returns the unsubscriber.

        A change is an instance added, removed, or changed in anything but its
        lease times (which move at every heartbeat). Exceptions from
        ``callback`` are logged and do not stop the watcher.
        """
        key = object()
        self._subscribers[key] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe

    # Blocking queries.

    def _refresh(self, state: _Watched) -> None:
        """Ask the registry for one service's list; the answer sends the next query.

        The one step that talks to the registry: a plain read until the first
        answer, then blocking queries from the last answer's index.
        """
        if state.pending is not None:
            return
        state.call = None
        asked, asked_at = state.index, self._clock.seconds()
        if asked is None:
            d = maybeDeferred(self._client.watch_instances, state.service, wait=None)
        else:
            d = maybeDeferred(self._client.watch_instances, state.service, index=asked, wait=self._wait)
        state.pending = d
        d.addBoth(self._answered, state, d, asked, asked_at)

    def _answered(
        self, result: Any, state: _Watched, d: Deferred, asked: int | None, asked_at: float
    ) -> None:
        """Take in one answer (an `InstanceList` or a Failure) and send the next query."""
        if state.pending is not d:
            # Stopped, unwatched or cancelled meanwhile: the answer is no longer ours.
            return None
        state.pending = None
        delay: float | None
        if isinstance(result, Failure):
            delay = self._failed(state, result)
        else:
            delay = self._succeeded(state, result, asked, asked_at)
        # A subscriber may have stopped the watcher or unwatched the service.
        if self.running and self._states.get(state.service) is state:
            if delay is None:
                self._refresh(state)
            else:
                state.call = self._clock.callLater(delay, self._refresh, state)
        return None

    def _succeeded(
        self, state: _Watched, answer: InstanceList, asked: int | None, asked_at: float
    ) -> float | None:
        """Take the answer; None to ask again at once, else the delay before the next query."""
        now = self._clock.seconds()
        instances, index = list(answer.instances), answer.index
        if state.failures:
            self.log.info(
                "refreshed {service} again after {failures} failures",
                event="watcher.recovered",
                service=state.service,
                failures=state.failures,
                stale_for=None if state.last_success is None else now - state.last_success,
            )
        if state.index is not None and index < state.index:
            self.log.info(
                "the index of {service} went back from {held} to {index}: the registry counts anew",
                event="watcher.index_reset",
                service=state.service,
                held=state.index,
                index=index,
            )
        changed = _fingerprint(state.instances) != _fingerprint(instances)
        before = {i.id for i in state.instances}
        state.instances, state.index, state.last_success, state.failures = instances, index, now, 0
        if changed:
            after = {i.id for i in instances}
            self.log.debug(
                "instances of {service} changed: {count} now",
                event="watcher.changed",
                service=state.service,
                count=len(instances),
                added=sorted(after - before),
                removed=sorted(before - after),
            )
            self._notify(state.service, instances)
        # A registry that holds queries answers an unchanged index only after
        # the whole wait; sooner means it does not hold them, and asking again
        # at once would spin.
        if asked is not None and index == asked and now - asked_at < self._wait / 2:
            if not state.not_held:
                self.log.warn(
                    "the registry answered a blocking query for {service} without holding it;"
                    " polling every {wait:g} s",
                    event="watcher.not_held",
                    service=state.service,
                    wait=self._wait,
                )
            state.not_held = True
            return self._wait * (1 + self._random.uniform(-self._jitter, self._jitter))
        state.not_held = False
        return None

    def _failed(self, state: _Watched, failure: Failure) -> float:
        state.failures += 1
        delay = self._backoff(state.failures)
        if not failure.check(RegistryUnavailable, RegistryError):
            self.log.failure(
                "unexpected error refreshing {service}",
                failure,
                event="watcher.refresh_error",
                service=state.service,
            )
        # Warn once per streak; the rest of the streak is detail.
        emit = self.log.warn if state.failures == 1 else self.log.debug
        emit(
            "refreshing {service} failed ({reason}); failure {failures}, retry in {retry_in:.2f} s",
            event="watcher.refresh_failed",
            service=state.service,
            reason=str(failure.value),
            failures=state.failures,
            retry_in=delay,
            stale_for=None if state.last_success is None else self._clock.seconds() - state.last_success,
        )
        return delay

    def _backoff(self, failures: int) -> float:
        """A retry delay with full jitter under the capped exponential ceiling."""
        # The exponent is bounded so that a long outage cannot overflow a float.
        ceiling = min(self._backoff_cap, self._backoff_base * 2.0 ** min(failures - 1, 64))
        floor = min(self._backoff_base / 10, ceiling)
        return self._random.uniform(floor, ceiling)

    def _notify(self, service: str, instances: list[Instance]) -> None:
        for callback in list(self._subscribers.values()):
            try:
                callback(service, list(instances))
            except Exception:
                self.log.failure(
                    "a subscriber failed on the change of {service}",
                    event="watcher.callback_failed",
                    service=service,
                )

    def _halt(self, state: _Watched) -> None:
        call, state.call = state.call, None
        if call is not None and call.active():
            call.cancel()
        pending, state.pending = state.pending, None
        if pending is not None:
            pending.cancel()

    def _state(self, service: str) -> _Watched:
        try:
            return self._states[service]
        except KeyError:
            raise KeyError(f"service {service!r} is not watched") from None


def _fingerprint(instances: Iterable[Instance]) -> dict[str, tuple[Any, ...]]:
    """What a change is judged on: each instance's fields but its lease times."""
    return {
        i.id: (i.host, i.port, i.status, tuple(sorted(i.metadata.items())), i.tags, i.ttl)
        for i in instances
    }
