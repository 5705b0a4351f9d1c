"""RegistryClient.watch_instances: blocking queries against a real daemon over mutual TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater

from regdisc.client import InstanceList, RegistryClient

from .harness import Daemon, LocalPKI, client_for, start_daemon

PATIENCE = 5.0
"""The longest any answer is awaited, in seconds."""


@pytest.fixture
def local_pki(tmp_path: Path) -> LocalPKI:
    return LocalPKI.create(tmp_path / "pki")


@pytest_twisted.async_yield_fixture
async def daemon(local_pki: LocalPKI) -> Any:
    running = await start_daemon(local_pki, reactor)
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture
async def reader(daemon: Daemon, local_pki: LocalPKI) -> Any:
    # A short time-out: the held queries below last longer, so they prove it stretches.
    registry = client_for(daemon, local_pki.client_tls(local_pki.issue("reader")), reactor, timeout=0.5)
    yield registry
    await registry.close()


@pytest_twisted.async_yield_fixture
async def registrar(daemon: Daemon, local_pki: LocalPKI) -> Any:
    registry = client_for(daemon, local_pki.client_tls(local_pki.issue("registrar")), reactor)
    yield registry
    await registry.close()


async def within(d: Deferred, seconds: float = PATIENCE) -> Any:
    """The result of ``d``, or a TimeoutError after ``seconds``."""
    return await d.addTimeout(seconds, reactor)


def ids(answer: InstanceList) -> list[str]:
    return sorted(i.id for i in answer.instances)


@pytest_twisted.ensureDeferred
async def test_plain_read_answers_the_index(reader: RegistryClient, registrar: RegistryClient) -> None:
    """wait=None reads at once: the list and the service's index, 0 for a service never changed."""
    assert await within(reader.watch_instances("web", wait=None)) == InstanceList([], 0)
    await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
    answer = await within(reader.watch_instances("web", wait=None))
    assert ids(answer) == ["web-1"] and answer.index > 0


@pytest_twisted.ensureDeferred
async def test_blocks_until_a_change(reader: RegistryClient, registrar: RegistryClient) -> None:
    """A query at the current index is held until another client registers, then answers the new list."""
    await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
    current = await within(reader.watch_instances("web", wait=None))
    started = reactor.seconds()
    answer = reader.watch_instances("web", index=current.index, wait=30)
    await deferLater(reactor, 0.3, lambda: None)
    assert not answer.called, "answered without a change"
    await registrar.register("web", "10.0.0.2", 8080, instance_id="web-2", ttl=60)
    changed = await within(answer)
    elapsed = reactor.seconds() - started
    assert ids(changed) == ["web-1", "web-2"] and changed.index > current.index
    assert 0.3 <= elapsed < 2.0  # the change, not the 30 s wait, ended it


@pytest_twisted.ensureDeferred
async def test_wait_runs_out_with_the_same_answer(reader: RegistryClient, registrar: RegistryClient) -> None:
    """With no change, a 1 s query answers after about 1 s (plus its jitter) the same list and index."""
    await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
    current = await within(reader.watch_instances("web", wait=None))
    started = reactor.seconds()
    # The reader's own time-out is 0.5 s: the request's must cover the wait.
    unchanged = await within(reader.watch_instances("web", index=current.index, wait=1))
    elapsed = reactor.seconds() - started
    assert unchanged == current
    assert 1.0 <= elapsed < 1.0 * 17 / 16 + 1.0


@pytest_twisted.ensureDeferred
async def test_fractional_waits_are_sent_in_milliseconds(reader: RegistryClient) -> None:
    """A wait of 0.3 s holds about 0.3 s, on a service that never changed (index 0)."""
    started = reactor.seconds()
    assert await within(reader.watch_instances("web", index=0, wait=0.3)) == InstanceList([], 0)
    assert 0.3 <= reactor.seconds() - started < 1.3


@pytest_twisted.ensureDeferred
async def test_index_zero_answers_at_once_once_the_service_changed(
    reader: RegistryClient, registrar: RegistryClient
) -> None:
    """index=0 answers at once when the service ever changed."""
    await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
    started = reactor.seconds()
    answer = await within(reader.watch_instances("web", wait=30))
    assert ids(answer) == ["web-1"] and answer.index > 0
    assert reactor.seconds() - started < 2.0


@pytest_twisted.ensureDeferred
async def test_index_ahead_of_the_registry_answers_at_once(
    reader: RegistryClient, registrar: RegistryClient
) -> None:
    """An index the registry has not reached (it restarted) answers at once, with the lower index."""
    await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60)
    started = reactor.seconds()
    answer = await within(reader.watch_instances("web", index=10**6, wait=30))
    assert ids(answer) == ["web-1"] and 0 < answer.index < 10**6
    assert reactor.seconds() - started < 2.0


@pytest_twisted.ensureDeferred
async def test_filters_apply_to_blocking_queries(reader: RegistryClient, registrar: RegistryClient) -> None:
    """status, tags and metadata filter the answer of a blocking query as of a plain one."""
    await registrar.register("web", "10.0.0.1", 8080, instance_id="web-1", ttl=60, tags=["blue"])
    current = await within(reader.watch_instances("web", wait=None, tags=["green"]))
    assert current.instances == []
    answer = reader.watch_instances("web", index=current.index, wait=30, tags=["green"], status="up")
    await registrar.register("web", "10.0.0.2", 8080, instance_id="web-2", ttl=60, tags=["green"])
    assert ids(await within(answer)) == ["web-2"]


@pytest_twisted.ensureDeferred
async def test_cancelling_a_held_query_fails_it_at_once(reader: RegistryClient) -> None:
    """Cancelling a held query fails it with CancelledError at once; the client still works after."""
    answer = reader.watch_instances("web", index=0, wait=30)
    await deferLater(reactor, 0.2, lambda: None)
    assert not answer.called
    answer.cancel()
    with pytest.raises(CancelledError):
        await answer
    assert await within(reader.watch_instances("web", wait=None)) == InstanceList([], 0)


@pytest_twisted.ensureDeferred
async def test_bad_arguments_are_refused_before_any_request(reader: RegistryClient) -> None:
    """A negative index or wait is a ValueError, raised at once."""
    for kwargs in ({"index": -1}, {"wait": -1.0}, {"wait": float("nan")}):
        with pytest.raises(ValueError):
            reader.watch_instances("web", **kwargs)
