"""InstanceRegistration, driven by a Clock against a registry faked in memory."""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from regdisc.client import InstanceRegistration
from regdisc.client.errors import (
    InstanceExists,
    InstanceNotFound,
    RegistryError,
    RegistryUnavailable,
    RequestTimedOut,
    TokenExpired,
    Unauthorized,
)
from regdisc.client.http import Lease, Registered, Token
from regdisc.model import Instance

from .conftest import START, fired

TTL = 30
FRACTION = 1 / 3
JITTER = 0.1


class FakeRegistry:
    """The registry's rules for one client certificate, in memory, on a Clock.

    Answers at once, unless a method is held (its answers wait for `release`)
    or has errors queued. Ids in ``foreign`` belong to another certificate.
    """

    def __init__(self, clock: Clock, token_ttl: float = 3600) -> None:
        self.clock = clock
        self.token_ttl = token_ttl
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, float]] = []
        self.errors: dict[str, list[Exception]] = {}
        self.held: set[str] = set()
        self.pending: list[tuple[Deferred, str, Callable[[], Any]]] = []
        self.foreign: set[str] = set()
        self.down = False
        self.issued: list[str] = []
        self.refused: list[Exception] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._serial = itertools.count(1)

    # The client's surface.

    def register(
        self,
        service: str,
        host: str,
        port: int,
        *,
        instance_id: str | None = None,
        ttl: int | None = None,
        metadata: Mapping[str, str] | None = None,
        tags: Sequence[str] | None = None,
        status: str | None = None,
        token: str | None = None,
    ) -> Deferred:
        assert instance_id is not None and ttl is not None

        def answer() -> Registered:
            now = self.clock.seconds()
            if instance_id in self.foreign:
                raise InstanceExists(409, "instance_exists", f"{instance_id} is taken")
            instance = Instance(
                service, instance_id, host, port, status or "up", dict(metadata or {}),
                tuple(tags or ()), ttl, now, now, now + ttl,
            )
            fresh = self._token()
            self.records[(service, instance_id)] = {
                "instance": instance, "token": fresh, "token_expires_at": now + self.token_ttl,
            }
            return Registered(instance, fresh, now + self.token_ttl)

        return self._call("register", answer)

    def heartbeat(self, service: str, instance_id: str, token: str) -> Deferred:
        def answer() -> Lease:
            record = self._authorized(service, instance_id, token)
            now = self.clock.seconds()
            record["instance"] = record["instance"].renewed(now)
            return Lease(record["instance"].ttl, record["instance"].expires_at)

        return self._call("heartbeat", answer)

    def rotate_token(self, service: str, instance_id: str, token: str) -> Deferred:
        def answer() -> Token:
            record = self._authorized(service, instance_id, token)
            record["token"] = self._token()
            record["token_expires_at"] = self.clock.seconds() + self.token_ttl
            return Token(record["token"], record["token_expires_at"])

        return self._call("rotate", answer)

    def deregister(self, service: str, instance_id: str, token: str) -> Deferred:
        def answer() -> Instance:
            record = self._authorized(service, instance_id, token)
            del self.records[(service, instance_id)]
            return record["instance"]

        return self._call("deregister", answer)

    # Control.

    def fail(self, method: str, *errors: Exception) -> None:
        """Answer the next calls of ``method`` with these errors."""
        self.errors.setdefault(method, []).extend(errors)

    def restart(self) -> None:
        """Forget every instance, as a restarted registry does."""
        self.records.clear()

    def release(self) -> None:
        """Answer the oldest held call, as the registry stands now."""
        self._settle(*self.pending.pop(0))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def live(self, service: str = "web") -> list[str]:
        now = self.clock.seconds()
        return [
            i for (s, i), r in self.records.items() if s == service and r["instance"].is_live(now)
        ]

    # Plumbing.

    def _token(self) -> str:
        token = f"secret-token-{next(self._serial)}-do-not-log"
        self.issued.append(token)
        return token

    def _authorized(self, service: str, instance_id: str, token: str) -> dict[str, Any]:
        now = self.clock.seconds()
        record = self.records.get((service, instance_id))
        if record is None or not record["instance"].is_live(now):
            self.records.pop((service, instance_id), None)
            raise InstanceNotFound(404, "instance_not_found", "register it again")
        if token != record["token"]:
            raise Unauthorized(401, "unauthorized", "the token is not valid for this instance")
        if now >= record["token_expires_at"]:
            raise TokenExpired(401, "token_expired", "the token has expired")
        return record

    def _call(self, method: str, answer: Callable[[], Any]) -> Deferred:
        self.calls.append((method, self.clock.seconds()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        d: Deferred = Deferred()
        d.addBoth(self._landed)
        if method in self.held:
            self.pending.append((d, method, answer))
        else:
            self._settle(d, method, answer)
        return d

    def _settle(self, d: Deferred, method: str, answer: Callable[[], Any]) -> None:
        if d.called:
            return  # cancelled while held
        queued = self.errors.get(method, [])
        try:
            if self.down:
                raise RegistryUnavailable("https://registry", "cannot connect: ConnectionRefusedError")
            if queued:
                raise queued.pop(0)
            result = answer()
        except Exception as e:
            if isinstance(e, RegistryError):
                self.refused.append(e)
            d.errback(e)
        else:
            d.callback(result)

    def _landed(self, result: Any) -> Any:
        self.in_flight -= 1
        return result


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeRegistry]:
    registry = FakeRegistry(clock)
    yield registry
    assert registry.max_in_flight <= 1, "two requests were in flight at once"
    assert clock.getDelayedCalls() == [], "a stopped registration left a call scheduled"


def make(fake: FakeRegistry, seed: int = 0, **kwargs: Any) -> InstanceRegistration:
    kwargs.setdefault("ttl", TTL)
    return InstanceRegistration(
        fake, "web", "10.0.0.1", 8080, clock=fake.clock, random=random.Random(seed), **kwargs
    )


def next_delay(clock: Clock) -> float:
    """The wait until the one scheduled call."""
    [call] = clock.getDelayedCalls()
    return call.getTime() - clock.seconds()


def step(clock: Clock) -> float:
    """Advance to the one scheduled call and run it; return the wait."""
    delay = next_delay(clock)
    clock.advance(delay)
    return delay


def within(value: float, low: float, high: float) -> bool:
    """``low <= value <= high``, give or take the rounding of times near ``START``."""
    return low - 1e-6 <= value <= high + 1e-6


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e.get("event") == name]


