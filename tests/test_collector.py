"""The young-generation collector: a timer on the injected clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from regdisc.collector import INTERVAL, YoungCollector

from .conftest import fired


def test_collects_the_young_generations_every_interval() -> None:
    """It collects generations 0 and 1 on start, then once per interval, and stops cleanly."""
    clock = Clock()
    asked: list[int] = []
    collector = YoungCollector(clock, collect=lambda generation: asked.append(generation) or 0)
    collector.startService()
    assert asked == [1]
    clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    assert asked == [1, 1, 1]
    fired(collector.stopService())
    assert clock.getDelayedCalls() == []
