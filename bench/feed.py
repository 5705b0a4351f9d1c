"""A benchmark of blocking queries against a real daemon: held queries, fan-out, isolation.

Run from the checkout::

    python -m bench.feed [--watchers 10000] [--fanout 1000] [--others 1000] [--quick]

It makes a fresh PKI in a temporary folder, starts ``twistd -n --pidfile=
regdisc`` as a subprocess on a free loopback port, and drives it from this
process over mutual TLS, with a small HTTP/1.1 client of its own on Twisted's
TLS so that it can stamp each answer the moment it is decrypted. With two or
more CPUs, the daemon runs on the first and this load generator on the second.

Three phases, each bounded in time:

1. *Held queries*: ``--watchers`` blocking queries (``wait=600s``, ``index`` the
   service's current one, read by a plain GET on the same connection first)
   spread over ``watchers / 10`` services. Once all are held: the daemon's RSS
   before and after, per held query, and its CPU over an idle window.
2. *Fan-out*: ``--fanout`` watchers of the service ``fan``; one registration in
   ``fan`` through another connection; for each watcher, the time from just
   before the registration was written to its answer (median, p90, p99, max).
3. *Isolation*: ``--others`` watchers, one per other service, held while 100
   changes are made to ``fan``; how many of them were answered (must be 0).

Output: the machine, a table, then one JSON line per figure::

    {"bench": "feed", "figure": "fanout_latency_p99", "value": 41.2, "unit": "ms"}

No timing is asserted. The exit status is 1 when a watcher of another service
was answered (a correctness property), 2 when the benchmark could not do what
it was asked (the daemon did not start, connections failed, a phase ran out of
time), else 0. The daemon is stopped and every connection closed at the end,
whatever happened.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import attrs
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from regdisc.client.tls import ClientTLS

# The daemon, the machine and the PKI every benchmark shares.
from .harness import (
    BenchError,
    Material,
    PartReport,
    ServerProcess,
    cpu_placement,
    machine,
    make_material,
    raise_nofile,
    start_registry,
)
from .http_load import parse_chunked

WAIT = 600
"""The ``wait`` of every held query, in seconds: the longest the daemon grants."""

CHANGES = 100
"""How many changes are made to ``fan`` while the other services' watchers hold."""

CONCURRENCY = 200
"""Connections being set up at once: more and handshakes queue past their timeouts."""

STEP_TIMEOUT = 30.0
"""Seconds one connection may take to connect, shake hands and answer a first GET."""

_PER_SERVICE = 10
"""Held queries per service in the first phase."""


# Figures.

FIGURES: dict[str, tuple[str, str]] = {
    # Phase 1: held queries.
    "held_queries": ("queries", "blocking queries held at once, one connection each"),
    "held_services": ("services", "services they watch"),
    "held_setup_time": ("s", "to connect, shake hands and hold them all, {concurrency} at a time"),
    "held_setup_rate": ("conn/s", "mutual-TLS connections set up per second"),
    "held_setup_failures": ("connections", "setups that failed"),
    "server_open_files_held": ("fds", "the daemon's open file descriptors while held"),
    "server_rss_before": ("MiB", "daemon RSS before the held queries"),
    "server_rss_held": ("MiB", "daemon RSS with all held"),
    "server_rss_per_held_query": (
        "KiB", "RSS growth per held query (connection, TLS, request, waiter)"
    ),
    "server_idle_cpu_held": (
        "% CPU", "daemon CPU over {window:g} s, all held, nothing changing (resolution {step:g}%)"
    ),
    "load_rss_held": ("MiB", "load generator RSS with all held"),
    "server_rss_after_close": (
        "MiB", "daemon RSS once they are closed (kept by the allocator for reuse)"
    ),
    # Phase 2: fan-out.
    "fanout_watchers": ("watchers", "held on the one service fan"),
    "fanout_answered": ("watchers", "answered after the registration"),
    "fanout_latency_min": ("ms", "min from writing the registration to a watcher's answer"),
    "fanout_latency_p50": ("ms", "median of the same"),
    "fanout_latency_p90": ("ms", "90th percentile of the same"),
    "fanout_latency_p99": ("ms", "99th percentile of the same (aim: under 100)"),
    "fanout_latency_max": ("ms", "max of the same"),
    "fanout_server_cpu": (
        "ms", "daemon CPU from the registration to the last answer (resolution {step:g} ms)"
    ),
    # Phase 3: isolation.
    "isolation_watchers": ("watchers", "held on other services, one each"),
    "isolation_changes": ("changes", "registrations and updates made to fan meanwhile"),
    "cross_service_wakeups": ("answers", "watchers of other services answered (must be 0)"),
}
"""Every figure, by name: its unit and what it means (a format string of the run's sizes)."""


