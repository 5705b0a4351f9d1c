"""The lease manager, driven by a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from regdisc.lease import LeaseService
from regdisc.store import MemoryStore

from .conftest import fired
from .test_store import registration


def fill(store: MemoryStore, count: int, ttl: int = 10, now: float = 0.0) -> None:
    for n in range(count):
        fired(store.create(registration(f"i{n}", now=now, ttl=ttl), now))


def test_evicts_after_the_deadline_not_before() -> None:
    """An instance is evicted by the first run at or after its deadline."""
    clock, store = Clock(), MemoryStore()
    fill(store, 1, ttl=3)
    service = LeaseService(store, clock, interval=1)
    service.startService()
    clock.advance(2)
    assert len(store) == 1
    with capturedLogs() as events:
        clock.advance(1)
    assert len(store) == 0
    [evicted] = [e for e in events if e.get("event") == "instance.evicted"]
    assert (evicted["service"], evicted["instance_id"]) == ("web", "i0")
    [sweep] = [e for e in events if e.get("event") == "lease.sweep"]
    assert sweep["count"] == 1
    service.stopService()


def test_quiet_runs_log_nothing() -> None:
    """A run that evicts nothing logs nothing."""
    clock, store = Clock(), MemoryStore()
    fill(store, 5, ttl=100)
    service = LeaseService(store, clock, interval=1)
    service.startService()
    with capturedLogs() as events:
        clock.pump([1] * 10)
    assert events == []
    service.stopService()


def test_mass_expiry_is_evicted_in_slices() -> None:
    """A mass expiry is evicted a batch per reactor turn until none is left."""
    clock, store = Clock(), MemoryStore()
    fill(store, 2500, ttl=5)
    clock.advance(5)
    service = LeaseService(store, clock, interval=1, batch=1000)
    # A timer service runs once at start: the first slice, synchronously.
    service.startService()
    assert len(store) == 1500
    # Only the next slice: the timer schedules its next run when the sweep is done.
    assert [c.getTime() for c in clock.getDelayedCalls()] == [5]
    clock.advance(0)  # a Clock runs the later slices in one go
    assert len(store) == 0
    assert [c.getTime() for c in clock.getDelayedCalls()] == [6]
    service.stopService()


def test_runs_do_not_overlap_while_slicing() -> None:
    """While a sweep is still slicing, the timer does not start another."""
    clock, store = Clock(), MemoryStore()
    fill(store, 3000, ttl=5)
    clock.advance(5)
    calls: list[float] = []
    original = store.evict_expired

    def counting(now: float, limit: int) -> Any:
        calls.append(now)
        return original(now, limit)

    store.evict_expired = counting  # type: ignore[method-assign]
    service = LeaseService(store, clock, interval=1, batch=1000)
    service.startService()
    clock.advance(0)
    assert len(store) == 0
    # Three full slices, then nothing is due: one sweep.
    assert calls == [5, 5, 5]
    clock.advance(1)
    assert calls == [5, 5, 5, 6]
    service.stopService()


def test_a_failing_sweep_is_logged_and_the_timer_goes_on() -> None:
    """An exception in a sweep is logged, and the next run still happens."""
    clock, store = Clock(), MemoryStore()
    fill(store, 1, ttl=3)
    failures = [RuntimeError("boom")]
    original = store.evict_expired

    def flaky(now: float, limit: int) -> Any:
        if failures:
            raise failures.pop()
        return original(now, limit)

    store.evict_expired = flaky  # type: ignore[method-assign]
    service = LeaseService(store, clock, interval=1)
    with capturedLogs() as events:
        service.startService()
        clock.advance(1)
    assert [e.get("event") for e in events] == ["lease.sweep_failed"]
    clock.pump([1, 1, 1])
    assert len(store) == 0


def test_stop_leaves_no_timer_behind() -> None:
    """Stopping the service cancels its timer."""
    clock, store = Clock(), MemoryStore()
    service = LeaseService(store, clock, interval=1)
    service.startService()
    assert clock.getDelayedCalls()
    fired(service.stopService())
    assert clock.getDelayedCalls() == []


def test_stop_during_a_sliced_sweep_ends_it() -> None:
    """A sweep still slicing when the service stops ends after its current slice."""
    clock, store = Clock(), MemoryStore()
    fill(store, 3000, ttl=5)
    clock.advance(5)
    service = LeaseService(store, clock, interval=1, batch=1000)
    service.startService()
    stopped = service.stopService()
    assert not stopped.called  # it waits for the sweep under way
    clock.advance(0)
    fired(stopped)
    assert clock.getDelayedCalls() == []
    assert len(store) == 1000  # two slices ran, the third did not


def test_renewals_leave_no_work_behind() -> None:
    """Renewed leases cost the lease manager one look per lease end, not one per renewal."""
    clock, store = Clock(), MemoryStore()
    fill(store, 100, ttl=10)
    held = [fired(store.get("web", f"i{n}", 0)) for n in range(100)]
    for second in range(1, 10):
        clock.advance(1)
        for current in held:
            fired(store.renew(current, clock.seconds()))
    assert len(store._deadlines) == 100  # one entry per registration, renewals or not
    clock.advance(1)  # t=10: the first deadlines come due, all renewed meanwhile
    assert store.evict_expired(clock.seconds(), 1000) == []
    assert len(store) == 100 and len(store._deadlines) == 100
    assert not store.due(clock.seconds())


def test_stale_deadlines_count_toward_a_slice() -> None:
    """A slice looks at ``batch`` deadlines at most, evicted or not, and says more are due."""
    store = MemoryStore()
    fill(store, 10, ttl=5)
    for n in range(10):
        fired(store.delete(fired(store.get("web", f"i{n}", 0))))
    fill(store, 3, ttl=5, now=0.5)
    assert store.evict_expired(5.5, 4) == []  # four stale entries looked at
    assert store.due(5.5)
    assert len(store.evict_expired(5.5, 100)) == 3
    assert not store.due(5.5)