# Registering and heartbeats.


def test_registers_at_once_then_schedules_the_first_heartbeat(fake: FakeRegistry) -> None:
    """Starting registers at once; the first heartbeat is ttl/3 away, within the jitter."""
    registration = make(fake, metadata={"zone": "a"}, tags=["blue"], status="starting")
    with capturedLogs() as captured:
        registration.startService()
    assert fake.names() == ["register"]
    assert registration.registered
    assert fake.live() == [registration.instance_id]
    assert registration.instance is not None
    assert (registration.instance.metadata, registration.instance.tags) == ({"zone": "a"}, ("blue",))
    assert registration.instance.status == "starting"
    assert registration.last_success == START
    assert within(next_delay(fake.clock), TTL * FRACTION * (1 - JITTER), TTL * FRACTION * (1 + JITTER))
    [registered] = events(captured, "registration.registered")
    assert registered["instance_id"] == registration.instance_id
    registration.stopService()


def test_generates_one_instance_id_per_object() -> None:
    """Without an id, each registration makes its own hex id once; a given id is kept."""
    clock = Clock()
    first = InstanceRegistration(FakeRegistry(clock), "web", "h", 1, clock=clock)
    second = InstanceRegistration(FakeRegistry(clock), "web", "h", 1, clock=clock)
    assert len(first.instance_id) == 32 and int(first.instance_id, 16) >= 0
    assert first.instance_id != second.instance_id
    assert InstanceRegistration(FakeRegistry(clock), "web", "h", 1, clock=clock, instance_id="w-1").instance_id == "w-1"


