"""ServiceWatcher on a Clock with a fake client whose answers the tests give."""

from __future__ import annotations

from random import Random
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from regdisc.client import RegistryError, RegistryUnavailable, ServiceWatcher
from regdisc.model import Instance

from .conftest import START

INTERVAL = 5.0
JITTER = 0.1
CAP = 30.0


class FakeClient:
    """Answers `instances` with Deferreds the test fires; records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Deferred]] = []

    def instances(self, service: str) -> Deferred:
        d: Deferred = Deferred()
        self.requests.append((service, d))
        return d

    def asked(self, service: str) -> int:
        """How many requests for ``service`` were made."""
        return sum(1 for s, _ in self.requests if s == service)

    def pending(self, service: str) -> list[Deferred]:
        return [d for s, d in self.requests if s == service and not d.called]

    def answer(self, service: str, instances: list[Instance]) -> None:
        [d] = self.pending(service)
        d.callback(instances)

    def fail(self, service: str, error: Exception | None = None) -> None:
        [d] = self.pending(service)
        d.errback(error or RegistryUnavailable("https://registry", "cannot connect: ConnectionRefusedError"))


class Highest(Random):
    """Draws the top of every range."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Lowest(Random):
    """Draws the bottom of every range."""

    def uniform(self, a: float, b: float) -> float:
        return a


def inst(
    id: str, status: str = "up", service: str = "web", port: int = 8080, heartbeat: float = START
) -> Instance:
    return Instance(
        service=service, id=id, host="10.0.0.1", port=port, status=status, metadata={"zone": "a"},
        tags=("blue",), ttl=30, registered_at=START, last_heartbeat_at=heartbeat,
        expires_at=heartbeat + 30,
    )


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


def make(
    fake: FakeClient, clock: Clock, services: tuple[str, ...] = ("web",), random: Random | None = None,
    **kwargs: Any,
) -> ServiceWatcher:
    kwargs.setdefault("interval", INTERVAL)
    kwargs.setdefault("jitter", JITTER)
    kwargs.setdefault("backoff_cap", CAP)
    return ServiceWatcher(fake, services, clock=clock, random=random or Random(7), **kwargs)


def next_delay(clock: Clock) -> float:
    """The delay of the one scheduled call."""
    [call] = clock.getDelayedCalls()
    return call.getTime() - clock.seconds()


def ids(instances: list[Instance] | None) -> list[str]:
    return [i.id for i in instances or []]


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e.get("event") == name]


# Start and schedule.


def test_start_refreshes_every_service_at_once(fake: FakeClient, clock: Clock) -> None:
    """Starting asks for every watched service at once and serves the answers from memory."""
    watcher = make(fake, clock, ("web", "db"))
    assert fake.requests == []
    assert watcher.instances("web") == [] and watcher.last_success("web") is None
    watcher.startService()
    assert sorted(s for s, _ in fake.requests) == ["db", "web"]
    fake.answer("web", [inst("web-1"), inst("web-2", status="down")])
    fake.answer("db", [inst("db-1", service="db")])
    assert ids(watcher.instances("web")) == ["web-1", "web-2"]
    assert ids(watcher.instances("db")) == ["db-1"]
    assert watcher.last_success("web") == START and watcher.staleness("web") == 0
    assert watcher.services == ["db", "web"]
    watcher.stopService()


