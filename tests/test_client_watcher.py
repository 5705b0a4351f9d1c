"""ServiceWatcher on a Clock with a fake client whose answers the tests give."""

from __future__ import annotations

from random import Random
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from regdisc.client import InstanceList, RegistryError, RegistryUnavailable, ServiceWatcher
from regdisc.model import Instance

from .conftest import START

WAIT = 30.0
JITTER = 0.1
BASE = 1.0
CAP = 30.0


@attrs.define
class Asked:
    """One request the watcher made: ``index`` None for a plain read (``wait=None``)."""

    service: str
    index: int | None
    wait: float | None
    answer: Deferred


class FakeClient:
    """Answers `watch_instances` with Deferreds the test fires; records every request."""

    def __init__(self) -> None:
        self.requests: list[Asked] = []

    def watch_instances(self, service: str, *, index: int = 0, wait: float | None = 60.0) -> Deferred:
        d: Deferred = Deferred()
        self.requests.append(Asked(service, None if wait is None else index, wait, d))
        return d

    def asked(self, service: str) -> int:
        """How many requests for ``service`` were made."""
        return sum(1 for r in self.requests if r.service == service)

    def last(self, service: str) -> Asked:
        """The latest request for ``service``."""
        return [r for r in self.requests if r.service == service][-1]

    def pending(self, service: str) -> list[Deferred]:
        return [r.answer for r in self.requests if r.service == service and not r.answer.called]

    def answer(self, service: str, instances: list[Instance], index: int) -> None:
        [d] = self.pending(service)
        d.callback(InstanceList(instances, index))

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
    kwargs.setdefault("wait", WAIT)
    kwargs.setdefault("jitter", JITTER)
    kwargs.setdefault("backoff_base", BASE)
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


def held(fake: FakeClient, clock: Clock, service: str, instances: list[Instance]) -> None:
    """The registry holds the pending query for the whole wait, then answers it unchanged."""
    clock.advance(WAIT)
    fake.answer(service, instances, fake.last(service).index)  # type: ignore[arg-type]


# Blocking queries.


def test_start_reads_every_service_at_once(fake: FakeClient, clock: Clock) -> None:
    """Starting reads every watched service at once, without blocking, and serves the answers from memory."""
    watcher = make(fake, clock, ("web", "db"))
    assert fake.requests == []
    assert watcher.instances("web") == [] and watcher.last_success("web") is None
    assert watcher.index("web") is None
    watcher.startService()
    assert sorted((r.service, r.index, r.wait) for r in fake.requests) == [("db", None, None), ("web", None, None)]
    fake.answer("web", [inst("web-1"), inst("web-2", status="down")], 7)
    fake.answer("db", [inst("db-1", service="db")], 3)
    assert ids(watcher.instances("web")) == ["web-1", "web-2"]
    assert ids(watcher.instances("db")) == ["db-1"]
    assert (watcher.index("web"), watcher.index("db")) == (7, 3)
    assert watcher.last_success("web") == START and watcher.staleness("web") == 0
    assert watcher.services == ["db", "web"]
    watcher.stopService()


def test_next_query_goes_out_at_once_with_the_answers_index(fake: FakeClient, clock: Clock) -> None:
    """Each answer sends the next query in the same turn, carrying the answer's index and the wait."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")], 7)
    assert fake.asked("web") == 2
    assert (fake.last("web").index, fake.last("web").wait) == (7, WAIT)
    assert clock.getDelayedCalls() == []  # no timer: the registry holds the query
    fake.answer("web", [inst("web-1"), inst("web-2")], 9)
    assert fake.asked("web") == 3 and fake.last("web").index == 9
    assert ids(watcher.instances("web")) == ["web-1", "web-2"]
    assert clock.getDelayedCalls() == []
    watcher.stopService()


def test_held_query_answered_unchanged_is_asked_again(fake: FakeClient, clock: Clock) -> None:
    """A query held for the whole wait and answered unchanged is asked again at once, same index."""
    watcher = make(fake, clock)
    heard: list[list[str]] = []
    watcher.subscribe(lambda service, instances: heard.append(ids(instances)))
    watcher.startService()
    fake.answer("web", [inst("web-1")], 7)
    for round_ in range(3):
        held(fake, clock, "web", [inst("web-1")])
        assert fake.asked("web") == 3 + round_ and fake.last("web").index == 7
        assert watcher.last_success("web") == clock.seconds()
        assert clock.getDelayedCalls() == []
    assert heard == [["web-1"]]
    watcher.stopService()


def test_lower_index_resets_it(fake: FakeClient, clock: Clock) -> None:
    """An answer with a lower index (a restarted registry) is taken, and its index is asked with next."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")], 12)
    with capturedLogs() as captured:
        fake.answer("web", [], 3)
    assert watcher.index("web") == 3 and watcher.instances("web") == []
    assert fake.last("web").index == 3 and clock.getDelayedCalls() == []
    [reset] = events(captured, "watcher.index_reset")
    assert (reset["held"], reset["index"], reset["log_level"]) == (12, 3, LogLevel.info)
    fake.answer("web", [inst("web-2")], 4)
    assert fake.last("web").index == 4 and ids(watcher.instances("web")) == ["web-2"]
    watcher.stopService()


