"""The change feed: revisions, history, and waiters woken only by their own service."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError

from regdisc.feed import SERVICES, WAKE_BATCH, ChangeFeed
from regdisc.model import Instance

from .conftest import fired


def instance(service: str = "web", instance_id: str = "i") -> Instance:
    return Instance(service, instance_id, "h", 1, "up", {}, (), 10, 0.0, 0.0, 10.0)


def test_every_write_advances_the_revision() -> None:
    """Recorded changes and silent writes both advance one revision."""
    feed = ChangeFeed()
    assert feed.record("registered", instance()).revision == 1
    assert feed.advance() == 2
    assert feed.record("updated", instance()).revision == 3
    assert feed.revision == 3


def test_service_revisions() -> None:
    """Each service knows its last change; the service list changes only with membership."""
    feed = ChangeFeed()
    feed.record("registered", instance("a"))
    feed.record("registered", instance("b"))
    feed.record("updated", instance("a"))
    assert (feed.service_revision("a"), feed.service_revision("b")) == (3, 2)
    assert feed.service_revision("never") == 0
    assert feed.service_revision(SERVICES) == 2


def test_a_waiter_wakes_on_its_service_only() -> None:
    """A change to one service wakes its waiters and no waiter of another service."""
    feed = ChangeFeed()
    on_a, on_b = feed.wait("a", 0), feed.wait("b", 0)
    feed.record("registered", instance("a"))
    assert fired(on_a) == 1
    assert not on_b.called
    assert feed.wakeups == 1


def test_the_service_list_wakes_on_membership() -> None:
    """Waiters on the service list wake on registrations and removals, not updates."""
    feed = ChangeFeed()
    feed.record("registered", instance("a"))
    waiting = feed.wait(SERVICES, 1)
    feed.record("updated", instance("a"))
    assert not waiting.called
    feed.record("evicted", instance("a"))
    assert fired(waiting) == 3


def test_waiting_on_a_past_index_fires_at_once() -> None:
    """Asking to wait for changes after an old index answers at once."""
    feed = ChangeFeed()
    feed.record("registered", instance("a"))
    assert fired(feed.wait("a", 0)) == 1


def test_cancelled_waiters_are_forgotten() -> None:
    """A cancelled waiter is dropped and costs nothing more."""
    feed = ChangeFeed()
    waiting = feed.wait("a", 0)
    assert feed.waiting() == 1
    waiting.cancel()
    with pytest.raises(CancelledError):
        fired(waiting)
    assert feed.waiting() == 0


def test_history_replays_and_knows_its_limit() -> None:
    """since() replays later changes, filtered by service, until history has dropped some."""
    feed = ChangeFeed(history=3)
    for name in ("a", "b", "a"):
        feed.record("registered", instance(name))
    assert [c.revision for c in feed.since(1)] == [2, 3]
    assert [c.revision for c in feed.since(0, ["a"])] == [1, 3]
    feed.record("updated", instance("b"))  # drops revision 1
    assert feed.since(0) is None
    assert [c.revision for c in feed.since(1)] == [2, 3, 4]
    assert feed.since(4) == []


def test_listeners_follow_their_services() -> None:
    """A listener hears the changes of its services, or of all, until stopped."""
    feed = ChangeFeed()
    heard_a: list[int] = []
    heard_all: list[int] = []
    stop_a = feed.listen(lambda c: heard_a.append(c.revision), ["a"])
    feed.listen(lambda c: heard_all.append(c.revision))
    feed.record("registered", instance("a"))
    feed.record("registered", instance("b"))
    stop_a()
    feed.record("updated", instance("a"))
    assert heard_a == [1]
    assert heard_all == [1, 2, 3]


def test_with_a_clock_many_waiters_wake_a_batch_per_turn() -> None:
    """A change wakes at most WAKE_BATCH waiters per reactor turn; the rest in the turns after."""
    turns = Turns()
    feed = ChangeFeed(clock=turns)  # type: ignore[arg-type]
    waiters = [feed.wait("web", 0) for _ in range(2 * WAKE_BATCH + 1)]
    woken: list[int] = []
    for n, waiter in enumerate(waiters):
        waiter.addCallback(lambda revision, n=n: woken.append(n))
    feed.record("registered", instance())
    assert woken == list(range(WAKE_BATCH))
    turns.next()
    assert woken == list(range(2 * WAKE_BATCH))
    turns.next()
    assert woken == list(range(2 * WAKE_BATCH + 1))
    assert turns.pending == []
    assert feed.wakeups == 2 * WAKE_BATCH + 1


class Turns:
    """Reactor turns, taken one at a time: what ``callLater(0, ...)`` asks for runs in the next."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, tuple[Any, ...]]] = []

    def callLater(self, delay: float, f: Any, *args: Any) -> None:
        assert delay == 0
        self.pending.append((f, args))

    def next(self) -> None:
        due, self.pending = self.pending, []
        for f, args in due:
            f(*args)


def test_a_waiter_cancelled_before_its_turn_is_skipped() -> None:
    """A waiter whose client left before its batch came round is not woken, and nothing fails."""
    turns = Turns()
    feed = ChangeFeed(clock=turns)  # type: ignore[arg-type]
    waiters = [feed.wait("web", 0) for _ in range(WAKE_BATCH + 1)]
    feed.record("registered", instance())
    last = waiters[-1]
    last.cancel()
    with pytest.raises(CancelledError):
        fired(last)
    turns.next()
    assert all(fired(w) == 1 for w in waiters[:-1])
    assert feed.wakeups == WAKE_BATCH
