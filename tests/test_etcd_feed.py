"""The change feed over the etcd store: every node agrees on revisions, and follows changes made elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from .etcd_harness import etcd_cluster  # noqa: F401 (a fixture)
from .harness import LocalPKI, client_for, start_daemon
from .test_etcd_nodes import loaded, until
from .test_stream_live import Finished, Reader


@pytest_twisted.ensureDeferred
async def test_streams_and_blocking_queries_follow_changes_made_on_another_node(
    tmp_path: Path, etcd_cluster: Callable[..., Any]  # noqa: F811
) -> None:
    """A change through node A wakes a blocking query on B, and both nodes' streams
    carry it under the same etcd revision."""
    cluster = etcd_cluster(size=1)
    local = LocalPKI.create(tmp_path / "pki")
    settings = {"REGDISC_STORE": "etcd", "REGDISC_ETCD_ENDPOINTS": ",".join(cluster.endpoints)}
    a = await start_daemon(local, reactor, **settings)
    b = await start_daemon(local, reactor, **settings)
    tls = local.client_tls(local.issue("alice"))
    on_a, on_b = client_for(a, tls, reactor), client_for(b, tls, reactor)
    http = HTTPClient(
        Agent(reactor, contextFactory=tls.policy(), pool=HTTPConnectionPool(reactor, persistent=False))
    )
    collecting: list[Deferred] = []

    async def open_stream(url: str) -> Reader:
        response = await http.get(url + "/registry/events?service=web", unbuffered=True)
        assert response.code == 200
        reader = Reader()
        collecting.append(treq.collect(response, reader).addErrback(lambda f: f.trap(Finished)))
        return reader

    try:
        await until(lambda: loaded(on_a))
        await until(lambda: loaded(on_b))
        stream_a, stream_b = await open_stream(a.url), await open_stream(b.url)
        await stream_a.first(1)
        await stream_b.first(1)  # the ": revision R" comments: both streams are live

        before = await on_b.watch_instances("web", wait=None)
        held = on_b.watch_instances("web", index=before.index, wait=30)
        started = reactor.seconds()
        registered = await on_a.register("web", "10.0.0.1", 8080, instance_id="web-1")
        woken = await held
        assert reactor.seconds() - started < 2.0
        assert [i.id for i in woken.instances] == ["web-1"] and woken.index > before.index

        await on_a.deregister("web", "web-1", registered.token)
        events_a = (await stream_a.first(3))[1:]
        events_b = (await stream_b.first(3))[1:]
        seen_a = [(e.id, e.event) for e in events_a]
        assert [kind for _, kind in seen_a] == ["registered", "deregistered"]
        assert seen_a == [(e.id, e.event) for e in events_b]
        assert seen_a[0][0] == woken.index
    finally:
        await on_a.close()
        await on_b.close()
        await a.stop()
        await b.stop()
        for collected in collecting:
            collected.addErrback(lambda f: None)