def test_heartbeats_keep_the_lease(fake: FakeRegistry) -> None:
    """Each heartbeat renews the lease, records the success and schedules the next."""
    registration = make(fake)
    registration.startService()
    for _ in range(10):
        step(fake.clock)
        assert fake.names()[-1] == "heartbeat"
        assert registration.last_success == fake.clock.seconds()
        assert registration.consecutive_failures == 0
        assert registration.instance is not None
        assert registration.instance.expires_at == fake.clock.seconds() + TTL
        assert registration.instance.last_heartbeat_at == fake.clock.seconds()
        assert fake.live() == [registration.instance_id]
        assert within(next_delay(fake.clock), TTL * FRACTION * (1 - JITTER), TTL * FRACTION * (1 + JITTER))
    assert fake.names() == ["register"] + ["heartbeat"] * 10
    registration.stopService()


def test_heartbeat_delays_stay_within_the_jitter_over_many_seeds() -> None:
    """Across seeds every heartbeat delay is within ttl/3 * (1 ± jitter), and they differ."""
    delays = []
    for seed in range(200):
        clock = Clock()
        fake = FakeRegistry(clock)
        registration = make(fake, seed=seed)
        registration.startService()
        for _ in range(3):
            delays.append(step(clock))
        registration.stopService()
    low, high = TTL * FRACTION * (1 - JITTER), TTL * FRACTION * (1 + JITTER)
    assert all(within(d, low, high) for d in delays)
    assert len(set(delays)) > 100
    assert min(delays) < low + 0.5 and max(delays) > high - 0.5


def test_no_jitter_gives_an_exact_interval(fake: FakeRegistry) -> None:
    """With jitter 0 the heartbeat interval is exactly ttl * heartbeat_fraction."""
    registration = make(fake, jitter=0, heartbeat_fraction=0.5)
    registration.startService()
    assert next_delay(fake.clock) == TTL * 0.5
    registration.stopService()


def test_works_as_a_child_of_a_multiservice(fake: FakeRegistry) -> None:
    """As a child of an application's MultiService it starts and stops with it."""
    root = MultiService()
    make(fake, instance_id="child").setServiceParent(root)
    root.startService()
    assert fake.live() == ["child"]
    fired(root.stopService())
    assert fake.live() == [] and fake.clock.getDelayedCalls() == []


# Token rotation.


def test_rotates_the_token_before_it_expires(fake: FakeRegistry) -> None:
    """The token is rotated once 80% of its lifetime has passed, then a heartbeat follows."""
    fake.token_ttl = 100
    registration = make(fake)
    with capturedLogs() as captured:
        registration.startService()
        while fake.clock.seconds() < START + 500:
            step(fake.clock)
    rotations = [t for name, t in fake.calls if name == "rotate"]
    assert len(rotations) >= 5
    issued = [START] + rotations
    for before, after in zip(issued, rotations):
        assert after - before == pytest.approx(80)
    for n, (name, t) in enumerate(fake.calls):
        if name == "rotate":
            assert fake.calls[n + 1] == ("heartbeat", t)
    assert fake.refused == [] and registration.consecutive_failures == 0
    assert len(events(captured, "registration.token_rotated")) == len(rotations)
    assert events(captured, "registration.failed") == []
    registration.stopService()


def test_rotates_a_token_that_lives_less_than_a_heartbeat_interval(fake: FakeRegistry) -> None:
    """A token lifetime under the heartbeat interval still rotates before each expiry."""
    fake.token_ttl = 5
    registration = make(fake)
    registration.startService()
    assert next_delay(fake.clock) == pytest.approx(4)
    while fake.clock.seconds() < START + 100:
        step(fake.clock)
    rotations = [t for name, t in fake.calls if name == "rotate"]
    assert len(rotations) == 25
    assert all(b - a == pytest.approx(4) for a, b in zip([START] + rotations, rotations))
    assert fake.refused == [] and registration.consecutive_failures == 0
    assert fake.live() == [registration.instance_id]
    registration.stopService()