def test_index_survives_failures_and_resets_after_them(fake: FakeClient, clock: Clock) -> None:
    """Retries after failures ask with the index held; a restarted registry's lower index then resets it."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")], 12)
    for _ in range(3):
        fake.fail("web")
        clock.advance(next_delay(clock))
        assert fake.last("web").index == 12
    fake.answer("web", [], 0)
    assert watcher.index("web") == 0 and fake.last("web").index == 0
    assert watcher.consecutive_failures("web") == 0
    watcher.stopService()


def test_each_service_follows_its_own_answers(fake: FakeClient, clock: Clock) -> None:
    """A service whose query is held does not hold back another."""
    watcher = make(fake, clock, ("web", "db"))
    watcher.startService()
    fake.answer("web", [], 1)
    fake.answer("web", [inst("web-1")], 2)
    assert (fake.asked("web"), fake.asked("db")) == (3, 1)
    watcher.stopService()


def test_one_request_in_flight(fake: FakeClient, clock: Clock) -> None:
    """While a query is held, no other request for that service is made, however long it takes."""
    watcher = make(fake, clock)
    watcher.startService()
    clock.advance(10 * WAIT)
    assert fake.asked("web") == 1 and clock.getDelayedCalls() == []
    fake.answer("web", [inst("web-1")], 5)
    clock.advance(10 * WAIT)
    assert fake.asked("web") == 2 and clock.getDelayedCalls() == []
    watcher.stopService()


def test_staleness_grows_while_held_and_resets_on_arrival(fake: FakeClient, clock: Clock) -> None:
    """Staleness counts from the last answer's arrival: it grows while a query is held, up to the wait."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")], 5)
    clock.advance(WAIT * 17 / 16)
    assert watcher.staleness("web") == WAIT * 17 / 16
    assert not watcher.is_stale("web", 2 * WAIT) and watcher.is_stale("web", WAIT)
    fake.answer("web", [inst("web-1")], 5)
    assert watcher.staleness("web") == 0 and watcher.last_success("web") == clock.seconds()
    watcher.stopService()


# A registry that does not hold queries.


def test_unheld_answers_fall_back_to_polling_every_wait(fake: FakeClient, clock: Clock) -> None:
    """A blocking query answered early with the same index is not asked again at once, but after wait ± jitter."""
    watcher = make(fake, clock)
    with capturedLogs() as captured:
        watcher.startService()
        fake.answer("web", [inst("web-1")], 5)
        for _ in range(3):
            clock.advance(1)
            fake.answer("web", [inst("web-1")], 5)
            delay = next_delay(clock)
            assert WAIT * (1 - JITTER) <= delay <= WAIT * (1 + JITTER)
            clock.advance(delay - 0.001)
            assert fake.pending("web") == []
            clock.advance(0.001)
            assert fake.last("web").index == 5
    [warned] = events(captured, "watcher.not_held")
    assert (warned["log_level"], warned["service"]) == (LogLevel.warn, "web")
    # A registry that holds again (or a change) brings back the immediate follow-up.
    fake.answer("web", [inst("web-2")], 6)
    assert fake.last("web").index == 6 and clock.getDelayedCalls() == []
    held(fake, clock, "web", [inst("web-2")])
    assert fake.asked("web") == 7 and clock.getDelayedCalls() == []
    watcher.stopService()


