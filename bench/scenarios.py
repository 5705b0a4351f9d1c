"""The network scenarios: the registry measured side by side with what it is compared to.

Every figure that matters is a ratio taken in the same run, on the same
machine, with the same load generator (`bench.http_load`) on its own CPU and
the servers on another:

* ``generator``: the load generator against the trivial endpoint (and nginx,
  and ab as a second opinion, where installed): what it can drive at all, and
  how far above the registry's own rates that is.
* ``heartbeats`` (scenario 1): ``instances`` registered instances (10,000),
  renewed over 32 keep-alive connections, each request a different instance's
  heartbeat; against the bare Klein endpoint answering the same requests, and
  etcd's gateway keep-alive of as many leases (``POST /v3/lease/keepalive``).
* ``discovery`` (scenario 2): reads of a service of 10, 100 and 1,000
  instances; against the bare endpoint and etcd's serializable prefix range of
  as many keys holding the same instance JSON (``POST /v3/kv/range``).
* ``writes`` (scenario 3): registrations and token rotations per second.
* ``handshakes`` (scenario 6): new mutual-TLS connections per second, one
  request each, ECDSA P-256, for the registry, the bare endpoint and nginx
  (``ssl_verify_client on``, a static 200). A full handshake costs the client
  about what it costs the server, so the generator may be the limit here: each
  server's CPU per connection is measured too, and the capacity ratios
  (connections per server CPU-second) are the ones to read.
* ``etcd_store`` (scenario 7): heartbeats and reads through one, then two,
  registry nodes on the etcd store (one etcd member).

Comparisons whose tool is missing (nginx, ab, etcd) are reported as skipped;
the registry's own figures are always measured. `FIGURES` names them all.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from .harness import (
    BenchError,
    Material,
    Report,
    ServerProcess,
    find_tool,
    ratio,
    run_ab,
    start_bare,
    start_etcd,
    start_nginx,
    start_registry,
    start_trivial,
)
from .http_load import (
    Answer,
    Endpoint,
    LoadError,
    Result,
    Script,
    cycle,
    drain_answers,
    fetch,
    handshakes,
    keep_alive,
    request,
)

TTL = 3600
"""The TTL of every instance registered here: none may expire during a run."""

ETCD_LEASE_TTL = 900
"""The TTL of etcd's own leases in the heartbeat comparison."""


@attrs.frozen
class FigureSpec:
    unit: str
    meaning: str
    needs: str | None = None
    """The comparison tool without which the figure is skipped: nginx, ab or etcd."""