def test_a_failed_rotation_is_retried_with_backoff(fake: FakeRegistry) -> None:
    """A rotation that cannot reach the registry is retried, as a rotation, after a backoff."""
    fake.token_ttl = 5
    registration = make(fake)
    registration.startService()
    fake.fail("rotate", RegistryUnavailable("https://registry", "connection lost"))
    step(fake.clock)
    assert fake.names() == ["register", "rotate"]
    assert registration.consecutive_failures == 1
    assert within(next_delay(fake.clock), 0.05, 1.0)
    step(fake.clock)
    assert fake.names() == ["register", "rotate", "rotate", "heartbeat"]
    assert registration.consecutive_failures == 0
    registration.stopService()


# Losing the registration.


def test_registers_again_at_once_when_the_registry_forgot_the_instance(fake: FakeRegistry) -> None:
    """After InstanceNotFound it registers again at once, under the same id."""
    registration = make(fake)
    registration.startService()
    first_id = registration.instance_id
    fake.restart()
    with capturedLogs() as captured:
        delay = step(fake.clock)
    now = fake.clock.seconds()
    assert fake.calls[-2:] == [("heartbeat", now), ("register", now)]
    assert fake.live() == [first_id] and registration.instance_id == first_id
    assert registration.registered and registration.consecutive_failures == 0
    [failed] = events(captured, "registration.failed")
    assert (failed["step"], failed["delay"], failed["log_level"]) == ("heartbeat", 0.0, LogLevel.warn)
    [again] = events(captured, "registration.reregistered")
    assert again["instance_id"] == first_id
    assert events(captured, "registration.registered") == []
    assert within(next_delay(fake.clock), TTL * FRACTION * (1 - JITTER), TTL * FRACTION * (1 + JITTER))
    assert delay > 0
    registration.stopService()


@pytest.mark.parametrize(
    "error",
    [
        Unauthorized(401, "unauthorized", "the token is not valid for this instance"),
        TokenExpired(401, "token_expired", "the token has expired"),
        InstanceNotFound(404, "instance_not_found", "register it again"),
    ],
)
@pytest.mark.parametrize("during", ["heartbeat", "rotate"])
def test_registers_again_at_once_when_refused(
    fake: FakeRegistry, error: RegistryError, during: str
) -> None:
    """A heartbeat or rotation refused for its token or instance registers again at once."""
    fake.token_ttl = 5 if during == "rotate" else 3600
    registration = make(fake, instance_id="web-1")
    registration.startService()
    fake.fail(during, error)
    with capturedLogs() as captured:
        step(fake.clock)
    now = fake.clock.seconds()
    assert fake.calls[-2:] == [(during, now), ("register", now)]
    assert registration.registered and fake.live() == ["web-1"]
    assert len(events(captured, "registration.reregistered")) == 1
    registration.stopService()


def test_a_refused_reregistration_backs_off_without_a_tight_loop(fake: FakeRegistry) -> None:
    """When another certificate took the id, registering again fails, is logged as an error and backs off."""
    registration = make(fake, instance_id="web-1", backoff_base=1.0, backoff_cap=30.0)
    registration.startService()
    fake.restart()
    fake.foreign.add("web-1")
    with capturedLogs() as captured:
        step(fake.clock)
        assert fake.names() == ["register", "heartbeat", "register"]
        waits = [step(fake.clock) for _ in range(50)]
    assert fake.names()[3:] == ["register"] * 50
    assert all(within(w, 0.05, 30.0) for w in waits)
    assert sum(waits) > 50 * 5  # the wait grows to the cap, on average half of it
    assert not registration.registered
    assert registration.consecutive_failures == 52
    refused = [e for e in events(captured, "registration.failed") if e["step"] == "register"]
    assert len(refused) == 51
    assert {e["log_level"] for e in refused} == {LogLevel.error}
    assert all("instance_exists" in e["error"] for e in refused)
    fake.foreign.clear()
    step(fake.clock)
    assert registration.registered and registration.consecutive_failures == 0
    registration.stopService()