def test_polling_fallback_jitter_reaches_both_bounds(fake: FakeClient, clock: Clock) -> None:
    """The fallback's delays span exactly [wait × (1 - jitter), wait × (1 + jitter)]."""
    for random, expected in ((Lowest(), WAIT * (1 - JITTER)), (Highest(), WAIT * (1 + JITTER))):
        watcher = make(fake, clock, random=random)
        watcher.startService()
        fake.answer("web", [], 2)
        fake.answer("web", [], 2)
        assert next_delay(clock) == pytest.approx(expected)
        watcher.stopService()


def test_a_lower_index_answered_early_is_no_fallback(fake: FakeClient, clock: Clock) -> None:
    """An early answer whose index went back is a reset, followed at once, not a registry that does not hold."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [], 9)
    fake.answer("web", [], 2)
    assert fake.asked("web") == 3 and clock.getDelayedCalls() == []
    watcher.stopService()


# Failures, staleness and backoff.


def test_failures_keep_the_last_list_and_staleness_grows(fake: FakeClient, clock: Clock) -> None:
    """While queries fail, the last list is served, failures count up and staleness grows."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")], 4)
    for failures in (1, 2, 3):
        clock.advance(1)
        fake.fail("web")
        assert ids(watcher.instances("web")) == ["web-1"] and watcher.index("web") == 4
        assert watcher.consecutive_failures("web") == failures
        assert watcher.last_success("web") == START
        assert watcher.staleness("web") == clock.seconds() - START > 0
        clock.advance(next_delay(clock))
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
    clock.advance(next_delay(clock))
    assert fake.last("web").wait is None  # still no answer: still a plain read
    watcher.stopService()


def test_backoff_ceiling_doubles_up_to_the_cap(fake: FakeClient, clock: Clock) -> None:
    """The retry ceiling is min(cap, base × 2^(failures-1)); the floor is base / 10."""
    watcher = make(fake, clock, random=Highest())
    watcher.startService()
    ceilings = []
    for _ in range(7):
        fake.fail("web")
        ceilings.append(next_delay(clock))
        clock.advance(ceilings[-1])
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    watcher.stopService()

    watcher = make(fake, clock, random=Lowest())
    watcher.startService()
    fake.fail("web")
    assert next_delay(clock) == pytest.approx(BASE / 10)
    watcher.stopService()


def test_backoff_has_full_jitter_within_bounds(fake: FakeClient, clock: Clock) -> None:
    """Retry delays vary across the whole range and never leave [base / 10, ceiling]."""
    watcher = make(fake, clock, random=Random(3))
    watcher.startService()
    capped = []
    for failures in range(1, 41):
        fake.fail("web")
        delay = next_delay(clock)
        assert BASE / 10 <= delay <= min(CAP, BASE * 2 ** (failures - 1))
        if failures >= 6:
            capped.append(delay)
        clock.advance(delay)
    assert min(capped) < CAP / 3 and max(capped) > CAP * 2 / 3
    watcher.stopService()


def test_backoff_does_not_depend_on_the_wait(fake: FakeClient, clock: Clock) -> None:
    """A long wait does not slow the first retries: they follow backoff_base."""
    watcher = make(fake, clock, random=Highest(), wait=600.0)
    watcher.startService()
    fake.fail("web")
    assert next_delay(clock) == BASE
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
    """A cap below base / 10 bounds every retry delay."""
    watcher = make(fake, clock, random=Lowest(), backoff_cap=0.05)
    watcher.startService()
    fake.fail("web")
    assert next_delay(clock) == pytest.approx(0.05)
    watcher.stopService()


def test_recovery_resets_failures_and_staleness(fake: FakeClient, clock: Clock) -> None:
    """A success after failures resets the count and staleness and goes back to blocking queries."""
    watcher = make(fake, clock, random=Highest())
    watcher.startService()
    fake.answer("web", [inst("web-1")], 3)
    fake.fail("web")
    clock.advance(next_delay(clock))
    fake.fail("web")
    clock.advance(next_delay(clock))
    assert watcher.staleness("web") > 0
    fake.answer("web", [inst("web-2")], 4)
    assert watcher.consecutive_failures("web") == 0
    assert watcher.staleness("web") == 0 and watcher.last_success("web") == clock.seconds()
    assert ids(watcher.instances("web")) == ["web-2"]
    assert fake.last("web").index == 4 and clock.getDelayedCalls() == []
    watcher.stopService()