def test_next_refresh_is_interval_with_jitter(fake: FakeClient, clock: Clock) -> None:
    """After a success the next refresh comes after interval × (1 ± jitter), at that time exactly."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")])
    delay = next_delay(clock)
    assert INTERVAL * (1 - JITTER) <= delay <= INTERVAL * (1 + JITTER)
    clock.advance(delay - 0.001)
    assert fake.asked("web") == 1
    clock.advance(0.001)
    assert fake.asked("web") == 2
    watcher.stopService()


def test_jitter_bounds_and_variation_across_seeds(fake: FakeClient) -> None:
    """Delays stay within the jitter bounds and differ from seed to seed."""
    delays = set()
    for seed in range(20):
        clock = Clock()
        watcher = make(fake, clock, random=Random(seed))
        watcher.startService()
        fake.answer("web", [])
        delay = next_delay(clock)
        assert INTERVAL * (1 - JITTER) <= delay <= INTERVAL * (1 + JITTER)
        delays.add(delay)
        watcher.stopService()
    assert len(delays) == 20


def test_jitter_reaches_both_bounds(fake: FakeClient, clock: Clock) -> None:
    """The jitter range is exactly [interval × (1 - jitter), interval × (1 + jitter)]."""
    for random, expected in ((Lowest(), INTERVAL * (1 - JITTER)), (Highest(), INTERVAL * (1 + JITTER))):
        watcher = make(fake, clock, random=random)
        watcher.startService()
        fake.answer("web", [])
        assert next_delay(clock) == pytest.approx(expected)
        watcher.stopService()


def test_each_service_has_its_own_schedule(fake: FakeClient, clock: Clock) -> None:
    """A slow service does not hold back the refresh of another."""
    watcher = make(fake, clock, ("web", "db"))
    watcher.startService()
    fake.answer("web", [])
    clock.advance(INTERVAL * (1 + JITTER))
    assert (fake.asked("web"), fake.asked("db")) == (2, 1)
    watcher.stopService()


# Failures, staleness and backoff.


def test_failures_keep_the_last_list_and_staleness_grows(fake: FakeClient, clock: Clock) -> None:
    """While refreshes fail, the last list is served, failures count up and staleness grows."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")])
    for failures in (1, 2, 3):
        clock.advance(next_delay(clock))
        fake.fail("web")
        assert ids(watcher.instances("web")) == ["web-1"]
        assert watcher.consecutive_failures("web") == failures
        assert watcher.last_success("web") == START
        assert watcher.staleness("web") == clock.seconds() - START > 0
    clock.advance(1)
    assert watcher.staleness("web") == clock.seconds() - START
    assert watcher.is_stale("web", 1.0) and not watcher.is_stale("web", 3600)
    watcher.stopService()