def test_a_persistent_refusal_never_spins(fake: FakeRegistry) -> None:
    """Ten minutes of InstanceExists, on a clock moving in small steps, cost a few dozen attempts."""
    fake.foreign.add("web-1")
    registration = make(fake, instance_id="web-1")
    registration.startService()
    fake.clock.pump([0.01] * 60_000)
    assert 20 <= len(fake.calls) <= 120
    registration.stopService()


# Backoff.


@pytest.mark.parametrize("seed", range(5))
def test_backoff_grows_within_full_jitter_bounds_up_to_the_cap(fake: FakeRegistry, seed: int) -> None:
    """Each retry waits in [floor, min(cap, base * 2**n)]; failures count up, then reset."""
    base, cap = 0.5, 8.0
    registration = make(fake, seed=seed, backoff_base=base, backoff_cap=cap)
    fake.down = True
    registration.startService()
    waits = []
    for n in range(40):
        assert registration.consecutive_failures == n + 1
        wait = step(fake.clock)
        waits.append(wait)
        assert within(wait, 0.05 * base, min(cap, base * 2**n))
    assert fake.names() == ["register"] * 41
    assert max(waits[10:]) > cap / 2  # the ceiling reached the cap
    assert len(set(waits)) == len(waits)
    assert not registration.registered and registration.last_success is None
    fake.down = False
    step(fake.clock)
    assert registration.registered and registration.consecutive_failures == 0
    registration.stopService()


def test_backoff_never_overflows_after_very_many_failures(fake: FakeRegistry) -> None:
    """After thousands of failures the wait is still a number under the cap."""
    registration = make(fake, backoff_base=1.0, backoff_cap=2.0)
    fake.down = True
    registration.startService()
    for _ in range(2000):
        assert within(step(fake.clock), 0.05, 2.0)
    assert registration.consecutive_failures == 2001
    registration.stopService()


@pytest.mark.parametrize(
    "error",
    [
        RegistryUnavailable("https://registry", "cannot connect: ConnectionRefusedError"),
        RequestTimedOut("https://registry", "no answer within 10 s"),
        RegistryError(503, "backend_unavailable", "try again"),
    ],
)
def test_a_failed_heartbeat_is_retried_as_a_heartbeat(fake: FakeRegistry, error: Exception) -> None:
    """Connection errors and server errors retry the heartbeat after a backoff, keeping the token."""
    registration = make(fake, backoff_base=1.0)
    registration.startService()
    fake.fail("heartbeat", error, error)
    with capturedLogs() as captured:
        step(fake.clock)
        assert registration.consecutive_failures == 1 and registration.registered
        assert within(next_delay(fake.clock), 0.05, 1.0)
        step(fake.clock)
        assert registration.consecutive_failures == 2
        assert within(next_delay(fake.clock), 0.05, 2.0)
        step(fake.clock)
    assert fake.names() == ["register", "heartbeat", "heartbeat", "heartbeat"]
    assert registration.consecutive_failures == 0
    assert registration.last_success == fake.clock.seconds()
    failed = events(captured, "registration.failed")
    assert [e["log_level"] for e in failed] == [LogLevel.warn, LogLevel.warn]
    assert [e["failures"] for e in failed] == [1, 2]
    assert all(e["delay"] >= 0.05 and str(error) in e["error"] for e in failed)
    registration.stopService()


def test_a_lease_that_lapsed_during_an_outage_is_registered_again(fake: FakeRegistry) -> None:
    """Heartbeats failing past the lease's end lead, on the next contact, to a new registration."""
    registration = make(fake, ttl=10, backoff_cap=4.0)
    registration.startService()
    fake.down = True
    while fake.clock.seconds() < START + 30:
        step(fake.clock)
    assert fake.live() == []
    fake.down = False
    step(fake.clock)
    assert fake.names()[-2:] == ["heartbeat", "register"]
    assert fake.live() == [registration.instance_id]
    registration.stopService()


# Stopping.


def test_stop_deregisters(fake: FakeRegistry) -> None:
    """Stopping cancels the next heartbeat and deregisters the instance."""
    registration = make(fake)
    registration.startService()
    with capturedLogs() as captured:
        stopped = registration.stopService()
    assert fired(stopped) is None
    assert fake.names() == ["register", "deregister"]
    assert fake.live() == [] and not registration.registered
    assert fake.clock.getDelayedCalls() == []
    assert len(events(captured, "registration.deregistered")) == 1