def test_unexpected_errors_are_logged_and_retried(fake: FakeClient, clock: Clock) -> None:
    """A client that raises something unexpected is logged as a failure and retried with backoff."""

    class Broken:
        def watch_instances(self, service: str, **kwargs: Any) -> Deferred:
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
    """A client that answers at once (already fired Deferreds) works like a slow one."""

    class Immediate:
        def __init__(self) -> None:
            self.answers = [
                succeed(InstanceList([inst("web-1")], 1)),
                succeed(InstanceList([inst("web-1"), inst("web-2")], 2)),
                fail(RegistryUnavailable("u", "down")),
            ]
            self.indexes: list[int | None] = []

        def watch_instances(self, service: str, *, index: int = 0, wait: float | None = 60.0) -> Deferred:
            self.indexes.append(None if wait is None else index)
            return self.answers.pop(0)

    client = Immediate()
    watcher = ServiceWatcher(client, ["web"], clock=clock, random=Random(1))
    watcher.startService()
    assert client.indexes == [None, 1, 2]
    assert watcher.consecutive_failures("web") == 1
    assert ids(watcher.instances("web")) == ["web-1", "web-2"]
    assert len(clock.getDelayedCalls()) == 1
    watcher.stopService()


# Logging.


def test_failure_streak_warns_once_then_recovers(fake: FakeClient, clock: Clock) -> None:
    """A failure streak warns once with its count and retry delay; its end logs recovered."""
    watcher = make(fake, clock)
    with capturedLogs() as captured:
        watcher.startService()
        fake.answer("web", [inst("web-1")], 1)
        for _ in range(3):
            fake.fail("web")
            clock.advance(next_delay(clock))
        fake.answer("web", [inst("web-1")], 1)
    failed = events(captured, "watcher.refresh_failed")
    assert [e["failures"] for e in failed] == [1, 2, 3]
    warned = [e for e in failed if e["log_level"] == LogLevel.warn]
    assert len(warned) == 1 and warned[0]["service"] == "web"
    assert BASE / 10 <= warned[0]["retry_in"] <= BASE
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
        fake.answer("web", [inst("web-1")], 1)
        fake.answer("web", [inst("web-2")], 2)
        held(fake, clock, "web", [inst("web-2")])
    changed = events(captured, "watcher.changed")
    assert [(e["added"], e["removed"]) for e in changed] == [(["web-1"], []), (["web-2"], ["web-1"])]
    assert {e["log_level"] for e in changed} == {LogLevel.debug}
    watcher.stopService()


# Picking.


def test_pick_random_only_among_up(fake: FakeClient, clock: Clock) -> None:
    """Random picks come from the up instances only, and reach each of them."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer(
        "web", [inst("a"), inst("b", "down"), inst("c"), inst("d", "starting"), inst("e", "out_of_service")], 1
    )
    picked = {watcher.pick("web").id for _ in range(100)}  # type: ignore[union-attr]
    assert picked == {"a", "c"}
    watcher.stopService()


def test_pick_random_is_deterministic_with_a_seed(fake: FakeClient, clock: Clock) -> None:
    """Two watchers with the same seed and the same list pick the same sequence, whatever the order."""
    sequences = []
    for listing in ([inst("a"), inst("b"), inst("c")], [inst("c"), inst("a"), inst("b")]):
        watcher = ServiceWatcher(fake, ["web"], clock=clock, random=Random(42))
        watcher.startService()
        fake.answer("web", listing, 1)
        sequences.append([watcher.pick("web", "random").id for _ in range(20)])  # type: ignore[union-attr]
        watcher.stopService()
    assert sequences[0] == sequences[1]
    assert len(set(sequences[0])) > 1


def test_round_robin_cycles_over_up_by_id(fake: FakeClient, clock: Clock) -> None:
    """round_robin cycles over the up instances sorted by id."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("c"), inst("a"), inst("x", "down"), inst("b")], 1)
    picks = [watcher.pick("web", "round_robin").id for _ in range(7)]  # type: ignore[union-attr]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]
    watcher.stopService()