def test_error_answers_count_as_failures(fake: FakeClient, clock: Clock) -> None:
    """An error answer from the registry is a failure like an unreachable one."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.fail("web", RegistryError(503, "backend_unavailable", "try later"))
    assert watcher.consecutive_failures("web") == 1
    assert watcher.instances("web") == [] and watcher.staleness("web") is None
    assert watcher.is_stale("web", 3600)
    assert len(clock.getDelayedCalls()) == 1
    watcher.stopService()


def test_backoff_ceiling_doubles_up_to_the_cap(fake: FakeClient, clock: Clock) -> None:
    """The retry ceiling is min(cap, interval × 2^(failures-1)); the floor is interval / 10."""
    watcher = make(fake, clock, random=Highest())
    watcher.startService()
    ceilings = []
    for _ in range(6):
        fake.fail("web")
        ceilings.append(next_delay(clock))
        clock.advance(ceilings[-1])
    assert ceilings == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]
    watcher.stopService()

    watcher = make(fake, clock, random=Lowest())
    watcher.startService()
    fake.fail("web")
    assert next_delay(clock) == pytest.approx(INTERVAL / 10)
    watcher.stopService()


def test_backoff_has_full_jitter_within_bounds(fake: FakeClient, clock: Clock) -> None:
    """Retry delays vary across the whole range and never leave [interval / 10, ceiling]."""
    watcher = make(fake, clock, random=Random(3))
    watcher.startService()
    capped = []
    for failures in range(1, 41):
        fake.fail("web")
        delay = next_delay(clock)
        assert INTERVAL / 10 <= delay <= min(CAP, INTERVAL * 2 ** (failures - 1))
        if failures >= 4:
            capped.append(delay)
        clock.advance(delay)
    assert min(capped) < CAP / 3 and max(capped) > CAP * 2 / 3
    watcher.stopService()


def test_long_outage_does_not_overflow(fake: FakeClient, clock: Clock) -> None:
    """After very many failures the delay is still within the cap."""
    watcher = make(fake, clock, random=Highest())
    watcher.startService()
    for _ in range(1100):
        fake.fail("web")
        clock.advance(next_delay(clock))
    assert watcher.consecutive_failures("web") == 1100
    assert fake.asked("web") == 1101
    watcher.stopService()


def test_small_cap_bounds_the_floor_too(fake: FakeClient, clock: Clock) -> None:
    """A cap below interval / 10 bounds every retry delay."""
    watcher = make(fake, clock, random=Lowest(), backoff_cap=0.2)
    watcher.startService()
    fake.fail("web")
    assert next_delay(clock) == pytest.approx(0.2)
    watcher.stopService()


def test_recovery_resets_failures_and_staleness(fake: FakeClient, clock: Clock) -> None:
    """A success after failures resets the count and staleness and returns to the normal schedule."""
    watcher = make(fake, clock, random=Highest())
    watcher.startService()
    fake.answer("web", [inst("web-1")])
    clock.advance(next_delay(clock))
    fake.fail("web")
    clock.advance(next_delay(clock))
    fake.fail("web")
    clock.advance(next_delay(clock))
    assert watcher.staleness("web") > 0
    fake.answer("web", [inst("web-2")])
    assert watcher.consecutive_failures("web") == 0
    assert watcher.staleness("web") == 0 and watcher.last_success("web") == clock.seconds()
    assert ids(watcher.instances("web")) == ["web-2"]
    assert next_delay(clock) == pytest.approx(INTERVAL * (1 + JITTER))
    watcher.stopService()


def test_unexpected_errors_are_logged_and_retried(fake: FakeClient, clock: Clock) -> None:
    """A client that raises something unexpected is logged as a failure and retried with backoff."""

    class Broken:
        def instances(self, service: str) -> Deferred:
            raise TypeError("bug")

    watcher = ServiceWatcher(Broken(), ["web"], clock=clock, random=Random(1))
    with capturedLogs() as captured:
        watcher.startService()
    [error] = events(captured, "watcher.refresh_error")
    assert error["log_failure"].check(TypeError)
    assert watcher.consecutive_failures("web") == 1
    assert len(clock.getDelayedCalls()) == 1
    watcher.stopService()


def test_synchronous_answers_are_taken(clock: Clock) -> None:
    """A client that answers at once (an already fired Deferred) works like a slow one."""

    class Immediate:
        def __init__(self) -> None:
            self.answers = [succeed([inst("web-1")]), fail(RegistryUnavailable("u", "down"))]

        def instances(self, service: str) -> Deferred:
            return self.answers.pop(0)

    watcher = ServiceWatcher(Immediate(), ["web"], clock=clock, random=Random(1))
    watcher.startService()
    assert ids(watcher.instances("web")) == ["web-1"]
    clock.advance(next_delay(clock))
    assert watcher.consecutive_failures("web") == 1
    assert ids(watcher.instances("web")) == ["web-1"]
    watcher.stopService()


# Logging.


def test_failure_streak_warns_once_then_recovers(fake: FakeClient, clock: Clock) -> None:
    """A failure streak warns once with its count and retry delay; its end logs recovered."""
    watcher = make(fake, clock)
    with capturedLogs() as captured:
        watcher.startService()
        fake.answer("web", [inst("web-1")])
        for _ in range(3):
            clock.advance(next_delay(clock))
            fake.fail("web")
        clock.advance(next_delay(clock))
        fake.answer("web", [inst("web-1")])
    failed = events(captured, "watcher.refresh_failed")
    assert [e["failures"] for e in failed] == [1, 2, 3]
    warned = [e for e in failed if e["log_level"] == LogLevel.warn]
    assert len(warned) == 1 and warned[0]["service"] == "web"
    assert INTERVAL / 10 <= warned[0]["retry_in"] <= INTERVAL
    assert "cannot connect" in warned[0]["reason"]
    [recovered] = events(captured, "watcher.recovered")
    assert recovered["log_level"] == LogLevel.info
    assert (recovered["service"], recovered["failures"]) == ("web", 3)
    watcher.stopService()


def test_changes_are_logged_at_debug(fake: FakeClient, clock: Clock) -> None:
    """A change logs watcher.changed with what came and went; an unchanged answer logs nothing."""
    watcher = make(fake, clock)
    with capturedLogs() as captured:
        watcher.startService()
        fake.answer("web", [inst("web-1")])
        clock.advance(next_delay(clock))
        fake.answer("web", [inst("web-2")])
        clock.advance(next_delay(clock))
        fake.answer("web", [inst("web-2")])
    changed = events(captured, "watcher.changed")
    assert [(e["added"], e["removed"]) for e in changed] == [(["web-1"], []), (["web-2"], ["web-1"])]
    assert {e["log_level"] for e in changed} == {LogLevel.debug}
    watcher.stopService()


# Picking.


def test_pick_random_only_among_up(fake: FakeClient, clock: Clock) -> None:
    """Random picks come from the up instances only, and reach each of them."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("a"), inst("b", "down"), inst("c"), inst("d", "starting"), inst("e", "out_of_service")])
    picked = {watcher.pick("web").id for _ in range(100)}  # type: ignore[union-attr]
    assert picked == {"a", "c"}
    watcher.stopService()


