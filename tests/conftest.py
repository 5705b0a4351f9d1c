"""Shared fixtures: a clock, a store, the registry and its API over StubTreq."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from regdisc.registry import Registry
from regdisc.store import IStore, MemoryStore
from regdisc.validation import TTLBounds

settings.register_profile("regdisc", deadline=None, derandomize=True, max_examples=200)
settings.load_profile("regdisc")

START = 1_800_000_000.0
"""The test clock's start: a fixed moment, so timestamps in answers are predictable."""

BOUNDS = TTLBounds(default=30, minimum=1, maximum=3600)
TOKEN_TTL = 3600


def fired(d: Deferred) -> Any:
    """The result of a Deferred that has already fired; raise its failure if it failed."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture(params=["memory"])
def store(request: pytest.FixtureRequest) -> IStore:
    """A fresh, empty store of each kind the API must work over; the kind names the test id.

    A store whose operations really wait (on network I/O) fires its Deferreds from
    the global reactor, so the tests over it must ``await``, never `fired`. Its time
    stays the registry's `clock`: only its I/O goes through the reactor.
    Modules that test one kind's internals pin it with
    ``pytestmark = pytest.mark.parametrize("store", ["memory"], indirect=True)``.
    """
    if request.param == "memory":
        return MemoryStore()
    raise ValueError(f"no store of kind {request.param!r}")


@pytest.fixture
def registry(store: IStore, clock: Clock) -> Registry:
    return Registry(store, clock, TOKEN_TTL)