def test_round_robin_carries_on_across_changes(fake: FakeClient, clock: Clock) -> None:
    """When the list changes, round_robin continues after the last id it picked."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("a"), inst("b"), inst("c")], 1)
    assert watcher.pick("web", "round_robin").id == "a"  # type: ignore[union-attr]
    assert watcher.pick("web", "round_robin").id == "b"  # type: ignore[union-attr]
    # b leaves, bb arrives, c goes down.
    fake.answer("web", [inst("a"), inst("bb"), inst("c", "down"), inst("d")], 2)
    picks = [watcher.pick("web", "round_robin").id for _ in range(4)]  # type: ignore[union-attr]
    assert picks == ["bb", "d", "a", "bb"]
    watcher.stopService()


def test_round_robin_cursor_is_per_service(fake: FakeClient, clock: Clock) -> None:
    """Each service cycles on its own."""
    watcher = make(fake, clock, ("web", "db"))
    watcher.startService()
    fake.answer("web", [inst("a"), inst("b")], 1)
    fake.answer("db", [inst("a", service="db"), inst("b", service="db")], 1)
    assert watcher.pick("web", "round_robin").id == "a"  # type: ignore[union-attr]
    assert watcher.pick("db", "round_robin").id == "a"  # type: ignore[union-attr]
    assert watcher.pick("web", "round_robin").id == "b"  # type: ignore[union-attr]
    watcher.stopService()


def test_pick_none_when_none_up(fake: FakeClient, clock: Clock) -> None:
    """pick answers None before the first answer and when no instance is up."""
    watcher = make(fake, clock)
    watcher.startService()
    assert watcher.pick("web") is None
    fake.answer("web", [inst("a", "down"), inst("b", "starting")], 1)
    assert watcher.pick("web") is None and watcher.pick("web", "round_robin") is None
    watcher.stopService()


def test_pick_refuses_unknown_strategy_and_service(fake: FakeClient, clock: Clock) -> None:
    """An unknown strategy is a ValueError; a service not watched is a KeyError."""
    watcher = make(fake, clock)
    with pytest.raises(ValueError, match="least_loaded"):
        watcher.pick("web", "least_loaded")
    with pytest.raises(KeyError, match="db"):
        watcher.pick("db")
    for query in (
        watcher.instances, watcher.staleness, watcher.last_success, watcher.consecutive_failures, watcher.index,
    ):
        with pytest.raises(KeyError, match="not watched"):
            query("db")


# Watching at run time.


def test_watch_at_run_time_reads_at_once(fake: FakeClient, clock: Clock) -> None:
    """A service watched while running is read at once; before start, only at start."""
    watcher = make(fake, clock, ())
    watcher.watch("web")
    assert fake.requests == []
    watcher.startService()
    watcher.watch("db")
    assert (fake.asked("web"), fake.asked("db")) == (1, 1)
    watcher.watch("db")
    assert fake.asked("db") == 1
    fake.answer("db", [inst("db-1", service="db")], 1)
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
    """Unwatching cancels the held queries and forgets the lists."""
    watcher = make(fake, clock, ("web", "db"))
    watcher.startService()
    fake.answer("web", [inst("web-1")], 1)
    web_held, [db_request] = fake.last("web").answer, fake.pending("db")
    watcher.unwatch("web")
    watcher.unwatch("db")
    assert clock.getDelayedCalls() == []
    assert web_held.called and db_request.called  # cancelled
    with pytest.raises(KeyError):
        watcher.instances("web")
    with pytest.raises(KeyError):
        watcher.unwatch("web")
    clock.advance(100)
    assert len(fake.requests) == 3
    watcher.stopService()


def test_watch_again_while_old_answer_pending_takes_only_the_new(clock: Clock) -> None:
    """An answer to a request made before unwatch does not land in a new watch of the service."""

    class Uncancellable(FakeClient):
        def watch_instances(self, service: str, *, index: int = 0, wait: float | None = 60.0) -> Deferred:
            d: Deferred = Deferred(lambda d: d.callback(InstanceList([inst("stale")], 50)))
            self.requests.append(Asked(service, None if wait is None else index, wait, d))
            return d

    fake = Uncancellable()
    watcher = make(fake, clock)
    watcher.startService()
    watcher.unwatch("web")  # the cancel fires the old request with a stale list
    watcher.watch("web")
    assert watcher.instances("web") == [] and watcher.last_success("web") is None
    assert watcher.index("web") is None
    fake.answer("web", [inst("fresh")], 2)
    assert ids(watcher.instances("web")) == ["fresh"] and watcher.index("web") == 2
    watcher.stopService()


# Stopping.


def test_stop_cancels_held_queries_and_ignores_late_answers(fake: FakeClient, clock: Clock) -> None:
    """Stopping cancels every query in flight, held ones too; late answers change nothing."""
    watcher = make(fake, clock, ("web", "db"))
    seen: list[str] = []
    watcher.subscribe(lambda service, instances: seen.append(service))
    watcher.startService()
    fake.answer("web", [inst("web-1")], 1)
    web_held, [db_request] = fake.last("web").answer, fake.pending("db")
    with capturedLogs() as captured:
        watcher.stopService()
        assert clock.getDelayedCalls() == []
        assert web_held.called and db_request.called
        # The registry's answers arrive anyway; a cancelled Deferred swallows them.
        db_request.callback(InstanceList([inst("db-1", service="db")], 1))
        web_held.callback(InstanceList([], 2))
        clock.advance(100)
    assert watcher.instances("db") == [] and watcher.consecutive_failures("db") == 0
    assert seen == ["web"] and len(fake.requests) == 3
    assert events(captured, "watcher.refresh_failed") == []
    assert ids(watcher.instances("web")) == ["web-1"] and watcher.index("web") == 1


def test_stop_cancels_a_scheduled_retry(fake: FakeClient, clock: Clock) -> None:
    """Stopping during a backoff, or between fallback polls, leaves nothing scheduled and asks no more."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.fail("web")
    assert len(clock.getDelayedCalls()) == 1
    watcher.stopService()
    assert clock.getDelayedCalls() == []

    watcher.startService()
    fake.answer("web", [], 1)
    fake.answer("web", [], 1)  # early, unchanged: a poll is scheduled
    assert len(clock.getDelayedCalls()) == 1
    watcher.stopService()
    assert clock.getDelayedCalls() == []
    clock.advance(10 * WAIT)
    assert fake.pending("web") == [] and fake.asked("web") == 3