def _specs() -> dict[str, dict[str, FigureSpec]]:
    f = FigureSpec
    figures: dict[str, dict[str, FigureSpec]] = {
        "generator": {
            "trivial_rps": f("req/s", "load generator, keep-alive GET, against the trivial endpoint"),
            "trivial_client_cpu": f("CPU", "generator CPU use meanwhile (1.0 = its CPU is the limit)"),
            "trivial_server_cpu": f("CPU", "trivial endpoint CPU use meanwhile"),
            "nginx_rps": f("req/s", "load generator against nginx, same requests", "nginx"),
            "ab_trivial_rps": f("req/s", "ab -k against the trivial endpoint (second opinion)", "ab"),
            "ceiling_rps": f("req/s", "the generator's ceiling: the best of the above from it"),
            "ceiling_vs_registry": f(
                "ratio", "ceiling / the registry's fastest keep-alive rate in this run (want >> 1)"
            ),
        },
        "heartbeats": {
            "instances": f("instances", "registered, then renewed in turn"),
            "register_rps": f("req/s", "registrations/s while registering them (32 connections)"),
            "registry_rps": f("req/s", "heartbeats/s, 32 keep-alive connections, each a different instance"),
            "registry_p50": f("ms", "heartbeat latency, median"),
            "registry_p99": f("ms", "heartbeat latency, 99th percentile"),
            "registry_p999": f("ms", "heartbeat latency, 99.9th percentile"),
            "registry_errors": f("requests", "heartbeats answered other than 2xx or lost"),
            "registry_server_cpu": f("CPU", "registry CPU use meanwhile"),
            "registry_cpu_per_req": f("us", "registry CPU per heartbeat"),
            "bare_rps": f("req/s", "the same requests against the bare Klein endpoint"),
            "bare_p50": f("ms", "bare endpoint latency, median"),
            "bare_p99": f("ms", "bare endpoint latency, 99th percentile"),
            "bare_cpu_per_req": f("us", "bare endpoint CPU per request"),
            "vs_bare": f("ratio", "registry / bare, requests/s (target >= 0.8)"),
            "capacity_vs_bare": f("ratio", "registry / bare, requests per server CPU-second"),
            "etcd_rps": f("req/s", "etcd gateway lease keep-alives/s, as many leases, mutual TLS", "etcd"),
            "etcd_p50": f("ms", "etcd keep-alive latency, median", "etcd"),
            "etcd_p99": f("ms", "etcd keep-alive latency, 99th percentile", "etcd"),
            "etcd_server_cpu": f("CPU", "etcd CPU use meanwhile (GOMAXPROCS=1)", "etcd"),
            "etcd_cpu_per_req": f("us", "etcd CPU per keep-alive", "etcd"),
            "vs_etcd": f("ratio", "registry / etcd keep-alives, requests/s (target >= 1.2)", "etcd"),
            "capacity_vs_etcd": f("ratio", "registry / etcd, requests per server CPU-second", "etcd"),
            "p99_vs_etcd": f("ratio", "registry p99 / etcd p99 (below 1: registry faster)", "etcd"),
        },
        "discovery": {
            "bare_rps": f("req/s", "the bare endpoint, same GETs (its answer is tiny)"),
            "bare_cpu_per_req": f("us", "bare endpoint CPU per request"),
        },
        "writes": {
            "register_rps": f("req/s", "registrations/s of new instances, 32 connections"),
            "register_p50": f("ms", "registration latency, median"),
            "register_p99": f("ms", "registration latency, 99th percentile"),
            "register_errors": f("requests", "registrations answered other than 2xx or lost"),
            "register_bare_rps": f("req/s", "the same POSTs against the bare endpoint"),
            "register_vs_bare": f("ratio", "registry / bare"),
            "rotate_rps": f("req/s", "token rotations/s, each with the token the last one gave"),
            "rotate_p50": f("ms", "rotation latency, median"),
            "rotate_p99": f("ms", "rotation latency, 99th percentile"),
            "rotate_errors": f("requests", "rotations answered other than 2xx or lost"),
            "rotate_bare_rps": f("req/s", "the same POSTs against the bare endpoint"),
            "rotate_vs_bare": f("ratio", "registry / bare"),
        },
        "handshakes": {
            "registry_cps": f("conn/s", "new connections/s, full handshake + one GET each, 32 at once"),
            "registry_p50": f("ms", "connect to answer, median"),
            "registry_cpu_per_conn": f("ms", "registry CPU per connection"),
            "registry_server_cpu": f("CPU", "registry CPU use meanwhile"),
            "registry_client_cpu": f("CPU", "generator CPU use meanwhile (1.0 = generator-bound)"),
            "bare_cps": f("conn/s", "the same against the bare endpoint"),
            "bare_cpu_per_conn": f("ms", "bare endpoint CPU per connection"),
            "nginx_cps": f("conn/s", "the same against nginx (one worker)", "nginx"),
            "nginx_cpu_per_conn": f("ms", "nginx CPU per connection", "nginx"),
            "nginx_client_cpu": f("CPU", "generator CPU use meanwhile", "nginx"),
            "vs_bare": f("ratio", "registry / bare, connections/s"),
            "vs_nginx": f("ratio", "registry / nginx, connections/s as measured", "nginx"),
            "capacity_vs_bare": f("ratio", "registry / bare, connections per server CPU-second"),
            "capacity_vs_nginx": f(
                "ratio", "registry / nginx, connections per server CPU-second (target >= 0.7)", "nginx"
            ),
        },
        "etcd_store": {
            "instances": f("instances", "registered through the etcd store, renewed in turn", "etcd"),
            "register_rps": f("req/s", "registrations/s through one node while registering them", "etcd"),
            "heartbeat_rps_1node": f("req/s", "heartbeats/s through one node", "etcd"),
            "heartbeat_p99_1node": f("ms", "heartbeat latency through one node, p99", "etcd"),
            "heartbeat_node_cpu_1node": f("CPU", "the node's CPU use meanwhile", "etcd"),
            "heartbeat_etcd_cpu_1node": f("CPU", "etcd's CPU use meanwhile", "etcd"),
            "heartbeat_rps_2nodes": f("req/s", "heartbeats/s through two nodes, 16 connections each", "etcd"),
            "heartbeat_p99_2nodes": f("ms", "heartbeat latency through two nodes, p99", "etcd"),
            "read100_rps_1node": f("req/s", "reads/s of a 100-instance service through one node", "etcd"),
            "read100_rps_2nodes": f("req/s", "the same through two nodes", "etcd"),
            "heartbeat_vs_memory": f("ratio", "heartbeats/s, one node on etcd / memory store", "etcd"),
            "heartbeat_vs_etcd": f(
                "ratio", "heartbeats/s, one node on etcd / etcd's own gateway keep-alives", "etcd"
            ),
            "read100_vs_memory": f("ratio", "reads/s, one node on etcd / memory store", "etcd"),
        },
    }
    discovery = figures["discovery"]
    for size in DISCOVERY_SIZES:
        target = " (target >= 0.8)" if size <= 100 else ""
        discovery[f"registry_{size}_rps"] = f("req/s", f"GETs/s of a service of {size} instances")
        discovery[f"registry_{size}_p50"] = f("ms", f"latency, {size} instances, median")
        discovery[f"registry_{size}_p99"] = f("ms", f"latency, {size} instances, 99th percentile")
        discovery[f"registry_{size}_bytes"] = f("bytes", f"answer body, {size} instances")
        discovery[f"registry_{size}_cpu_per_req"] = f("us", f"registry CPU per read, {size} instances")
        discovery[f"vs_bare_{size}"] = f("ratio", f"registry / bare, {size} instances{target}")
        discovery[f"capacity_vs_bare_{size}"] = f(
            "ratio", f"registry / bare, reads per server CPU-second, {size} instances"
        )
        discovery[f"etcd_{size}_rps"] = f(
            "req/s", f"etcd serializable prefix range of {size} keys, same JSON values", "etcd"
        )
        discovery[f"etcd_{size}_bytes"] = f("bytes", f"etcd answer body, {size} keys", "etcd")
        discovery[f"etcd_{size}_cpu_per_req"] = f("us", f"etcd CPU per range, {size} keys", "etcd")
        discovery[f"vs_etcd_{size}"] = f(
            "ratio", f"registry / etcd range, {size} instances (target >= 1.5)", "etcd"
        )
        discovery[f"capacity_vs_etcd_{size}"] = f(
            "ratio", f"registry / etcd, reads per server CPU-second, {size} instances", "etcd"
        )
    return figures