class Report(PartReport):
    """The figures of `FIGURES` measured so far, the problems met, and the machine."""

    def figure(self, name: str, value: float | int, **context: object) -> None:
        """Record the figure ``name`` of `FIGURES`; ``context`` fills in its meaning."""
        unit, meaning = FIGURES[name]
        self.add(name, value, unit, meaning.format(**context))

    def heading(self) -> list[str]:
        m = self.machine
        return [
            f"regdisc feed benchmark on {m['cpu_model']} ({m['nproc']} CPUs), "
            f"Python {m['python']}, Twisted {m['twisted']}, {m['openssl']}",
            f"daemon pinned to CPU {m['server_cpu']}, load generator to CPU {m['load_cpu']}; "
            f"open files limit {m['nofile']}",
        ]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with ``fraction`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def load_rss_bytes() -> int:
    """This (load) process's resident memory, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# HTTP/1.1 over TLS, one request at a time per connection.


@attrs.frozen
class Answer:
    """A response: status, headers (lower-case names), body, and when it was complete."""

    status: int
    headers: dict[str, str]
    body: bytes
    arrived: float  # time.perf_counter()

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(
    buffer: bytes | bytearray,
) -> tuple[int, dict[str, str], bytes, int] | None:
    """The first whole response in ``buffer`` (status, headers, body, bytes used), or None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    position = end + 4
    if status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", position
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunked = parse_chunked(buffer, status, position)
        if chunked is None:
            return None
        _, body, end = chunked
        return status, headers, body, end
    length = int(headers.get("content-length", "0"))
    if len(buffer) < position + length:
        return None
    return status, headers, bytes(buffer[position:position + length]), position + length


class HTTPConnection(Protocol):
    """A keep-alive HTTP/1.1 connection that stamps each answer as its last byte is decrypted."""

    def __init__(self, live: set[HTTPConnection]) -> None:
        self._live = live
        self._buffer = bytearray()
        self._pending: Deferred[Answer] | None = None
        self.closed = False

    def connectionMade(self) -> None:
        self._live.add(self)

    def request(
        self, method: str, target: str, body: object = None, token: str | None = None
    ) -> Deferred[Answer]:
        """Send a request; fires with its `Answer`, or fails if the connection is lost first."""
        if self._pending is not None:
            raise BenchError("one request at a time on a connection")
        if self.closed:
            raise BenchError("the connection is closed")
        lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        pending: Deferred[Answer] = Deferred(self._given_up)
        self._pending = pending
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        return pending

    def _given_up(self, pending: Deferred[Answer]) -> None:
        # A request given up on (timed out) leaves the connection out of step: drop it.
        if self._pending is pending:
            self._pending = None
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        arrived = time.perf_counter()
        self._buffer += data
        while self._buffer:
            parsed = parse_response(self._buffer)
            if parsed is None:
                return
            status, headers, body, used = parsed
            del self._buffer[:used]
            pending, self._pending = self._pending, None
            if pending is None:  # an answer nobody asked for
                self.abort()
                return
            pending.callback(Answer(status, headers, body, arrived))

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.closed = True
        self._live.discard(self)
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.errback(reason)


class Connector:
    """Opens mutual-TLS connections to the daemon, and keeps the live ones to close at the end."""

    def __init__(self, reactor: Any, port: int, material: Material) -> None:
        tls = ClientTLS.from_files(material.client_cert, material.client_key, material.ca)
        # One creator for all: the SSL context, with our key and the CA, is made once.
        creator = tls.policy().creatorForNetloc(b"localhost", port)
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=int(STEP_TIMEOUT))
        self._endpoint = wrapClientTLS(creator, tcp)
        self._reactor = reactor
        self.live: set[HTTPConnection] = set()

    def open(self) -> Deferred[HTTPConnection]:
        d: Deferred[HTTPConnection] = connectProtocol(self._endpoint, HTTPConnection(self.live))
        return d

    async def ask(
        self, connection: HTTPConnection, method: str, target: str, body: object = None,
        token: str | None = None, timeout: float = STEP_TIMEOUT,
    ) -> Answer:
        """One request and its answer, within ``timeout`` seconds."""
        answer = connection.request(method, target, body, token)
        return await answer.addTimeout(timeout, self._reactor)

    def close_all(self) -> None:
        for connection in list(self.live):
            connection.abort()


def instances_path(service: str) -> str:
    return f"/registry/services/{service}/instances"


# Watchers.


@attrs.define(eq=False)
class Watcher:
    """One held blocking query on its own connection, and what became of it."""

    service: str
    connection: HTTPConnection
    index: int
    answered_at: float | None = None
    status: int | None = None
    lost: bool = False
    done: Deferred[None] = attrs.Factory(Deferred)

    def hold(self, wait: int) -> None:
        target = f"{instances_path(self.service)}?index={self.index}&wait={wait}s"
        self.connection.request("GET", target).addCallbacks(self._answered, self._lost)

    def _answered(self, answer: Answer) -> None:
        self.answered_at, self.status = answer.arrived, answer.status
        self.done.callback(None)

    def _lost(self, failure: Failure) -> None:
        self.lost = True
        self.done.callback(None)


async def open_watchers(
    reactor: Any, connector: Connector, services: Sequence[str], concurrency: int
) -> tuple[list[Watcher], Counter[str]]:
    """Hold one blocking query per entry of ``services``, ``concurrency`` setups at a time.

    A setup is done once the first, plain GET on the new connection is answered
    (the handshake is complete and the daemon serves it); its index is then used
    for the blocking query. Returns the watchers and the failures by kind.
    """
    semaphore = DeferredSemaphore(concurrency)

    async def open_one(service: str) -> Watcher:
        connection = await connector.open().addTimeout(STEP_TIMEOUT, reactor)
        try:
            first = await connector.ask(connection, "GET", instances_path(service))
            if first.status != 200:
                raise BenchError(f"GET {service} answered {first.status}")
            index = int(first.headers["x-regdisc-index"])
        except BaseException:
            connection.abort()
            raise
        watcher = Watcher(service, connection, index)
        watcher.hold(WAIT)
        return watcher

    def start(service: str) -> Deferred[Watcher]:
        return Deferred.fromCoroutine(open_one(service))

    results = await DeferredList(
        [semaphore.run(start, service) for service in services], consumeErrors=True
    )
    watchers = [value for ok, value in results if ok]
    failures = Counter(_kind(value) for ok, value in results if not ok)
    return watchers, failures


def _kind(failure: Failure) -> str:
    text = str(failure.value).splitlines()[0][:120] if str(failure.value) else ""
    return f"{failure.type.__name__}: {text}" if text else failure.type.__name__


def close(watchers: Sequence[Watcher]) -> None:
    for watcher in watchers:
        watcher.connection.abort()


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def settle(
    reactor: Any, daemon: ServerProcess, window: float = 0.5, busy: float = 0.05, limit: float = 30.0
) -> bool:
    """Wait until the daemon uses under ``busy`` of a CPU over ``window`` seconds.

    Returns False if it has not gone quiet within ``limit`` seconds.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = daemon.cpu_seconds()
        await sleep(reactor, window)
        if (daemon.cpu_seconds() - before) / window <= busy:
            return True
    return False


# The phases.


@attrs.frozen
class Sizes:
    """How big each phase is, and how long the whole may take."""

    watchers: int
    fanout: int
    others: int
    idle_window: float
    timeout: float
    concurrency: int


def _note_failures(report: Report, what: str, failures: Counter[str]) -> None:
    if failures:
        kinds = "; ".join(f"{count} x {kind}" for kind, count in failures.most_common(5))
        report.problems.append(f"{what}: {sum(failures.values())} connections failed ({kinds})")


async def held_queries(
    reactor: Any, connector: Connector, daemon: ServerProcess, sizes: Sizes, report: Report
) -> None:
    """Phase 1: many held queries; the daemon's memory and idle CPU while they are held."""
    services = max(1, sizes.watchers // _PER_SERVICE)
    names = [f"held-{i % services}" for i in range(sizes.watchers)]
    rss_before = daemon.rss_bytes()
    started = time.perf_counter()
    watchers, failures = await open_watchers(reactor, connector, names, sizes.concurrency)
    setup = time.perf_counter() - started
    try:
        _note_failures(report, "held queries", failures)
        if not await settle(reactor, daemon):
            report.problems.append("held queries: the daemon did not go quiet within 30 s")
        answered = sum(w.answered_at is not None for w in watchers)
        lost = sum(w.lost for w in watchers)
        held = len(watchers) - answered - lost
        if answered or lost:
            report.problems.append(
                f"held queries: {answered} answered and {lost} lost before any change"
            )
        rss_held = daemon.rss_bytes()
        before = daemon.cpu_seconds()
        await sleep(reactor, sizes.idle_window)
        idle = (daemon.cpu_seconds() - before) / sizes.idle_window
        report.figure("held_queries", held)
        report.figure("held_services", services)
        report.figure("held_setup_time", setup, concurrency=sizes.concurrency)
        report.figure("held_setup_rate", len(watchers) / max(setup, 1e-9))
        report.figure("held_setup_failures", sum(failures.values()))
        report.figure("server_open_files_held", daemon.open_files())
        report.figure("server_rss_before", rss_before / 2**20)
        report.figure("server_rss_held", rss_held / 2**20)
        report.figure("server_rss_per_held_query", (rss_held - rss_before) / max(1, held) / 1024)
        step = 100 / (daemon.ticks * sizes.idle_window)
        report.figure("server_idle_cpu_held", 100 * idle, window=sizes.idle_window, step=step)
        report.figure("load_rss_held", load_rss_bytes() / 2**20)
    finally:
        close(watchers)
    await settle(reactor, daemon)
    report.figure("server_rss_after_close", daemon.rss_bytes() / 2**20)


async def fan_out(
    reactor: Any, connector: Connector, daemon: ServerProcess, registrar: HTTPConnection,
    sizes: Sizes, report: Report,
) -> str:
    """Phase 2: watchers of ``fan`` woken by one registration; returns the instance's token."""
    names = ["fan"] * sizes.fanout
    watchers, failures = await open_watchers(reactor, connector, names, sizes.concurrency)
    try:
        _note_failures(report, "fan-out", failures)
        await settle(reactor, daemon)
        early = [w for w in watchers if w.answered_at is not None or w.lost]
        if early:
            report.problems.append(
                f"fan-out: {len(early)} watchers answered or lost before the change"
            )
        waiting = [w for w in watchers if w not in early]
        body = {"id": "fan-0", "host": "10.0.0.1", "port": 8080, "ttl": WAIT}
        # A full collection in this process takes a few hundred milliseconds
        # after the first phase; one during the timing would be counted as the
        # daemon's latency. So collect now and not again until all are answered.
        gc.collect()
        gc.disable()
        try:
            cpu_before = daemon.cpu_seconds()
            sent = time.perf_counter()
            registered = await connector.ask(registrar, "POST", instances_path("fan"), body)
            if registered.status != 201:
                raise BenchError(
                    f"registering in fan answered {registered.status}: {registered.body[:200]!r}"
                )
            try:
                await DeferredList([w.done for w in waiting]).addTimeout(STEP_TIMEOUT, reactor)
            except DeferredTimeout:
                report.problems.append(
                    f"fan-out: not every watcher was answered within {STEP_TIMEOUT:g} s"
                )
            server_cpu = daemon.cpu_seconds() - cpu_before
        finally:
            gc.enable()
        latencies = [1000 * (w.answered_at - sent) for w in waiting if w.answered_at is not None]
        wrong = sum(w.status != 200 for w in waiting if w.answered_at is not None)
        if wrong or len(latencies) < len(waiting):
            report.problems.append(
                f"fan-out: {len(waiting) - len(latencies)} watchers not answered, "
                f"{wrong} answered other than 200"
            )
        if not latencies:
            raise BenchError("no watcher was answered")
        report.figure("fanout_watchers", len(waiting))
        report.figure("fanout_answered", len(latencies))
        report.figure("fanout_latency_min", min(latencies))
        report.figure("fanout_latency_p50", percentile(latencies, 0.50))
        report.figure("fanout_latency_p90", percentile(latencies, 0.90))
        report.figure("fanout_latency_p99", percentile(latencies, 0.99))
        report.figure("fanout_latency_max", max(latencies))
        report.figure("fanout_server_cpu", 1000 * server_cpu, step=1000 / daemon.ticks)
        return str(registered.json()["data"]["token"])
    finally:
        close(watchers)
        await settle(reactor, daemon)


async def isolation(
    reactor: Any, connector: Connector, daemon: ServerProcess, registrar: HTTPConnection,
    token: str, sizes: Sizes, report: Report,
) -> None:
    """Phase 3: changes to ``fan`` answer none of the watchers of other services."""
    names = [f"other-{i}" for i in range(sizes.others)]
    watchers, failures = await open_watchers(reactor, connector, names, sizes.concurrency)
    try:
        _note_failures(report, "isolation", failures)
        await settle(reactor, daemon)
        early = sum(w.answered_at is not None or w.lost for w in watchers)
        if early:
            report.problems.append(
                f"isolation: {early} watchers answered or lost before the changes"
            )
        made = 0
        for i in range(1, CHANGES + 1):
            if i % 2:  # a registration of a new instance
                body = {"id": f"fan-{i}", "host": "10.0.0.2", "port": 8000 + i, "ttl": WAIT}
                answer = await connector.ask(registrar, "POST", instances_path("fan"), body)
            else:  # an update of the first one
                target = instances_path("fan") + "/fan-0"
                answer = await connector.ask(registrar, "PUT", target, {"port": 9000 + i}, token)
            made += answer.status in (200, 201)
        await sleep(reactor, 1.0)  # time for a wrongly woken watcher's answer to arrive
        await settle(reactor, daemon)
        answered = sum(w.answered_at is not None for w in watchers)
        lost = sum(w.lost for w in watchers)
        if made != CHANGES:
            report.problems.append(f"isolation: only {made} of {CHANGES} changes to fan succeeded")
        if lost:
            report.problems.append(
                f"isolation: {lost} watchers of other services lost their connection"
            )
        report.figure("isolation_watchers", len(watchers))
        report.figure("isolation_changes", made)
        report.figure("cross_service_wakeups", answered)
    finally:
        close(watchers)


async def run(
    reactor: Any, daemon: ServerProcess, material: Material, sizes: Sizes, report: Report,
    phase: list[str],
) -> None:
    """The three phases in turn, naming the current one in ``phase[0]``."""
    connector = Connector(reactor, daemon.port, material)
    try:
        phase[0] = "starting the daemon"
        report.machine["server_nofile"] = daemon.nofile_limit()
        phase[0] = "held queries"
        await held_queries(reactor, connector, daemon, sizes, report)
        phase[0] = "fan-out"
        registrar = await connector.open().addTimeout(STEP_TIMEOUT, reactor)
        # The handshake is done before the timing starts.
        await connector.ask(registrar, "GET", "/registry/services")
        token = await fan_out(reactor, connector, daemon, registrar, sizes, report)
        phase[0] = "isolation"
        await isolation(reactor, connector, daemon, registrar, token, sizes, report)
        phase[0] = "done"
    finally:
        connector.close_all()
        errors = [
            line for line in daemon.log_lines()
            if '"level":"error"' in line or '"level":"critical"' in line
        ]
        if errors:
            report.problems.append(
                f"the daemon logged {len(errors)} errors; the first: {errors[0][:300]}"
            )


def drive(daemon: ServerProcess, material: Material, sizes: Sizes, report: Report) -> None:
    """Run the phases on the reactor, within ``sizes.timeout`` seconds in all."""
    from twisted.internet import reactor

    phase = ["starting"]
    outcome: list[Failure | None] = []
    expired: list[bool] = []

    def finished(result: object) -> None:
        outcome.append(result if isinstance(result, Failure) else None)
        if reactor.running:
            reactor.stop()

    def go() -> None:
        d = Deferred.fromCoroutine(run(reactor, daemon, material, sizes, report, phase))

        def expire() -> None:
            expired.append(True)
            d.cancel()  # unwinds the phases through their finally blocks

        timer = reactor.callLater(sizes.timeout, expire)
        d.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        d.addBoth(finished)

    def hard_stop() -> None:  # should the cancellation not unwind in time
        if not outcome:
            outcome.append(Failure(BenchError("the phases did not unwind after the timeout")))
            reactor.stop()

    reactor.callWhenRunning(go)
    reactor.callLater(sizes.timeout + 20, hard_stop)
    reactor.run()
    if not outcome:
        raise BenchError(f"interrupted during {phase[0]}")
    failure = outcome[0]
    if expired:
        raise BenchError(f"ran out of time ({sizes.timeout:g} s in all) during {phase[0]}")
    if failure is not None:
        if failure.check(BenchError):
            raise BenchError(f"{phase[0]}: {failure.value}")
        raise BenchError(f"{phase[0]}: {failure.getTraceback()}")


def options(argv: Sequence[str]) -> Sizes:
    """The sizes asked for on the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.feed", description=(__doc__ or "").split("\n\n")[0]
    )
    add = parser.add_argument
    add("--watchers", type=int, default=10_000, help="held queries in phase 1 (10000)")
    add("--fanout", type=int, default=1_000, help="watchers of fan in phase 2 (1000)")
    add("--others", type=int, default=1_000, help="watchers of other services in phase 3 (1000)")
    add("--quick", action="store_true", help="tiny sizes (50, 20, 20): a few seconds")
    add("--concurrency", type=int, default=CONCURRENCY, help="connection setups at once (200)")
    add("--timeout", type=float, default=None, help="seconds for everything (300; quick: 90)")
    args = parser.parse_args(argv)
    if args.quick:
        args.watchers, args.fanout, args.others = 50, 20, 20
    for name in ("watchers", "fanout", "others", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return Sizes(
        watchers=args.watchers,
        fanout=args.fanout,
        others=args.others,
        idle_window=1.0 if args.quick else 5.0,
        timeout=args.timeout or (90.0 if args.quick else 300.0),
        concurrency=args.concurrency,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report; return the exit status."""
    sizes = options(sys.argv[1:] if argv is None else argv)
    nofile = raise_nofile()
    server_cpus, load_cpus = cpu_placement()
    if load_cpus is not None:
        os.sched_setaffinity(0, load_cpus)
    report = Report("feed", machine(
        min(server_cpus) if server_cpus else "any", min(load_cpus) if load_cpus else "any", nofile
    ))
    needed = max(sizes.watchers, sizes.fanout + 1, sizes.others + 1) + 64
    try:
        if needed > nofile:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            raise BenchError(
                f"about {needed} file descriptors are needed in each process, and the limit "
                f"is {nofile} (hard {hard}): lower --watchers or raise the hard limit"
            )
        with tempfile.TemporaryDirectory(prefix="regdisc-bench-") as directory:
            material = make_material(Path(directory))
            daemon = start_registry("daemon", Path(directory), material, server_cpus)
            try:
                drive(daemon, material, sizes, report)
            finally:
                daemon.stop()
    except BenchError as e:
        report.problems.append(str(e))
    except Exception:
        import traceback

        report.problems.append(traceback.format_exc())
    print(report.render(), flush=True)
    return exit_status(report)


def exit_status(report: Report) -> int:
    """1 if a watcher of another service was answered; else 2 if anything went wrong; else 0."""
    wakeups = report.value("cross_service_wakeups")
    if wakeups is not None and wakeups != 0:
        return 1
    return 2 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
