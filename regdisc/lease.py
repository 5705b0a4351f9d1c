"""The lease manager: a timer service that evicts instances whose lease ended."""

from __future__ import annotations

from typing import Protocol

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .model import Instance


class Evictor(Protocol):
    """A store that can drop registrations whose lease ended."""

    def evict_expired(self, now: float, limit: int) -> list[Instance]: ...

    def due(self, now: float) -> bool: ...


class LeaseService(TimerService):
    """Every ``interval`` seconds, evict what has expired, ``batch`` deadlines at a time.

    A sweep with more deadlines due than one batch goes on in later reactor
    turns, so a mass expiry never stalls the reactor for long (250 deadlines
    take about 6 ms); the timer waits for the whole sweep, so sweeps never
    overlap.
    """

    log = Logger()

    def __init__(
        self, store: Evictor, clock: IReactorTime, interval: float, batch: int = 250
    ) -> None:
        super().__init__(interval, self.sweep)
        self.clock = clock
        self._store = store
        self._batch = batch
        self._stopping = False

    def startService(self) -> None:
        self._stopping = False
        super().startService()

    def stopService(self) -> Deferred:
        # TimerService marks itself stopped only once the sweep under way has
        # finished; a sliced sweep must know at once, to end early.
        self._stopping = True
        return super().stopService()

    def sweep(self) -> Deferred | None:
        """Evict one batch now and schedule the next, if any; fire when all are done."""
        done: Deferred = Deferred()
        self._slice(0, done)
        return done

    def _slice(self, evicted_so_far: int, done: Deferred) -> None:
        # A failure must not escape: it would stop the timer for good.
        try:
            evicted = self._store.evict_expired(self.clock.seconds(), self._batch)
        except Exception:
            self.log.failure("lease sweep failed", event="lease.sweep_failed")
            self._finish(evicted_so_far, done)
            return
        for instance in evicted:
            self.log.info(
                "evicted {service}/{instance_id}: lease expired",
                event="instance.evicted",
                service=instance.service,
                instance_id=instance.id,
                host=instance.host,
                port=instance.port,
                expired_at=instance.expires_at,
            )
        total = evicted_so_far + len(evicted)
        if self._stopping or not self._store.due(self.clock.seconds()):
            self._finish(total, done)
        else:
            self.clock.callLater(0, self._slice, total, done)

    def _finish(self, total: int, done: Deferred) -> None:
        if total:
            self.log.info(
                "lease sweep evicted {count} instances", event="lease.sweep", count=total
            )
        done.callback(None)