def test_stop_ignores_answers_that_a_cancel_cannot_stop(clock: Clock) -> None:
    """An answer fired by the cancellation itself is not taken after stop."""

    class Stubborn:
        def watch_instances(self, service: str, **kwargs: Any) -> Deferred:
            return Deferred(lambda d: d.callback(InstanceList([inst("late")], 9)))

    watcher = ServiceWatcher(Stubborn(), ["web"], clock=clock, random=Random(1))
    watcher.startService()
    watcher.stopService()
    assert watcher.instances("web") == [] and clock.getDelayedCalls() == []
    assert watcher.index("web") is None


def test_restart_blocks_from_the_index_held(fake: FakeClient, clock: Clock) -> None:
    """A stopped watcher keeps its lists and indexes, and asks again from them when started."""
    watcher = make(fake, clock)
    watcher.startService()
    fake.answer("web", [inst("web-1")], 4)
    watcher.stopService()
    watcher.startService()
    assert fake.asked("web") == 3 and fake.last("web").index == 4
    assert ids(watcher.instances("web")) == ["web-1"]
    watcher.stopService()
    assert clock.getDelayedCalls() == [] and fake.pending("web") == []


def test_stop_from_a_subscriber_sends_nothing(fake: FakeClient, clock: Clock) -> None:
    """A subscriber that stops the watcher leaves no query in flight and none scheduled."""
    watcher = make(fake, clock)
    watcher.subscribe(lambda service, instances: watcher.stopService())
    watcher.startService()
    fake.answer("web", [inst("web-1")], 1)
    assert not watcher.running and clock.getDelayedCalls() == []
    assert fake.asked("web") == 1 and fake.pending("web") == []


def test_cancelled_request_is_never_a_failure(fake: FakeClient, clock: Clock) -> None:
    """Cancelling the held query through unwatch counts no failure, logs none and leaves no error."""
    watcher = make(fake, clock, ("web", "db"))
    watcher.startService()
    fake.answer("web", [], 1)
    web_request = fake.last("web").answer
    with capturedLogs() as captured:
        watcher.unwatch("web")
    outcome: list[Any] = []
    web_request.addBoth(outcome.append)
    assert outcome == [None]  # the CancelledError was consumed, not left unhandled
    assert events(captured, "watcher.refresh_failed") == []
    assert watcher.consecutive_failures("db") == 0
    watcher.stopService()


