"""`ServiceWatcher`: a discovery cache that keeps services' instance lists fresh by polling."""

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

STRATEGIES = ("random", "round_robin")
"""The ways `ServiceWatcher.pick` can choose an instance."""

Subscriber = Callable[[str, list[Instance]], object]
"""Called with a service and its new instance list when that list changes."""


class InstanceSource(Protocol):
    """What the watcher needs of a `RegistryClient`."""

    def instances(self, service: str) -> Deferred: ...


@attrs.define(eq=False)
class _Watched:
    """What the watcher knows of one service, and its polling state."""

    service: str
    instances: list[Instance] = attrs.Factory(list)
    last_success: float | None = None
    failures: int = 0
    call: IDelayedCall | None = None
    pending: Deferred | None = None
    last_picked: str | None = None  # the round-robin cursor: an id, so it survives list changes


class ServiceWatcher(Service):
    """Keeps the instance lists of watched services fresh and serves them from memory.

    Each service is polled on its own schedule: every ``interval`` seconds,
    give or take ``jitter`` (a fraction), with at most one request in flight.
    After a failure the last known list is kept and the retry waits a delay
    drawn uniformly between ``interval / 10`` and the exponential backoff
    ceiling ``min(backoff_cap, interval * 2 ** (failures - 1))``.
    """

    log = Logger()

    def __init__(
        self,
        client: InstanceSource,
        services: Iterable[str],
        *,
        clock: IReactorTime,
        interval: float = 5.0,
        jitter: float = 0.1,
        backoff_cap: float = 30.0,
        random: Random | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {jitter!r}")
        if not backoff_cap > 0:
            raise ValueError(f"backoff_cap must be positive, not {backoff_cap!r}")
        self._client = client
        self._clock = clock
        self._interval = float(interval)
        self._jitter = float(jitter)
        self._backoff_cap = float(backoff_cap)
        self._random = random if random is not None else Random()
        self._states: dict[str, _Watched] = {}
        self._subscribers: dict[object, Subscriber] = {}
        for service in services:
            self.watch(service)

    # The service's life.

    def startService(self) -> None:
        """Refresh every watched service at once; each then follows its own schedule."""
        super().startService()
        for state in list(self._states.values()):
            if self._states.get(state.service) is state:
                self._refresh(state)

    def stopService(self) -> None:
        """Cancel every scheduled refresh and every request in flight."""
        super().stopService()
        for state in self._states.values():
            self._halt(state)

    # What is watched.

    @property
    def services(self) -> list[str]:
        """The watched services, sorted."""
        return sorted(self._states)

    def watch(self, service: str) -> None:
        """Watch ``service`` too, refreshing it at once if running; watching twice is a no-op."""
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

    def last_success(self, service: str) -> float | None:
        """When ``service`` was last refreshed successfully (clock seconds), or None if never."""
        return self._state(service).last_success

    def staleness(self, service: str) -> float | None:
        """Seconds since the last successful refresh of ``service``, or None if never."""
        last = self._state(service).last_success
        return None if last is None else self._clock.seconds() - last

    def is_stale(self, service: str, max_age: float) -> bool:
        """Whether ``service`` was never refreshed or not within ``max_age`` seconds."""
        age = self.staleness(service)
        return age is None or age > max_age

    def consecutive_failures(self, service: str) -> int:
        """How many refreshes of ``service`` failed since the last success."""
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

    # Polling.

    def _refresh(self, state: _Watched) -> None:
        """Ask the registry for one service's list; the answer schedules the next refresh.

        The only place that polls: a push feed would replace this step and
        hand what it receives to `_succeeded` and `_failed`.
        """
        if state.pending is not None:
            return
        state.call = None
        d = maybeDeferred(self._client.instances, state.service)
        state.pending = d
        d.addBoth(self._answered, state, d)

    def _answered(self, result: Any, state: _Watched, d: Deferred) -> None:
        """Take in one answer (a list or a Failure) for ``state`` and schedule the next refresh."""
        if state.pending is not d:
            # Stopped, unwatched or cancelled meanwhile: the answer is no longer ours.
            return None
        state.pending = None
        if isinstance(result, Failure):
            delay = self._failed(state, result)
        else:
            delay = self._succeeded(state, list(result))
        # A subscriber may have stopped the watcher or unwatched the service.
        if self.running and self._states.get(state.service) is state:
            state.call = self._clock.callLater(delay, self._refresh, state)
        return None

    def _succeeded(self, state: _Watched, instances: list[Instance]) -> float:
        now = self._clock.seconds()
        if state.failures:
            self.log.info(
                "refreshed {service} again after {failures} failures",
                event="watcher.recovered",
                service=state.service,
                failures=state.failures,
                stale_for=None if state.last_success is None else now - state.last_success,
            )
        changed = _fingerprint(state.instances) != _fingerprint(instances)
        before = {i.id for i in state.instances}
        state.instances, state.last_success, state.failures = instances, now, 0
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
        return self._interval * (1 + self._random.uniform(-self._jitter, self._jitter))

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
        ceiling = min(self._backoff_cap, self._interval * 2.0 ** min(failures - 1, 64))
        floor = min(self._interval / 10, ceiling)
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