DISCOVERY_SIZES = (10, 100, 1000)

FIGURES = _specs()
"""Every figure of these scenarios, by bench and name."""

SCENARIOS = ("generator", "heartbeats", "discovery", "writes", "handshakes", "etcd_store")


@attrs.frozen
class Sizes:
    """How big and how long each scenario is."""

    instances: int
    """Instances renewed in the heartbeat scenario."""
    etcd_instances: int
    """Instances renewed through the etcd store."""
    connections: int
    """Keep-alive connections, and handshakes in flight."""
    duration: float
    """Seconds of each measurement window."""
    warmup: float
    """Seconds of load before each window."""
    limit: float
    """The longest one run may take, in seconds."""

    @classmethod
    def full(cls) -> Sizes:
        return cls(instances=10_000, etcd_instances=1_000, connections=32,
                   duration=5.0, warmup=1.0, limit=120.0)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(instances=256, etcd_instances=64, connections=32,
                   duration=0.3, warmup=0.1, limit=60.0)


@attrs.define
class Run:
    """One run of the scenarios: its folder, PKI, CPUs, servers and report."""

    directory: Path
    material: Material
    server_cpus: set[int] | None
    sizes: Sizes
    report: Report
    stack: contextlib.ExitStack
    profile: Path | None = None
    """Where the registry writes a cProfile of its run, if anywhere."""
    servers: dict[str, ServerProcess | None] = attrs.Factory(dict)

    def server(self, name: str) -> ServerProcess | None:
        """The shared server ``name``, started on first use (None when not installed)."""
        if name not in self.servers:
            starters: dict[str, Callable[[], ServerProcess | None]] = {
                "trivial": lambda: start_trivial(self.directory, self.material, self.server_cpus),
                "bare": lambda: start_bare(self.directory, self.material, self.server_cpus),
                "registry": lambda: start_registry(
                    "registry", self.directory, self.material, self.server_cpus,
                    profile=self.profile,
                ),
                "nginx": lambda: start_nginx(self.directory, self.material, self.server_cpus),
                "etcd": lambda: start_etcd(self.directory, self.material, self.server_cpus),
            }
            started = starters[name]()
            if started is not None:
                self.stack.callback(started.stop)
            self.servers[name] = started
        return self.servers[name]

    def endpoint(self, server: ServerProcess) -> Endpoint:
        return self.material.endpoint(server.port)

    def add(self, bench: str, name: str, value: float | int | None, skipped: str | None = None) -> None:
        spec = FIGURES[bench][name]
        self.report.add(bench, name, value, spec.unit, spec.meaning, skipped)

    def load(
        self, server: ServerProcess | Sequence[ServerProcess], scripts: Sequence[Script],
        *, until_done: bool = False, cpu_of: Sequence[ServerProcess] = (),
    ) -> Result:
        """Keep-alive load on one server or spread over several, for a window after a warm-up.

        With ``until_done``, until every script is done instead, all of it the
        window. The CPU of ``cpu_of`` (default: the servers loaded) is probed.
        """
        servers = [server] if isinstance(server, ServerProcess) else list(server)
        watched = list(cpu_of) or servers
        return keep_alive(
            [self.endpoint(s) for s in servers], scripts,
            None if until_done else self.sizes.duration, self.sizes.warmup,
            self.sizes.limit, probe=lambda: [s.cpu_seconds() for s in watched],
        )

    def check(self, what: str, result: Result) -> None:
        """Note a run that had errors as a problem of the run."""
        if result.errors:
            self.report.problems.append(
                f"{what}: {result.error_count} errors ({result.describe_errors()})"
            )