# Subscribers.


def test_subscribers_hear_changes_only(fake: FakeClient, clock: Clock) -> None:
    """Callbacks run when the list changes, not when only lease times move, until unsubscribed."""
    watcher = make(fake, clock)
    heard: list[tuple[str, list[str]]] = []
    unsubscribe = watcher.subscribe(lambda service, instances: heard.append((service, ids(instances))))
    watcher.startService()
    index = iter(range(1, 100))

    def answer(*instances: Instance) -> None:
        fake.answer("web", list(instances), next(index))

    answer()
    assert heard == []
    answer(inst("a"))
    answer(inst("a", heartbeat=START + 10))  # a heartbeat only
    assert heard == [("web", ["a"])]
    answer(inst("a", "down", heartbeat=START + 20))
    answer(inst("a", "down", port=9090))
    assert [service_ids for _, service_ids in heard] == [["a"], ["a"], ["a"]]
    fake.fail("web")  # a failure is not a change
    clock.advance(next_delay(clock))
    assert len(heard) == 3
    unsubscribe()
    unsubscribe()
    answer(inst("b"))
    assert len(heard) == 3
    assert ids(watcher.instances("web")) == ["b"]
    watcher.stopService()


def test_subscriber_exceptions_are_logged_and_harmless(fake: FakeClient, clock: Clock) -> None:
    """A failing callback is logged; other callbacks still run and the next query still goes out."""
    watcher = make(fake, clock)
    heard: list[str] = []

    def broken(service: str, instances: list[Instance]) -> None:
        raise RuntimeError("subscriber bug")

    watcher.subscribe(broken)
    watcher.subscribe(lambda service, instances: heard.append(service))
    with capturedLogs() as captured:
        watcher.startService()
        fake.answer("web", [inst("a")], 1)
    [failed] = events(captured, "watcher.callback_failed")
    assert failed["log_failure"].check(RuntimeError) and failed["service"] == "web"
    assert heard == ["web"]
    assert ids(watcher.instances("web")) == ["a"] and fake.last("web").index == 1
    assert len(fake.pending("web")) == 1
    watcher.stopService()


def test_subscriber_gets_a_copy(fake: FakeClient, clock: Clock) -> None:
    """What a subscriber does to its list does not touch the watcher's."""
    watcher = make(fake, clock)
    watcher.subscribe(lambda service, instances: instances.clear())
    watcher.startService()
    fake.answer("web", [inst("a")], 1)
    watcher.instances("web").clear()
    assert ids(watcher.instances("web")) == ["a"]
    watcher.stopService()


# Construction.


@pytest.mark.parametrize(
    "kwargs",
    [
        {"wait": 0}, {"wait": -1}, {"wait": 601}, {"jitter": -0.1}, {"jitter": 1.0},
        {"backoff_base": 0}, {"backoff_cap": 0},
    ],
)
def test_bad_settings_are_refused(fake: FakeClient, clock: Clock, kwargs: dict[str, float]) -> None:
    """The wait must be positive and at most the registry's 600 s, jitter a fraction below one, backoffs positive."""
    with pytest.raises(ValueError):
        make(fake, clock, **kwargs)


def test_interval_is_the_wait_by_its_former_name(fake: FakeClient, clock: Clock) -> None:
    """``interval`` still works and means the wait; giving both is refused; the default wait is 60 s."""
    watcher = ServiceWatcher(fake, ["web"], clock=clock, interval=2.0)
    assert watcher.wait == 2.0
    watcher.startService()
    fake.answer("web", [], 1)
    assert fake.last("web").wait == 2.0
    watcher.stopService()
    assert ServiceWatcher(fake, [], clock=clock).wait == 60.0
    with pytest.raises(ValueError):
        ServiceWatcher(fake, [], clock=clock, interval=0)
    with pytest.raises(TypeError, match="not both"):
        ServiceWatcher(fake, [], clock=clock, wait=2.0, interval=2.0)