def test_stop_is_bounded_when_the_registry_never_answers(fake: FakeRegistry) -> None:
    """A deregistration that never answers ends the stop after stop_timeout, not later."""
    registration = make(fake, stop_timeout=5.0)
    registration.startService()
    fake.held.add("deregister")
    with capturedLogs() as captured:
        stopped = registration.stopService()
        assert not stopped.called
        fake.clock.advance(4.9)
        assert not stopped.called
        fake.clock.advance(0.1)
    assert fired(stopped) is None
    assert fake.clock.getDelayedCalls() == []
    [failed] = events(captured, "registration.deregister_failed")
    assert "5 s" in failed["error"]


def test_stop_with_a_failing_registry_still_fires(fake: FakeRegistry) -> None:
    """A deregistration refused or unreachable is logged, and the stop still succeeds."""
    registration = make(fake)
    registration.startService()
    fake.down = True
    with capturedLogs() as captured:
        assert fired(registration.stopService()) is None
    [failed] = events(captured, "registration.deregister_failed")
    assert "cannot connect" in failed["error"]
    assert fake.clock.getDelayedCalls() == []


def test_stop_after_the_registry_forgot_the_instance_is_no_failure(fake: FakeRegistry) -> None:
    """Deregistering an instance the registry no longer knows ends the stop quietly."""
    registration = make(fake)
    registration.startService()
    fake.restart()
    with capturedLogs() as captured:
        assert fired(registration.stopService()) is None
    assert fake.names() == ["register", "deregister"]
    [done] = events(captured, "registration.deregistered")
    assert done["outcome"] == "already gone"
    assert events(captured, "registration.deregister_failed") == []


@pytest.mark.parametrize(
    "error",
    [TokenExpired(401, "token_expired", "the token has expired"),
     Unauthorized(401, "unauthorized", "the token is not valid for this instance")],
)
def test_stop_with_a_refused_token_registers_again_to_deregister(
    fake: FakeRegistry, error: RegistryError
) -> None:
    """A token that expired on the way is replaced by registering once more, then the instance is removed."""
    registration = make(fake)
    registration.startService()
    fake.fail("deregister", error)
    with capturedLogs() as captured:
        assert fired(registration.stopService()) is None
    assert fake.names() == ["register", "deregister", "register", "deregister"]
    assert fake.live() == [] and fake.clock.getDelayedCalls() == []
    [done] = events(captured, "registration.deregistered")
    assert done["outcome"] == "deregistered"


def test_stop_while_unregistered_sends_nothing_and_leaves_nothing_scheduled(fake: FakeRegistry) -> None:
    """Stopping during a backoff cancels the retry and sends no request."""
    fake.down = True
    registration = make(fake)
    registration.startService()
    assert len(fake.clock.getDelayedCalls()) == 1
    assert fired(registration.stopService()) is None
    assert fake.names() == ["register"]
    assert fake.clock.getDelayedCalls() == []
    fake.clock.advance(1000)
    assert fake.names() == ["register"]


def test_stop_waits_for_the_request_in_flight_then_deregisters(fake: FakeRegistry) -> None:
    """A heartbeat in flight at stop is answered first; no heartbeat follows, the deregistration does."""
    registration = make(fake)
    registration.startService()
    fake.held.add("heartbeat")
    step(fake.clock)
    stopped = registration.stopService()
    assert fake.names() == ["register", "heartbeat"] and not stopped.called
    fake.release()
    assert fired(stopped) is None
    assert fake.names() == ["register", "heartbeat", "deregister"]
    assert fake.live() == [] and fake.clock.getDelayedCalls() == []
    fake.clock.advance(1000)
    assert fake.names() == ["register", "heartbeat", "deregister"]