def _tool_missing(tool: str) -> str:
    return f"{tool} not installed"


def _spread(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` dealt into ``parts`` lists, as cards: each part gets every ``parts``-th one."""
    return [list(items[i::parts]) for i in range(parts)]


def register_all(
    run: Run, server: ServerProcess | Sequence[ServerProcess], bodies: Sequence[tuple[str, dict[str, Any]]],
) -> tuple[dict[tuple[str, str], str], Result]:
    """Register each ``(service, body)`` over the run's connections; the tokens by (service, id)."""
    work = iter([
        ((service, body["id"]), request("POST", f"/registry/services/{service}/instances", body))
        for service, body in bodies
    ])
    answers: list[tuple[Any, Answer]] = []
    scripts = [drain_answers(work, answers) for _ in range(run.sizes.connections)]
    result = run.load(server, scripts, until_done=True)
    tokens = {}
    for key, (status, body) in answers:
        if status not in (200, 201):
            raise BenchError(f"registering {key} answered {status}: {body[:200]!r}")
        tokens[key] = json.loads(body)["data"]["token"]
    return tokens, result


def _instance(instance_id: str, port: int = 8080) -> dict[str, Any]:
    return {"id": instance_id, "host": "10.1.2.3", "port": port, "ttl": TTL,
            "metadata": {"zone": "a", "version": "1.2.3"}, "tags": ["bench"]}


def _micro(seconds: float | None) -> float | None:
    return None if seconds is None else 1e6 * seconds


def heartbeat_request(service: str, instance_id: str, token: str) -> bytes:
    return request("PUT", f"/registry/services/{service}/instances/{instance_id}/heartbeat", token=token)


# Scenario: the load generator.


def scenario_generator(run: Run) -> None:
    trivial = run.server("trivial")
    assert trivial is not None
    get = request("GET", "/registry/services/web/instances")
    result = run.load(trivial, [cycle([get]) for _ in range(run.sizes.connections)])
    run.check("generator against the trivial endpoint", result)
    run.add("generator", "trivial_rps", result.rate)
    run.add("generator", "trivial_client_cpu", result.client_load)
    run.add("generator", "trivial_server_cpu", result.probed_rate)
    best = result.rate
    nginx = run.server("nginx")
    if nginx is None:
        run.add("generator", "nginx_rps", None, _tool_missing("nginx"))
    else:
        measured = run.load(nginx, [cycle([get]) for _ in range(run.sizes.connections)])
        run.check("generator against nginx", measured)
        run.add("generator", "nginx_rps", measured.rate)
        best = max(best, measured.rate)
    if find_tool("ab") is None:
        run.add("generator", "ab_trivial_rps", None, _tool_missing("ab"))
    else:
        ab = run_ab(run.material, trivial.port, run.sizes.connections, max(1.0, run.sizes.duration))
        if ab.failed:
            run.report.problems.append(f"ab against the trivial endpoint: {ab.failed} failed requests")
        run.add("generator", "ab_trivial_rps", ab.rate)
    run.add("generator", "ceiling_rps", best)


_REGISTRY_RATES = [
    ("heartbeats", "registry_rps"),
    *(("discovery", f"registry_{size}_rps") for size in DISCOVERY_SIZES),
    ("writes", "register_rps"),
    ("writes", "rotate_rps"),
]
"""The registry's keep-alive rates, which the generator's ceiling must be well above."""


def finish_generator(run: Run) -> None:
    """The ceiling against the registry's fastest rate, once the registry has been measured."""
    ceiling = run.report.value_of("generator", "ceiling_rps")
    found = [run.report.value_of(bench, name) for bench, name in _REGISTRY_RATES]
    rates = [value for value in found if value is not None]
    if ceiling is None or not rates:
        run.add("generator", "ceiling_vs_registry", None, "not measured")
        return
    run.add("generator", "ceiling_vs_registry", ratio(ceiling, max(rates)))


# Scenario 1: heartbeats.


def scenario_heartbeats(run: Run) -> None:
    registry, bare = run.server("registry"), run.server("bare")
    assert registry is not None and bare is not None
    sizes, conns = run.sizes, run.sizes.connections
    services = max(1, sizes.instances // 100)
    bodies = [(f"hb-{i % services}", _instance(f"hb-{i}")) for i in range(sizes.instances)]
    tokens, registering = register_all(run, registry, bodies)
    run.check("heartbeats: registering", registering)
    run.add("heartbeats", "instances", len(tokens))
    run.add("heartbeats", "register_rps", registering.rate)
    beats = [heartbeat_request(service, iid, token) for (service, iid), token in tokens.items()]
    per_connection = _spread(beats, conns)

    bare_result = run.load(bare, [cycle(part) for part in per_connection])
    run.check("heartbeats: bare", bare_result)
    result = run.load(registry, [cycle(part) for part in per_connection])
    run.check("heartbeats: registry", result)
    run.add("heartbeats", "registry_rps", result.rate)
    run.add("heartbeats", "registry_p50", result.percentile(0.50))
    run.add("heartbeats", "registry_p99", result.percentile(0.99))
    run.add("heartbeats", "registry_p999", result.percentile(0.999))
    run.add("heartbeats", "registry_errors", result.error_count)
    run.add("heartbeats", "registry_server_cpu", result.probed_rate)
    run.add("heartbeats", "registry_cpu_per_req", _micro(result.probed_per_answer()))
    run.add("heartbeats", "bare_rps", bare_result.rate)
    run.add("heartbeats", "bare_p50", bare_result.percentile(0.50))
    run.add("heartbeats", "bare_p99", bare_result.percentile(0.99))
    run.add("heartbeats", "bare_cpu_per_req", _micro(bare_result.probed_per_answer()))
    run.add("heartbeats", "vs_bare", ratio(result.rate, bare_result.rate))
    run.add("heartbeats", "capacity_vs_bare",
            ratio(bare_result.probed_per_answer(), result.probed_per_answer()))

    etcd = run.server("etcd")
    names = ["etcd_rps", "etcd_p50", "etcd_p99", "etcd_server_cpu", "etcd_cpu_per_req",
             "vs_etcd", "capacity_vs_etcd", "p99_vs_etcd"]
    if etcd is None:
        for name in names:
            run.add("heartbeats", name, None, _tool_missing("etcd"))
        return
    grants = iter([(i, request("POST", "/v3/lease/grant", {"TTL": ETCD_LEASE_TTL}))
                   for i in range(sizes.instances)])
    answers: list[tuple[Any, Answer]] = []
    granted = run.load(etcd, [drain_answers(grants, answers) for _ in range(conns)], until_done=True)
    run.check("heartbeats: etcd lease grants", granted)
    leases = [json.loads(body)["ID"] for _, (status, body) in answers if status == 200]
    if len(leases) != sizes.instances:
        raise BenchError(f"etcd granted {len(leases)} of {sizes.instances} leases")
    keepalives = [request("POST", "/v3/lease/keepalive", {"ID": lease}) for lease in leases]
    etcd_result = run.load(etcd, [cycle(part) for part in _spread(keepalives, conns)])
    run.check("heartbeats: etcd keep-alive", etcd_result)
    run.add("heartbeats", "etcd_rps", etcd_result.rate)
    run.add("heartbeats", "etcd_p50", etcd_result.percentile(0.50))
    run.add("heartbeats", "etcd_p99", etcd_result.percentile(0.99))
    run.add("heartbeats", "etcd_server_cpu", etcd_result.probed_rate)
    run.add("heartbeats", "etcd_cpu_per_req", _micro(etcd_result.probed_per_answer()))
    run.add("heartbeats", "vs_etcd", ratio(result.rate, etcd_result.rate))
    run.add("heartbeats", "capacity_vs_etcd",
            ratio(etcd_result.probed_per_answer(), result.probed_per_answer()))
    run.add("heartbeats", "p99_vs_etcd", ratio(result.percentile(0.99), etcd_result.percentile(0.99)))


# Scenario 2: discovery reads.


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    """The end of etcd's range of every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def scenario_discovery(run: Run) -> None:
    registry, bare = run.server("registry"), run.server("bare")
    assert registry is not None and bare is not None
    conns = run.sizes.connections
    bodies = [(f"disc-{size}", _instance(f"d{size}-{i}", 8000 + i % 1000))
              for size in DISCOVERY_SIZES for i in range(size)]
    _, registering = register_all(run, registry, bodies)
    run.check("discovery: registering", registering)
    reads = {size: request("GET", f"/registry/services/disc-{size}/instances") for size in DISCOVERY_SIZES}

    bare_result = run.load(bare, [cycle([reads[100]]) for _ in range(conns)])
    run.check("discovery: bare", bare_result)
    run.add("discovery", "bare_rps", bare_result.rate)
    run.add("discovery", "bare_cpu_per_req", _micro(bare_result.probed_per_answer()))
    costs: dict[int, float | None] = {}

    etcd = run.server("etcd")
    listings: dict[int, list[Any]] = {}
    for size in DISCOVERY_SIZES:
        status, _, body = fetch(run.endpoint(registry), "GET", f"/registry/services/disc-{size}/instances")
        listing = json.loads(body)["data"]["instances"]
        if status != 200 or len(listing) != size:
            raise BenchError(f"disc-{size} lists {len(listing)} instances (HTTP {status})")
        listings[size] = listing
        result = run.load(registry, [cycle([reads[size]]) for _ in range(conns)])
        run.check(f"discovery: registry, {size} instances", result)
        run.add("discovery", f"registry_{size}_rps", result.rate)
        run.add("discovery", f"registry_{size}_p50", result.percentile(0.50))
        run.add("discovery", f"registry_{size}_p99", result.percentile(0.99))
        run.add("discovery", f"registry_{size}_bytes", len(body))
        costs[size] = result.probed_per_answer()
        run.add("discovery", f"registry_{size}_cpu_per_req", _micro(costs[size]))
        run.add("discovery", f"vs_bare_{size}", ratio(result.rate, bare_result.rate))
        run.add("discovery", f"capacity_vs_bare_{size}", ratio(bare_result.probed_per_answer(), costs[size]))
    for size in DISCOVERY_SIZES:
        names = [f"etcd_{size}_rps", f"etcd_{size}_bytes", f"etcd_{size}_cpu_per_req",
                 f"vs_etcd_{size}", f"capacity_vs_etcd_{size}"]
        if etcd is None:
            for name in names:
                run.add("discovery", name, None, _tool_missing("etcd"))
            continue
        prefix = f"/bench/disc-{size}/".encode()
        puts = iter([
            (i, request("POST", "/v3/kv/put", {
                "key": _b64(prefix + instance["id"].encode()),
                "value": _b64(json.dumps(instance, separators=(",", ":")).encode()),
            }))
            for i, instance in enumerate(listings[size])
        ])
        answers: list[tuple[Any, Answer]] = []
        put = run.load(etcd, [drain_answers(puts, answers) for _ in range(conns)], until_done=True)
        run.check(f"discovery: etcd puts, {size} keys", put)
        query = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), "serializable": True}
        status, _, body = fetch(run.endpoint(etcd), "POST", "/v3/kv/range", query)
        count = int(json.loads(body).get("count", 0)) if status == 200 else -1
        if count != size:
            raise BenchError(f"etcd's range of {prefix!r} holds {count} keys, not {size}")
        result = run.load(etcd, [cycle([request("POST", "/v3/kv/range", query)]) for _ in range(conns)])
        run.check(f"discovery: etcd range, {size} keys", result)
        run.add("discovery", f"etcd_{size}_rps", result.rate)
        run.add("discovery", f"etcd_{size}_bytes", len(body))
        run.add("discovery", f"etcd_{size}_cpu_per_req", _micro(result.probed_per_answer()))
        registry_rate = run.report.value_of("discovery", f"registry_{size}_rps")
        run.add("discovery", f"vs_etcd_{size}", ratio(registry_rate, result.rate))
        run.add("discovery", f"capacity_vs_etcd_{size}", ratio(result.probed_per_answer(), costs[size]))


# Scenario 3: registrations and token rotations.


def _registrations(connection: int, services: int = 10) -> Script:
    n = 0
    while True:
        n += 1
        body = _instance(f"w{connection}-{n}")
        yield request("POST", f"/registry/services/reg-{n % services}/instances", body)


def _rotations(keys: Sequence[tuple[str, str]], tokens: dict[tuple[str, str], str]) -> Script:
    while True:
        for key in keys:
            service, iid = key
            status, body = yield request(
                "POST", f"/registry/services/{service}/instances/{iid}/token", token=tokens[key]
            )
            fresh = json.loads(body).get("data", {}).get("token") if status == 200 else None
            if fresh is not None:  # the bare endpoint gives none: its requests stay the same
                tokens[key] = fresh


def scenario_writes(run: Run) -> None:
    registry, bare = run.server("registry"), run.server("bare")
    assert registry is not None and bare is not None
    conns = run.sizes.connections
    bare_result = run.load(bare, [_registrations(k) for k in range(conns)])
    run.check("writes: bare registrations", bare_result)
    result = run.load(registry, [_registrations(k) for k in range(conns)])
    run.check("writes: registrations", result)
    run.add("writes", "register_rps", result.rate)
    run.add("writes", "register_p50", result.percentile(0.50))
    run.add("writes", "register_p99", result.percentile(0.99))
    run.add("writes", "register_errors", result.error_count)
    run.add("writes", "register_bare_rps", bare_result.rate)
    run.add("writes", "register_vs_bare", ratio(result.rate, bare_result.rate))

    bodies = [(f"rot-{i % 10}", _instance(f"rot-{i}")) for i in range(conns * 8)]
    tokens, registering = register_all(run, registry, bodies)
    run.check("writes: registering for rotations", registering)
    parts = _spread(sorted(tokens), conns)
    fixed = dict(tokens)
    bare_result = run.load(bare, [_rotations(part, fixed) for part in parts])
    run.check("writes: bare rotations", bare_result)
    result = run.load(registry, [_rotations(part, tokens) for part in parts])
    run.check("writes: rotations", result)
    run.add("writes", "rotate_rps", result.rate)
    run.add("writes", "rotate_p50", result.percentile(0.50))
    run.add("writes", "rotate_p99", result.percentile(0.99))
    run.add("writes", "rotate_errors", result.error_count)
    run.add("writes", "rotate_bare_rps", bare_result.rate)
    run.add("writes", "rotate_vs_bare", ratio(result.rate, bare_result.rate))


# Scenario 6: new TLS connections.


def _handshakes(run: Run, server: ServerProcess, target: str) -> Result:
    result = handshakes(
        run.endpoint(server), request("GET", target, close=True), run.sizes.connections,
        run.sizes.duration, run.sizes.warmup, run.sizes.limit, probe=lambda: [server.cpu_seconds()],
    )
    run.check(f"handshakes: {server.name}", result)
    return result


def _per_connection(result: Result) -> float | None:
    """Server CPU milliseconds per connection."""
    cost = result.probed_per_answer()
    return None if cost is None else 1000 * cost


def scenario_handshakes(run: Run) -> None:
    registry, bare = run.server("registry"), run.server("bare")
    assert registry is not None and bare is not None
    target = "/registry/services/hs/instances"  # an empty service: the request costs little
    bare_result = _handshakes(run, bare, target)
    result = _handshakes(run, registry, target)
    registry_cost, bare_cost = _per_connection(result), _per_connection(bare_result)
    run.add("handshakes", "registry_cps", result.rate)
    run.add("handshakes", "registry_p50", result.percentile(0.50))
    run.add("handshakes", "registry_cpu_per_conn", registry_cost)
    run.add("handshakes", "registry_server_cpu", result.probed_rate)
    run.add("handshakes", "registry_client_cpu", result.client_load)
    run.add("handshakes", "bare_cps", bare_result.rate)
    run.add("handshakes", "bare_cpu_per_conn", bare_cost)
    run.add("handshakes", "vs_bare", ratio(result.rate, bare_result.rate))
    run.add("handshakes", "capacity_vs_bare", ratio(bare_cost, registry_cost))
    nginx = run.server("nginx")
    if nginx is None:
        for name in ("nginx_cps", "nginx_cpu_per_conn", "nginx_client_cpu", "vs_nginx", "capacity_vs_nginx"):
            run.add("handshakes", name, None, _tool_missing("nginx"))
        return
    nginx_result = _handshakes(run, nginx, target)
    nginx_cost = _per_connection(nginx_result)
    run.add("handshakes", "nginx_cps", nginx_result.rate)
    run.add("handshakes", "nginx_cpu_per_conn", nginx_cost)
    run.add("handshakes", "nginx_client_cpu", nginx_result.client_load)
    run.add("handshakes", "vs_nginx", ratio(result.rate, nginx_result.rate))
    run.add("handshakes", "capacity_vs_nginx", ratio(nginx_cost, registry_cost))


# Scenario 7: the etcd store, one and two nodes.


def scenario_etcd_store(run: Run) -> None:
    etcd = run.server("etcd")
    if etcd is None:
        for name in FIGURES["etcd_store"]:
            run.add("etcd_store", name, None, _tool_missing("etcd"))
        return
    conns = run.sizes.connections
    env = {
        "REGDISC_STORE": "etcd",
        "REGDISC_ETCD_ENDPOINTS": f"https://127.0.0.1:{etcd.port}",
        "REGDISC_ETCD_PREFIX": "/regdisc-bench/",
        "REGDISC_ETCD_CERT": str(run.material.client_cert),
        "REGDISC_ETCD_KEY": str(run.material.client_key),
        "REGDISC_ETCD_CA": str(run.material.ca),
    }
    with contextlib.ExitStack() as nodes:
        first = start_registry("node1", run.directory, run.material, run.server_cpus, env)
        nodes.callback(first.stop)
        count = run.sizes.etcd_instances
        bodies = [(f"es-{i % 10}", _instance(f"es-{i}")) for i in range(count)]
        bodies += [("es-read", _instance(f"er-{i}")) for i in range(100)]
        tokens, registering = register_all(run, first, bodies)
        run.check("etcd store: registering", registering)
        run.add("etcd_store", "instances", count)
        run.add("etcd_store", "register_rps", registering.rate)
        beats = [heartbeat_request(s, iid, token) for (s, iid), token in tokens.items()
                 if s != "es-read"]
        parts = _spread(beats, conns)
        read = request("GET", "/registry/services/es-read/instances")
        watched = [first, etcd]

        one = run.load(first, [cycle(part) for part in parts], cpu_of=watched)
        run.check("etcd store: heartbeats, one node", one)
        reads_one = run.load(first, [cycle([read]) for _ in range(conns)], cpu_of=watched)
        run.check("etcd store: reads, one node", reads_one)

        second = start_registry("node2", run.directory, run.material, run.server_cpus, env)
        nodes.callback(second.stop)
        _wait_listing(run, second, "es-read", 100)
        both = [first, second]
        two = run.load(both, [cycle(part) for part in parts], cpu_of=[*both, etcd])
        run.check("etcd store: heartbeats, two nodes", two)
        reads_two = run.load(both, [cycle([read]) for _ in range(conns)], cpu_of=[*both, etcd])
        run.check("etcd store: reads, two nodes", reads_two)
        for node in both:
            _check_log(run.report, node)

    run.add("etcd_store", "heartbeat_rps_1node", one.rate)
    run.add("etcd_store", "heartbeat_p99_1node", one.percentile(0.99))
    node_cpu, etcd_cpu = one.probed if one.probed is not None else (None, None)
    run.add("etcd_store", "heartbeat_node_cpu_1node", ratio(node_cpu, one.window))
    run.add("etcd_store", "heartbeat_etcd_cpu_1node", ratio(etcd_cpu, one.window))
    run.add("etcd_store", "heartbeat_rps_2nodes", two.rate)
    run.add("etcd_store", "heartbeat_p99_2nodes", two.percentile(0.99))
    run.add("etcd_store", "read100_rps_1node", reads_one.rate)
    run.add("etcd_store", "read100_rps_2nodes", reads_two.rate)
    run.add("etcd_store", "heartbeat_vs_memory",
            ratio(one.rate, run.report.value_of("heartbeats", "registry_rps")))
    run.add("etcd_store", "heartbeat_vs_etcd",
            ratio(one.rate, run.report.value_of("heartbeats", "etcd_rps")))
    run.add("etcd_store", "read100_vs_memory",
            ratio(reads_one.rate, run.report.value_of("discovery", "registry_100_rps")))


def _wait_listing(run: Run, server: ServerProcess, service: str, size: int, limit: float = 30.0) -> None:
    """Wait until ``server`` lists ``size`` instances of ``service`` (its mirror has them)."""
    deadline = time.monotonic() + limit
    seen = -1
    while time.monotonic() < deadline:
        status, _, body = fetch(run.endpoint(server), "GET", f"/registry/services/{service}/instances")
        if status == 200:
            seen = len(json.loads(body)["data"]["instances"])
            if seen == size:
                return
        time.sleep(0.1)
    raise BenchError(f"{server.name} lists {seen} instances of {service}, not {size}, after {limit:g} s")


# Running them.

RUNNERS: dict[str, Callable[[Run], None]] = {
    "generator": scenario_generator,
    "heartbeats": scenario_heartbeats,
    "discovery": scenario_discovery,
    "writes": scenario_writes,
    "handshakes": scenario_handshakes,
    "etcd_store": scenario_etcd_store,
}


def run_scenarios(
    directory: Path, material: Material, server_cpus: set[int] | None, sizes: Sizes,
    report: Report, only: Sequence[str] = SCENARIOS, profile: Path | None = None,
    progress: Callable[[str], None] = lambda line: None, deadline: float = math.inf,
) -> dict[str, tuple[float, int]]:
    """Run the scenarios named in ``only``, in order; for each, seconds taken and problems met.

    A scenario that fails is noted among the report's problems, and the
    figures it did not measure are added as skipped, so that every name of
    `FIGURES` appears once. No scenario starts after ``deadline`` (monotonic).
    """
    took: dict[str, tuple[float, int]] = {}
    with contextlib.ExitStack() as stack:
        run = Run(directory, material, server_cpus, sizes, report, stack, profile=profile)
        for name in only:
            started, problems = time.monotonic(), len(report.problems)
            if started > deadline:
                report.problems.append(f"{name}: not run, the suite ran out of time")
                took[name] = (0.0, 1)
                continue
            progress(f"scenario {name}...")
            try:
                RUNNERS[name](run)
            except (BenchError, LoadError, OSError) as e:
                report.problems.append(f"{name}: {e}")
            except Exception:
                import traceback

                report.problems.append(f"{name}: {traceback.format_exc()}")
            took[name] = (time.monotonic() - started, len(report.problems) - problems)
            progress(f"scenario {name}: {took[name][0]:.1f} s")
        if "generator" in only:
            finish_generator(run)
        registry = run.servers.get("registry")
        if registry is not None:
            _check_log(report, registry)
    for bench in only:
        for name, spec in FIGURES[bench].items():
            if not any(f.bench == bench and f.name == name for f in report.figures):
                report.add(bench, name, None, spec.unit, spec.meaning, skipped="scenario failed")
    return took


def _check_log(report: Report, server: ServerProcess) -> None:
    """Note the errors a registry logged (it logs JSON at warn and above)."""
    errors = [line for line in server.log_lines()
              if '"level":"error"' in line or '"level":"critical"' in line]
    if errors:
        report.problems.append(f"{server.name} logged {len(errors)} errors; the first: {errors[0][:300]}")


__all__ = ["DISCOVERY_SIZES", "FIGURES", "SCENARIOS", "Sizes", "run_scenarios"]