def test_pick_random_is_deterministic_with_a_seed(fake: FakeClient, clock: Clock) -> None:
    """Two watchers with the same seed and the same list pick the same sequence, whatever the order."""
    sequences = []
    for listing in ([inst("a"), inst("b"), inst("c")], [inst("c"), inst("a"), inst("b")]):
        watcher = ServiceWatcher(fake, ["web"], clock=clock, random=Random(42))
        watcher.startService()
        fake.answer("web", listing)
        sequences.append([watcher.pick("web", "random").id for _ in range(20)])  # type: ignore[union-attr]
        watcher.stopService()
    assert sequences[0] == sequences[1]
    assert len(set(sequences[0])) > 1


def test_round_robin_cycles_over_up_by_id(fake: FakeClient, clock: Clock) -> None:
    """round_robin cycles over the up instances sorted by id."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("c"), inst("a"), inst("x", "down"), inst("b")])
    picks = [watcher.pick("web", "round_robin").id for _ in range(7)]  # type: ignore[union-attr]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]
    watcher.stopService()


def test_round_robin_carries_on_across_changes(fake: FakeClient, clock: Clock) -> None:
    """When the list changes, round_robin continues after the last id it picked."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("a"), inst("b"), inst("c")])
    assert watcher.pick("web", "round_robin").id == "a"  # type: ignore[union-attr]
    assert watcher.pick("web", "round_robin").id == "b"  # type: ignore[union-attr]
    clock.advance(next_delay(clock))
    # b leaves, bb arrives, c goes down.
    fake.answer("web", [inst("a"), inst("bb"), inst("c", "down"), inst("d")])
    picks = [watcher.pick("web", "round_robin").id for _ in range(4)]  # type: ignore[union-attr]
    assert picks == ["bb", "d", "a", "bb"]
    watcher.stopService()


def test_round_robin_cursor_is_per_service(fake: FakeClient, clock: Clock) -> None:
    """Each service cycles on its own."""
    watcher = make(fake, clock, ("web", "db"))
    watcher.startService()
    fake.answer("web", [inst("a"), inst("b")])
    fake.answer("db", [inst("a", service="db"), inst("b", service="db")])
    assert watcher.pick("web", "round_robin").id == "a"  # type: ignore[union-attr]
    assert watcher.pick("db", "round_robin").id == "a"  # type: ignore[union-attr]
    assert watcher.pick("web", "round_robin").id == "b"  # type: ignore[union-attr]
    watcher.stopService()


def test_pick_none_when_none_up(fake: FakeClient, clock: Clock) -> None:
    """pick answers None before the first answer and when no instance is up."""
    watcher = make(fake, clock)
    watcher.startService()
    assert watcher.pick("web") is None
    fake.answer("web", [inst("a", "down"), inst("b", "starting")])
    assert watcher.pick("web") is None and watcher.pick("web", "round_robin") is None
    watcher.stopService()


def test_pick_refuses_unknown_strategy_and_service(fake: FakeClient, clock: Clock) -> None:
    """An unknown strategy is a ValueError; a service not watched is a KeyError."""
    watcher = make(fake, clock)
    with pytest.raises(ValueError, match="least_loaded"):
        watcher.pick("web", "least_loaded")
    with pytest.raises(KeyError, match="db"):
        watcher.pick("db")
    for query in (watcher.instances, watcher.staleness, watcher.last_success, watcher.consecutive_failures):
        with pytest.raises(KeyError, match="not watched"):
            query("db")


# Watching at run time.


def test_watch_at_run_time_refreshes_at_once(fake: FakeClient, clock: Clock) -> None:
    """A service watched while running is asked for at once; before start, only at start."""
    watcher = make(fake, clock, ())
    watcher.watch("web")
    assert fake.requests == []
    watcher.startService()
    watcher.watch("db")
    assert (fake.asked("web"), fake.asked("db")) == (1, 1)
    watcher.watch("db")
    assert fake.asked("db") == 1
    fake.answer("db", [inst("db-1", service="db")])
    assert ids(watcher.instances("db")) == ["db-1"]
    watcher.stopService()