def test_stop_during_registration_removes_what_it_registered(fake: FakeRegistry) -> None:
    """A registration answered after the stop began is deregistered, not kept alive."""
    fake.held.add("register")
    registration = make(fake)
    registration.startService()
    stopped = registration.stopService()
    fake.release()
    assert fired(stopped) is None
    assert fake.names() == ["register", "deregister"]
    assert fake.live() == [] and fake.clock.getDelayedCalls() == []


def test_stop_gives_up_on_a_request_in_flight_that_never_ends(fake: FakeRegistry) -> None:
    """A heartbeat that never answers is cancelled at stop_timeout; nothing is sent after it."""
    registration = make(fake, stop_timeout=2.0)
    registration.startService()
    fake.held.add("heartbeat")
    step(fake.clock)
    stopped = registration.stopService()
    fake.clock.advance(2.0)
    assert fired(stopped) is None
    assert fake.names() == ["register", "heartbeat"]
    assert fake.clock.getDelayedCalls() == []
    fake.clock.advance(1000)
    assert fake.names() == ["register", "heartbeat"]


def test_starts_again_after_a_stop(fake: FakeRegistry) -> None:
    """A stopped registration can start again; it registers under the same id."""
    registration = make(fake)
    registration.startService()
    fired(registration.stopService())
    registration.startService()
    assert fake.names() == ["register", "deregister", "register"]
    assert fake.live() == [registration.instance_id]
    fired(registration.stopService())


def test_a_start_during_a_slow_stop_waits_for_it(fake: FakeRegistry) -> None:
    """Starting while the deregistration is in flight registers only after it ends."""
    registration = make(fake)
    registration.startService()
    fake.held.add("deregister")
    stopped = registration.stopService()
    registration.startService()
    assert fake.names() == ["register", "deregister"]
    fake.held.clear()
    fake.release()
    assert fired(stopped) is None
    assert fake.names() == ["register", "deregister", "register"]
    assert registration.registered
    fired(registration.stopService())


# Secrets.


def test_the_token_never_reaches_a_log_event_or_repr(fake: FakeRegistry) -> None:
    """Through registration, rotation, refusal, failure and stop, no event or repr holds a token."""
    fake.token_ttl = 5
    registration = make(fake, backoff_cap=2.0)
    with capturedLogs() as captured:
        registration.startService()
        step(fake.clock)
        fake.fail("heartbeat", Unauthorized(401, "unauthorized", "bad token"))
        fake.fail("rotate", Unauthorized(401, "unauthorized", "bad token"))
        step(fake.clock)
        fake.fail("heartbeat", RegistryUnavailable("https://registry", "connection lost"))
        for _ in range(5):
            step(fake.clock)
        texts = [repr(registration), str(registration)]
        fake.held.add("deregister")
        stopped = registration.stopService()
        fake.clock.advance(5)
    fired(stopped)
    assert len(fake.issued) >= 4
    names = {e.get("event") for e in captured}
    assert {
        "registration.registered", "registration.reregistered", "registration.token_rotated",
        "registration.failed", "registration.deregister_failed",
    } <= names
    texts += [repr(e) for e in captured] + [formatEvent(e) for e in captured]
    for token in fake.issued:
        assert not any(token in text for text in texts)
        assert "secret-token" not in repr(registration)


def test_every_event_is_named(fake: FakeRegistry) -> None:
    """Each log event of a registration carries an ``event`` key."""
    registration = make(fake)
    with capturedLogs() as captured:
        registration.startService()
        fake.restart()
        step(fake.clock)
        fired(registration.stopService())
    assert captured and all(e.get("event", "").startswith("registration.") for e in captured)


@pytest.mark.parametrize(
    "name, value",
    [("ttl", 0), ("jitter", 1.0), ("jitter", -0.1), ("heartbeat_fraction", 0), ("rotate_margin", 1),
     ("backoff_base", 0), ("backoff_cap", 0.5), ("stop_timeout", 0)],
)
def test_refuses_settings_that_make_no_sense(name: str, value: float) -> None:
    """Out-of-range settings raise ValueError naming the setting."""
    clock = Clock()
    with pytest.raises(ValueError, match=name):
        InstanceRegistration(FakeRegistry(clock), "web", "h", 1, clock=clock, **{name: value})
