"""Garbage collection of the young generations on a timer.

A registry replaces objects one for one: each renewal makes a new `Instance`
and `Registration` and frees the ones they replace. CPython starts a
collection when allocations outnumber deallocations by 700, which such a
workload never does, so the new objects pile up in the young generations
until something else trips the count; the collection that follows then
stalls the reactor for as long as they took to pile up (measured at
1,000,000 instances: 0.3 to 4 s). Collecting the young generations a few
times a second keeps each collection to what those moments allocated.
"""

from __future__ import annotations

import gc
from typing import Callable

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime

INTERVAL = 0.25
"""Seconds between collections: each then takes a few milliseconds at full load."""


class YoungCollector(TimerService):
    """Every ``interval`` seconds, collect generations 0 and 1 (never the oldest)."""

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = INTERVAL,
        collect: Callable[[int], int] = gc.collect,
    ) -> None:
        super().__init__(interval, collect, 1)
        self.clock = clock