def test_watch_refuses_bad_names(fake: FakeClient, clock: Clock) -> None:
    """A name that is not a service name is refused before any request."""
    watcher = make(fake, clock, ())
    with pytest.raises(ValueError, match="not a service name"):
        watcher.watch("Not A Name")
    with pytest.raises(ValueError):
        make(fake, clock, ("web/../x",))


def test_unwatch_cancels_and_forgets(fake: FakeClient, clock: Clock) -> None:
    """Unwatching cancels the schedule and the request in flight and forgets the list."""
    watcher = make(fake, clock, ("web", "db"))
    watcher.startService()
    fake.answer("web", [inst("web-1")])
    [(_, db_request)] = [r for r in fake.requests if r[0] == "db"]
    watcher.unwatch("web")
    watcher.unwatch("db")
    assert clock.getDelayedCalls() == []
    assert db_request.called  # cancelled
    with pytest.raises(KeyError):
        watcher.instances("web")
    with pytest.raises(KeyError):
        watcher.unwatch("web")
    clock.advance(100)
    assert len(fake.requests) == 2
    watcher.stopService()


def test_watch_again_while_old_answer_pending_takes_only_the_new(clock: Clock) -> None:
    """An answer to a request made before unwatch does not land in a new watch of the service."""

    class Uncancellable(FakeClient):
        def instances(self, service: str) -> Deferred:
            d: Deferred = Deferred(lambda d: d.callback([inst("stale")]))
            self.requests.append((service, d))
            return d

    fake = Uncancellable()
    watcher = make(fake, clock)
    watcher.startService()
    watcher.unwatch("web")  # the cancel fires the old request with a stale list
    watcher.watch("web")
    assert watcher.instances("web") == [] and watcher.last_success("web") is None
    fake.answer("web", [inst("fresh")])
    assert ids(watcher.instances("web")) == ["fresh"]
    watcher.stopService()


def test_one_request_in_flight(fake: FakeClient, clock: Clock) -> None:
    """While an answer is pending, no other request for that service is made, however long it takes."""
    watcher = make(fake, clock)
    watcher.startService()
    clock.advance(10 * CAP)
    assert fake.asked("web") == 1
    assert clock.getDelayedCalls() == []
    fake.answer("web", [inst("web-1")])
    assert fake.asked("web") == 1
    clock.advance(next_delay(clock))
    assert fake.asked("web") == 2
    watcher.stopService()


# Stopping.


def test_stop_cancels_everything_and_ignores_late_answers(fake: FakeClient, clock: Clock) -> None:
    """Stopping cancels scheduled refreshes and pending requests; late answers change nothing."""
    watcher = make(fake, clock, ("web", "db"))
    seen: list[str] = []
    watcher.subscribe(lambda service, instances: seen.append(service))
    watcher.startService()
    fake.answer("web", [inst("web-1")])
    [(_, db_request)] = [r for r in fake.requests if r[0] == "db"]
    with capturedLogs() as captured:
        watcher.stopService()
        assert clock.getDelayedCalls() == []
        assert db_request.called
        # The registry's answer arrives anyway; a cancelled Deferred swallows it.
        db_request.callback([inst("db-1", service="db")])
        clock.advance(100)
    assert watcher.instances("db") == [] and watcher.consecutive_failures("db") == 0
    assert seen == ["web"] and len(fake.requests) == 2
    assert events(captured, "watcher.refresh_failed") == []
    assert ids(watcher.instances("web")) == ["web-1"]


def test_stop_ignores_answers_that_a_cancel_cannot_stop(clock: Clock) -> None:
    """An answer fired by the cancellation itself is not taken after stop."""
    results = [inst("late")]

    class Stubborn:
        def instances(self, service: str) -> Deferred:
            return Deferred(lambda d: d.callback(results))

    watcher = ServiceWatcher(Stubborn(), ["web"], clock=clock, random=Random(1))
    watcher.startService()
    watcher.stopService()
    assert watcher.instances("web") == [] and clock.getDelayedCalls() == []


def test_restart_refreshes_again(fake: FakeClient, clock: Clock) -> None:
    """A stopped watcher keeps its lists and refreshes them at once when started again."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")])
    watcher.stopService()
    watcher.startService()
    assert fake.asked("web") == 2 and ids(watcher.instances("web")) == ["web-1"]
    watcher.stopService()
    assert clock.getDelayedCalls() == []


def test_stop_from_a_subscriber_schedules_nothing(fake: FakeClient, clock: Clock) -> None:
    """A subscriber that stops the watcher leaves no refresh scheduled."""
    watcher = make(fake, clock)
    watcher.subscribe(lambda service, instances: watcher.stopService())
    watcher.startService()
    fake.answer("web", [inst("web-1")])
    assert not watcher.running and clock.getDelayedCalls() == []


# Subscribers.


def test_subscribers_hear_changes_only(fake: FakeClient, clock: Clock) -> None:
    """Callbacks run when the list changes, not when only lease times move, until unsubscribed."""
    watcher = make(fake, clock)
    heard: list[tuple[str, list[str]]] = []
    unsubscribe = watcher.subscribe(lambda service, instances: heard.append((service, ids(instances))))
    watcher.startService()

    def answer(*instances: Instance) -> None:
        clock.advance(next_delay(clock))
        fake.answer("web", list(instances))

    fake.answer("web", [])
    assert heard == []
    answer(inst("a"))
    answer(inst("a", heartbeat=START + 10))  # a heartbeat only
    assert heard == [("web", ["a"])]
    answer(inst("a", "down", heartbeat=START + 20))
    answer(inst("a", "down", port=9090))
    assert [service_ids for _, service_ids in heard] == [["a"], ["a"], ["a"]]
    clock.advance(next_delay(clock))
    fake.fail("web")  # a failure is not a change
    assert len(heard) == 3
    unsubscribe()
    unsubscribe()
    answer(inst("b"))
    assert len(heard) == 3
    assert ids(watcher.instances("web")) == ["b"]
    watcher.stopService()


def test_subscriber_exceptions_are_logged_and_harmless(fake: FakeClient, clock: Clock) -> None:
    """A failing callback is logged; other callbacks still run and refreshes go on."""
    watcher = make(fake, clock)
    heard: list[str] = []

    def broken(service: str, instances: list[Instance]) -> None:
        raise RuntimeError("subscriber bug")

    watcher.subscribe(broken)
    watcher.subscribe(lambda service, instances: heard.append(service))
    with capturedLogs() as captured:
        watcher.startService()
        fake.answer("web", [inst("a")])
    [failed] = events(captured, "watcher.callback_failed")
    assert failed["log_failure"].check(RuntimeError) and failed["service"] == "web"
    assert heard == ["web"]
    assert ids(watcher.instances("web")) == ["a"] and len(clock.getDelayedCalls()) == 1
    watcher.stopService()


def test_subscriber_gets_a_copy(fake: FakeClient, clock: Clock) -> None:
    """What a subscriber does to its list does not touch the watcher's."""
    watcher = make(fake, clock)
    watcher.subscribe(lambda service, instances: instances.clear())
    watcher.startService()
    fake.answer("web", [inst("a")])
    watcher.instances("web").clear()
    assert ids(watcher.instances("web")) == ["a"]
    watcher.stopService()


# Construction.


@pytest.mark.parametrize(
    "kwargs",
    [{"interval": 0}, {"interval": -1}, {"jitter": -0.1}, {"jitter": 1.0}, {"backoff_cap": 0}],
)
def test_bad_settings_are_refused(fake: FakeClient, clock: Clock, kwargs: dict[str, float]) -> None:
    """Intervals and caps must be positive and jitter a fraction below one."""
    with pytest.raises(ValueError):
        make(fake, clock, **kwargs)


def test_cancelled_request_is_never_a_failure(fake: FakeClient, clock: Clock) -> None:
    """Cancelling the pending request through unwatch counts no failure, logs none and leaves no error."""
    watcher = make(fake, clock, ("web", "db"))
    watcher.startService()
    [(_, web_request)] = [r for r in fake.requests if r[0] == "web"]
    with capturedLogs() as captured:
        watcher.unwatch("web")
    outcome: list[Any] = []
    web_request.addBoth(outcome.append)
    assert outcome == [None]  # the CancelledError was consumed, not left unhandled
    assert events(captured, "watcher.refresh_failed") == []
    assert watcher.consecutive_failures("db") == 0
    watcher.stopService()
