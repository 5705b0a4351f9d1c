"""Scale: resident memory per registered instance, against a naive store and etcd, and heartbeats.

Run from the checkout::

    python -m bench.memory [--sizes 100000,1000000] [--reference 10000] [--quick]

For each size (and the reference size), a fresh Python subprocess registers
that many instances in a `MemoryStore` through the real `Registry` on a
`twisted.internet.task.Clock`, the way the HTTP surface does: each body is
JSON parsed by ``json.loads`` and checked by `parse_registration`, the service
name is decoded from bytes as a URL path segment is, and the peer carries a
certificate fingerprint of its own, so every instance holds the strings a
real request leaves it (small metadata ``{"zone": "eu-1", "version":
"1.2.3"}``, two tags, TTL 30 s, over 1,000 services). Log events go nowhere.

* *Memory*: the growth of VmRSS (``/proc/self/status``) over the
  registrations, after a full collection, minus the tokens the benchmark
  keeps for heartbeats, per instance. tracemalloc is never on (it would cost
  its own memory); instead the same process *counts* the bytes: the
  ``sys.getsizeof`` of every object a sample of 1,000 registrations owns
  alone, rounded up to the allocator's 16-byte classes, plus the store's
  dictionaries and heap per instance. The two figures differ by the
  allocator's overhead. The count is broken down by part (the `Registration`,
  `Instance`, `Credentials`, metadata, tags, strings, numbers, heap entry,
  dictionary slots) for the largest size.
* *Naive baseline*: another fresh subprocess keeps the same records as a dict
  (per service) of parsed JSON dicts (the record etcd holds, credentials
  included), measured the same way; the figure that counts is the ratio.
* *Heartbeats*: after the memory figures, ``--heartbeats`` calls of
  `Registry.heartbeat` on random instances (the clock moves 0.5 ms between
  calls, so that each renewal moves the deadline), each timed alone: median
  and p99, and the ratio of each size's median to the reference size's,
  which should stay near 1. Then the two stalls a large store hides from a
  median: rebuilding the deadline heap (`MemoryStore` does it on the
  heartbeat that finds more than four entries per registration) and a full
  garbage collection over the store's objects.
* *etcd*: where etcd is installed, one member on a loopback port in a
  temporary folder (the test harness's flags, plus ``--unsafe-no-fsync``
  where accepted: durability does not change memory, and the load is
  faster), then ``--etcd-size`` keys of the same records, each attached to a
  lease of its own (1 hour, so none expires during the load), put through
  etcd's HTTP/JSON gateway on 32 connections with at most 8 requests in
  flight on each. etcd's VmRSS and RssAnon growth per lease+key. One million
  would take minutes (two requests per key), so it is measured at 100,000
  unless asked.

Output: the machine, a table, notes, then one JSON line per figure::

    {"bench": "memory", "figure": "rss_per_instance_1m", "value": 812.4, "unit": "B"}

No figure is asserted. The exit status is 2 when something could not be
measured (a subprocess failed or ran out of time, etcd did not start or
refused a request), else 0.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import json
import math
import os
import platform
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import attrs

from .harness import PartReport

BENCH = "memory"
ROOT = Path(__file__).resolve().parent.parent

SERVICES = 1_000
"""Instances are spread over this many services, round robin."""

TTL = 30
TOKEN_TTL = 3600
START = 1_700_000_000.0
"""The Clock's time when registrations start: a real epoch, so floats look real."""

REGISTER_STEP = 1e-6
"""The Clock moves this much between registrations (1 s over a million)."""

HEARTBEAT_STEP = 5e-4
"""The Clock moves this much between timed heartbeats."""

SAMPLE = 1_000
"""Registrations whose objects are counted one by one."""

ETCD_CONNECTIONS = 32
ETCD_DEPTH = 8
"""Requests in flight per connection (pipelined, in order): 256 at most in all."""
ETCD_LEASE_TTL = 3600
ETCD_PREFIX = b"/regdisc/instances/"
ETCD_PATIENCE = 240.0
"""The longest the etcd load may take before it is given up."""


class BenchError(Exception):
    """The benchmark cannot go on; the message says what stood in the way."""


# The report, shared with bench.leases.


@attrs.define
class Report(PartReport):
    """The report of this benchmark and of bench.leases, headed by its title and machine."""

    title: str = ""

    def heading(self) -> list[str]:
        m = self.machine
        return [
            f"{self.title} on {m['cpu_model']} ({m['nproc']} CPUs, {m['mem_total_gib']} GiB), "
            f"Python {m['python']}, Twisted {m['twisted']}, kernel {m['kernel']}"
        ]


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    import twisted

    model = "unknown CPU"
    total = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(total, 1),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "kernel": platform.release(),
    }


def label(count: int) -> str:
    """A size as figure names show it: 1m, 100k, 10k, 1k, or the number."""
    for unit, suffix in ((1_000_000, "m"), (1_000, "k")):
        if count >= unit and count % unit == 0:
            return f"{count // unit}{suffix}"
    return str(count)


def sizes_arg(text: str) -> list[int]:
    try:
        sizes = sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of counts: {text!r}"
        ) from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("each size must be at least 1")
    return sizes


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            found[name] = int(rest.split()[0]) * 1024
    return found


def rss_bytes() -> int:
    return proc_status()["VmRSS"]


def quiet_logging() -> None:
    """Start twisted.logger with no observer, so that events are neither kept nor written.

    Before logging begins, twisted.logger keeps the last 65,536 events in
    memory, which would count as the store's.
    """
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([lambda event: None], discardBuffer=True,
                                     redirectStandardIO=False)


def drive(call: Any) -> Any:
    """The result of a registry call over a MemoryStore: a coroutine that awaits
    only Deferreds that have already fired, or a Deferred that has."""
    if not hasattr(call, "send"):
        outcome: list[Any] = []
        call.addBoth(outcome.append)
        if not outcome:
            raise BenchError("a registry call did not complete at once over a MemoryStore")
        if hasattr(outcome[0], "raiseException"):
            outcome[0].raiseException()
        return outcome[0]
    try:
        call.send(None)
    except StopIteration as stop:
        return stop.value
    call.close()
    raise BenchError("a registry call did not complete at once over a MemoryStore")


def run_child(module: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m module --child ...`` and return the JSON object it prints last."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", module, "--child", *args]
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(command[2:])} ran out of time ({timeout:g} s)") from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith('{"child"'):
            answer = json.loads(line)["child"]
            if done.returncode == 0:
                return answer
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
    raise BenchError(f"{' '.join(command[2:])} exited with {done.returncode}:\n{tail}")


def child_answer(answer: dict[str, Any]) -> None:
    print(json.dumps({"child": answer}), flush=True)


# The records.


def service_names(count: int = SERVICES) -> list[bytes]:
    """Service names as a request path carries them (bytes, decoded per request)."""
    return [f"svc-{n:04d}".encode() for n in range(count)]


def body(i: int) -> bytes:
    """The registration body of instance ``i``."""
    return (
        b'{"id":"i-%07d","host":"10.%d.%d.%d","port":%d,"ttl":%d,'
        b'"metadata":{"zone":"eu-1","version":"1.2.3"},"tags":["web","canary"]}'
        % (i, (i >> 16) & 255, (i >> 8) & 255, i & 255, 8000 + i % 1000, TTL)
    )


def fingerprint(service: bytes) -> str:
    """The fingerprint of the client certificate a service's instances register with.

    A fresh string per call, as a fresh connection computes it.
    """
    return hashlib.sha256(service).hexdigest()


def naive_record(i: int, service: str, now: float) -> bytes:
    """The record of instance ``i`` as JSON, as a store of JSON documents would hold it."""
    token_hash = hashlib.sha256(b"token-%d" % i).hexdigest()
    return json.dumps({
        "service": service,
        "id": f"i-{i:07d}",
        "host": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        "port": 8000 + i % 1000,
        "status": "up",
        "metadata": {"zone": "eu-1", "version": "1.2.3"},
        "tags": ["web", "canary"],
        "ttl": TTL,
        "registered_at": now,
        "last_heartbeat_at": now,
        "expires_at": now + TTL,
        "token_hash": token_hash,
        "token_expires_at": now + TOKEN_TTL,
        "registrant": fingerprint(service.encode()),
    }, separators=(",", ":")).encode()


# Counting bytes without tracemalloc.


def allocated(obj: object) -> int:
    """What ``obj`` takes from the allocator: pymalloc's 16-byte classes up to 512 bytes."""
    size = sys.getsizeof(obj)
    if size <= 512:
        return -(-size // 16) * 16
    return size + 16  # malloc's own header, roughly


def _owned(registration: Any) -> dict[str, list[object]]:
    """The objects of one registration, by part."""
    instance, credentials = registration.instance, registration.credentials
    metadata = instance.metadata
    return {
        "registration": [registration],
        "instance": [instance],
        "credentials": [credentials, credentials.token_hash, credentials.registrant,
                        credentials.expires_at],
        "metadata": [metadata, *metadata.keys(), *metadata.values()],
        "tags": [instance.tags, *instance.tags],
        "strings": [instance.service, instance.id, instance.host, instance.status],
        "numbers": [instance.port, instance.ttl, instance.registered_at,
                    instance.last_heartbeat_at, instance.expires_at, registration.revision],
    }


PARTS = {
    "registration": "the Registration object (instance, credentials, revision)",
    "instance": "the Instance object (11 slots)",
    "credentials": "Credentials, its 32-byte token hash, registrant fingerprint, expiry float",
    "metadata": "the metadata dict, its two keys and two values",
    "tags": "the tags tuple and its two strings",
    "strings": "service, id, host and status strings",
    "numbers": "port and revision ints, three floats (ttl is a cached small int)",
    "heap_entry": "(expires_at, service, id, revision) tuples in the deadline heap and their list slots",
    "dict_slots": "the per-service dicts' hash tables, and the services dict",
    "feed": "the change feed's bounded history (10,000 changes), shared out",
}


def count_bytes(store: Any) -> dict[str, float]:
    """Bytes per instance, by part: a sample's objects one by one, the containers in full.

    An object reachable from two sampled registrations is shared (an
    interned string, a cached small int) and is not counted.
    """
    held = [r for services in store._services.values() for r in services.values()]
    count = len(held)
    rng = random.Random(7)
    sample = rng.sample(held, min(SAMPLE, count))
    seen: dict[int, int] = {}
    owned = [_owned(r) for r in sample]
    for parts in owned:
        for objects in parts.values():
            for obj in {id(o): o for o in objects}.values():
                seen[id(obj)] = seen.get(id(obj), 0) + 1
    totals: dict[str, float] = {}
    for parts in owned:
        counted: set[int] = set()
        for part, objects in parts.items():
            for obj in objects:
                if seen[id(obj)] == 1 and id(obj) not in counted:
                    counted.add(id(obj))
                    totals[part] = totals.get(part, 0) + allocated(obj)
    per = {part: totals.get(part, 0) / len(sample) for part in _owned(sample[0])}
    # The deadline heap: a tuple per entry (its float is the instance's own,
    # counted above, until a renewal leaves the entry stale) and a list slot.
    heap = store._deadlines
    instance_floats = {id(r.instance.expires_at) for r in held}
    stale_floats = sum(allocated(e[0]) for e in heap if id(e[0]) not in instance_floats)
    per["heap_entry"] = (
        sys.getsizeof(heap) + sum(allocated(e) for e in heap) + stale_floats
    ) / count
    per["dict_slots"] = (
        sum(sys.getsizeof(d) for d in store._services.values())
        + sys.getsizeof(store._services) + sys.getsizeof(store._versions)
    ) / count
    history = store.feed._history
    per["feed"] = (
        (sys.getsizeof(history) + len(history) * allocated(history[0])) / count
        if history else 0.0
    )
    return per


# The children: one size each, in a fresh process.


def child_regdisc(count: int, heartbeats: int, seed: int) -> dict[str, Any]:
    """Register ``count`` instances through the Registry; memory, then heartbeats."""
    quiet_logging()
    from twisted.internet.task import Clock

    from regdisc.model import Peer
    from regdisc.registry import Registry
    from regdisc.store import MemoryStore
    from regdisc.validation import TTLBounds, parse_registration

    bounds = TTLBounds(default=TTL, minimum=1, maximum=3600)
    names = service_names()
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(count), min(heartbeats, count)))
    tokens: list[str | None] = [None] * len(picked)

    def register(registry: Any, i: int) -> Any:
        raw = names[i % len(names)]
        spec = parse_registration(json.loads(body(i)), bounds)
        peer = Peer(f"CN={raw.decode()}", fingerprint(raw), "127.0.0.1:40000")
        return drive(registry.register(raw.decode(), spec, None, peer))

    # Warm up every path once in a store thrown away, then measure from a clean slate.
    clock = Clock()
    clock.advance(START)
    warm = Registry(MemoryStore(), clock, TOKEN_TTL)
    for i in range(200):
        register(warm, i)
    del warm
    store = MemoryStore()
    registry = Registry(store, clock, TOKEN_TTL)
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    next_pick = 0
    for i in range(count):
        issued = register(registry, i)
        if next_pick < len(picked) and picked[next_pick] == i:
            tokens[next_pick] = issued.token
            next_pick += 1
        clock.advance(REGISTER_STEP)
    register_s = time.perf_counter() - started
    del issued
    gc.collect()
    after = rss_bytes()
    token_bytes = sum(sys.getsizeof(t) for t in tokens)
    if len(store) != count:
        raise BenchError(f"the store holds {len(store)} registrations, not {count}")
    parts = count_bytes(store)
    tracked = len(gc.get_objects())

    # Heartbeats on random instances, each timed alone.
    calls = [(picked[k], tokens[k]) for k in range(len(picked))]
    order = [calls[rng.randrange(len(calls))] for _ in range(heartbeats)]
    timings = []
    perf = time.perf_counter_ns
    for i, token in order:
        service = names[i % len(names)].decode()
        instance_id = f"i-{i:07d}"
        clock.advance(HEARTBEAT_STEP)
        t0 = perf()
        drive(registry.heartbeat(service, instance_id, token, None))
        timings.append(perf() - t0)
    timings.sort()

    # The stalls a median hides: a heap rebuild, a full collection.
    t0 = time.perf_counter()
    store._rebuild()
    rebuild_s = time.perf_counter() - t0
    gc.collect()
    t0 = time.perf_counter()
    gc.collect()
    gc_s = time.perf_counter() - t0
    return {
        "count": count,
        "rss_before": before,
        "rss_after": after,
        "token_bytes": token_bytes,
        "register_s": register_s,
        "parts": parts,
        "heap_entries": len(store._deadlines),
        "gc_tracked": tracked,
        "heartbeats": len(timings),
        "heartbeat_median_ns": timings[len(timings) // 2],
        "heartbeat_p99_ns": percentile(timings, 0.99),
        "heap_rebuild_s": rebuild_s,
        "gc_full_s": gc_s,
    }


def child_naive(count: int) -> dict[str, Any]:
    """Keep ``count`` records as parsed JSON dicts, a dict per service."""
    names = [n.decode() for n in service_names()]
    records = [naive_record(i, names[i % len(names)], START) for i in range(200)]
    warm: dict[str, dict[str, Any]] = {}
    for i, text in enumerate(records):
        warm.setdefault(names[i % len(names)], {})[f"i-{i:07d}"] = json.loads(text)
    del warm, records
    gc.collect()
    before = rss_bytes()
    store: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for i in range(count):
        service = names[i % len(names)]
        record = json.loads(naive_record(i, service, START + i * REGISTER_STEP))
        store.setdefault(record["service"], {})[record["id"]] = record
    build_s = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    return {"count": count, "rss_before": before, "rss_after": after, "build_s": build_s}


# etcd.


def etcd_binary() -> str | None:
    """The etcd binary, or None where it is not installed."""
    from tests.etcd_harness import EtcdNotFound, find_etcd

    try:
        return find_etcd()
    except EtcdNotFound:
        return None


def _request(port: int, path: bytes, document: dict[str, str]) -> bytes:
    payload = json.dumps(document, separators=(",", ":")).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path, port, len(payload), payload)
    )


def etcd_requests(port: int, indexes: range) -> Iterator[bytes]:
    """For each instance: grant its lease (with a chosen ID), then put its key on it."""
    names = [n.decode() for n in service_names()]
    for i in indexes:
        service = names[i % len(names)]
        lease = str(i + 1)
        key = ETCD_PREFIX + f"{service}/i-{i:07d}".encode()
        value = naive_record(i, service, START)
        yield _request(port, b"/v3/lease/grant", {"TTL": str(ETCD_LEASE_TTL), "ID": lease})
        yield _request(port, b"/v3/kv/put", {
            "key": base64.b64encode(key).decode(),
            "value": base64.b64encode(value).decode(),
            "lease": lease,
        })


@attrs.define
class _Connection:
    sock: socket.socket
    pending: Iterator[bytes]
    out: bytearray = attrs.Factory(bytearray)
    into: bytearray = attrs.Factory(bytearray)
    in_flight: int = 0
    exhausted: bool = False
    answered: int = 0


def etcd_load(port: int, count: int, patience: float) -> int:
    """Grant ``count`` leases and put a key on each; return how many requests succeeded.

    ``ETCD_CONNECTIONS`` keep-alive connections, each with up to
    ``ETCD_DEPTH`` requests pipelined; etcd answers them in order, so a put
    always follows its lease's grant. Raises `BenchError` on the first error
    answer, a lost connection or when ``patience`` runs out.
    """
    from bench.feed import parse_response

    deadline = time.monotonic() + patience
    selector = selectors.DefaultSelector()
    connections = []
    for n in range(min(ETCD_CONNECTIONS, count)):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(sock, etcd_requests(port, range(n, count, ETCD_CONNECTIONS)))
        connections.append(connection)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)
    open_connections = len(connections)
    try:
        while open_connections:
            if time.monotonic() > deadline:
                done = sum(c.answered for c in connections)
                raise BenchError(
                    f"the etcd load ran out of time ({patience:g} s) after {done} of "
                    f"{2 * count} requests"
                )
            for key, events in selector.select(1.0):
                c: _Connection = key.data
                if events & selectors.EVENT_READ:
                    data = c.sock.recv(1 << 18)
                    if not data:
                        raise BenchError("etcd closed a connection during the load")
                    c.into += data
                    _answers(c, parse_response)
                while c.in_flight < ETCD_DEPTH and not c.exhausted:
                    request = next(c.pending, None)
                    if request is None:
                        c.exhausted = True
                    else:
                        c.out += request
                        c.in_flight += 1
                if c.out:
                    try:
                        sent = c.sock.send(c.out)
                    except BlockingIOError:
                        sent = 0
                    del c.out[:sent]
                if c.exhausted and not c.in_flight and not c.out:
                    selector.unregister(c.sock)
                    c.sock.close()
                    open_connections -= 1
                    continue
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
                if wanted != key.events:
                    selector.modify(c.sock, wanted, c)
    finally:
        for c in connections:
            c.sock.close()
        selector.close()
    return sum(c.answered for c in connections)


def _answers(c: _Connection, parse_response: Callable[[bytearray], Any]) -> None:
    """Consume the whole answers in ``c.into``; raise on any that is not a success."""
    used = 0
    buffer = c.into
    while True:
        end = buffer.find(b"\r\n\r\n", used)
        if end < 0:
            break
        if buffer.startswith(b"HTTP/1.1 200 ", used):
            at = buffer.find(b"Content-Length: ", used, end)
            if at >= 0:
                length = int(buffer[at + 16:buffer.find(b"\r\n", at, end + 2)])
                if len(buffer) < end + 4 + length:
                    break
                if buffer.find(b'"error"', end + 4, end + 4 + length) >= 0:
                    refusal = bytes(buffer[end + 4:end + 4 + length])
                    raise BenchError(f"etcd refused a request: {refusal!r}")
                used = end + 4 + length
                c.in_flight -= 1
                c.answered += 1
                continue
        parsed = parse_response(buffer[used:])
        if parsed is None:
            break
        status, _, content, _ = parsed
        raise BenchError(f"etcd answered {status}: {content[:300]!r}")
    del buffer[:used]


def measure_etcd(count: int, report: Report) -> None:
    """Start one etcd member, load ``count`` leases and keys, and report its growth."""
    from bench.lease_checkpoint import accepts_flag
    from tests.etcd_harness import etcd_flags, start_cluster

    etcd = etcd_binary()
    assert etcd is not None
    flags = etcd_flags(etcd)
    if accepts_flag(etcd, "--unsafe-no-fsync"):
        flags.append("--unsafe-no-fsync")
    with tempfile.TemporaryDirectory(prefix="regdisc-bench-etcd-") as directory:
        cluster = start_cluster(Path(directory), size=1, flags=flags)
        [member] = cluster.members
        client_port = int(member.client_url.rsplit(":", 1)[1])
        try:
            assert member.process is not None
            pid = member.process.pid
            time.sleep(1.0)  # a fresh member is still allocating: let it settle for the baseline
            before = proc_status(pid)
            started = time.perf_counter()
            answered = etcd_load(client_port, count, ETCD_PATIENCE)
            load_s = time.perf_counter() - started
            time.sleep(2.0)  # let the Go runtime settle after the load
            after = proc_status(pid)
            held = _etcd_count(member)
            if held != count:
                raise BenchError(f"etcd holds {held} keys under the prefix, not {count}")
        finally:
            cluster.stop()
    lab = label(count)
    report.add(f"etcd_keys_{lab}", count, "keys",
               "keys loaded into one etcd member, each on a lease of its own")
    report.add(f"etcd_load_rate_{lab}", count / load_s, "keys/s",
               f"leases granted and keys put per second ({answered} requests in {load_s:.1f} s)")
    report.add(f"etcd_rss_per_key_{lab}", (after["VmRSS"] - before["VmRSS"]) / count, "B",
               "etcd VmRSS growth per lease+key (heap, raft log, bbolt pages)")
    report.add(f"etcd_anon_per_key_{lab}", (after["RssAnon"] - before["RssAnon"]) / count, "B",
               "etcd RssAnon growth per lease+key (its heap; not the bbolt mmap)")
    report.machine["etcd"] = etcd_version(etcd)
    report.machine["etcd_flags"] = " ".join(flags)


def _etcd_count(member: Any) -> int:
    key = ETCD_PREFIX
    end = key[:-1] + bytes([key[-1] + 1])
    answer = member._post("/v3/kv/range", {
        "key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode(),
        "count_only": True,
    }, timeout=30.0)
    return int(answer.get("count", 0))


def etcd_version(etcd: str) -> str:
    try:
        out = subprocess.run(
            [etcd, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].split(":", 1)[-1].strip() if out else "unknown"


# The run.


@attrs.frozen
class Options:
    sizes: list[int]
    reference: int
    heartbeats: int
    etcd_size: int | None
    """None: no etcd, as asked or because it is not installed."""
    timeout: float
    quick: bool


def options(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=(__doc__ or "").split("\n\n")[0]
    )
    add = parser.add_argument
    add("--sizes", type=sizes_arg, default=None, help="instances per run (100000,1000000)")
    add("--reference", type=int, default=None, help="the heartbeat reference size (10000)")
    add("--heartbeats", type=int, default=None, help="timed heartbeats per size (20000)")
    add("--etcd-size", type=int, default=None, help="leases+keys put into etcd (100000)")
    add("--no-etcd", action="store_true", help="skip etcd even where installed")
    add("--quick", action="store_true", help="10k instances, reference 1k: a few seconds")
    add("--timeout", type=float, default=None, help="seconds per subprocess (240; quick: 60)")
    args = parser.parse_args(argv)
    if args.quick:
        sizes, reference, heartbeats, etcd_size = [10_000], 1_000, 2_000, 10_000
    else:
        sizes, reference, heartbeats, etcd_size = [100_000, 1_000_000], 10_000, 20_000, 100_000
    sizes = args.sizes or sizes
    reference = args.reference or reference
    heartbeats = args.heartbeats or heartbeats
    etcd_size = args.etcd_size or etcd_size
    if min(reference, heartbeats, etcd_size) < 1:
        parser.error("--reference, --heartbeats and --etcd-size must be at least 1")
    if args.no_etcd or etcd_binary() is None:
        etcd_size = None
    return Options(
        sizes=sizes, reference=reference, heartbeats=heartbeats, etcd_size=etcd_size,
        timeout=args.timeout or (60.0 if args.quick else 240.0), quick=args.quick,
    )


def all_sizes(opts: Options) -> list[int]:
    return sorted({opts.reference, *opts.sizes})


def figure_names(opts: Options) -> list[str]:
    """Every figure a successful run with these options reports, in order."""
    names = []
    for n in all_sizes(opts):
        lab = label(n)
        names += [f"rss_per_instance_{lab}", f"counted_per_instance_{lab}",
                  f"naive_rss_per_instance_{lab}", f"ratio_to_naive_{lab}",
                  f"register_time_{lab}", f"heartbeat_median_{lab}", f"heartbeat_p99_{lab}"]
        if n != opts.reference:
            names.append(f"heartbeat_ratio_{lab}")
        names += [f"heap_rebuild_{lab}", f"gc_full_collection_{lab}", f"gc_tracked_{lab}"]
    names += [f"part_{part}" for part in PARTS]
    if opts.etcd_size is not None:
        lab = label(opts.etcd_size)
        names += [f"etcd_keys_{lab}", f"etcd_load_rate_{lab}", f"etcd_rss_per_key_{lab}",
                  f"etcd_anon_per_key_{lab}"]
        if opts.etcd_size in all_sizes(opts):
            names.append(f"etcd_ratio_to_regdisc_{lab}")
    return names


def run(opts: Options, report: Report) -> None:
    sizes = all_sizes(opts)
    medians: dict[int, float] = {}
    regdisc_bytes: dict[int, float] = {}
    largest_parts: dict[str, float] = {}
    for n in sizes:
        lab = label(n)
        answer = run_child("bench.memory", [
            "regdisc", "--count", str(n), "--heartbeats", str(opts.heartbeats),
        ], opts.timeout)
        naive = run_child("bench.memory", ["naive", "--count", str(n)], opts.timeout)
        ours = (answer["rss_after"] - answer["rss_before"] - answer["token_bytes"]) / n
        theirs = (naive["rss_after"] - naive["rss_before"]) / n
        regdisc_bytes[n] = ours
        counted = sum(answer["parts"].values())
        report.add(f"rss_per_instance_{lab}", ours, "B",
                   f"VmRSS growth per instance, {n:,} registered through the Registry "
                   "(aim: <= 1024)")
        report.add(f"counted_per_instance_{lab}", counted, "B",
                   "sys.getsizeof count per instance, allocator classes included (no tracemalloc)")
        report.add(f"naive_rss_per_instance_{lab}", theirs, "B",
                   "VmRSS growth per record of a dict of parsed JSON dicts, same records")
        if theirs <= 0:
            report.problems.append(f"the naive store did not grow VmRSS at {n:,}")
        report.add(f"ratio_to_naive_{lab}", ours / theirs if theirs > 0 else 0.0, "x",
                   "regdisc's bytes per instance / the naive store's")
        report.add(f"register_time_{lab}", answer["register_s"] / n * 1e6, "us",
                   "per registration, JSON parse + validation + Registry.register")
        medians[n] = answer["heartbeat_median_ns"] / 1000
        report.add(f"heartbeat_median_{lab}", medians[n], "us",
                   f"median Registry.heartbeat over {answer['heartbeats']:,} calls, "
                   "random instances")
        report.add(f"heartbeat_p99_{lab}", answer["heartbeat_p99_ns"] / 1000, "us",
                   "99th percentile of the same")
        if n != opts.reference:
            report.add(f"heartbeat_ratio_{lab}", medians[n] / medians[opts.reference], "x",
                       f"median heartbeat at {lab} / at {label(opts.reference)} (aim: ~1)")
        report.add(f"heap_rebuild_{lab}", answer["heap_rebuild_s"] * 1000, "ms",
                   "rebuilding the deadline heap, done by the heartbeat that finds it 4x too big")
        report.add(f"gc_full_collection_{lab}", answer["gc_full_s"] * 1000, "ms",
                   "one full garbage collection with the store loaded (a stall, now and then)")
        report.add(f"gc_tracked_{lab}", answer["gc_tracked"], "objects",
                   "objects the garbage collector tracks, process-wide")
        largest_parts = answer["parts"]
    for part, meaning in PARTS.items():
        report.add(f"part_{part}", largest_parts.get(part, 0.0), "B/inst",
                   f"{meaning} (at {label(sizes[-1])})")
    if opts.etcd_size is not None:
        biggest = max(opts.sizes)
        if opts.etcd_size < biggest:
            report.notes.append(
                f"etcd measured at {opts.etcd_size:,} leases+keys only, not {biggest:,}: "
                "the load needs two requests per key through the JSON gateway "
                "(see etcd_load_rate for how long the larger size would take)"
            )
        measure_etcd(opts.etcd_size, report)
        lab = label(opts.etcd_size)
        if opts.etcd_size in regdisc_bytes:
            etcd_bytes = report.value(f"etcd_rss_per_key_{lab}")
            report.add(f"etcd_ratio_to_regdisc_{lab}",
                       float(etcd_bytes or 0) / regdisc_bytes[opts.etcd_size], "x",
                       "etcd's bytes per lease+key / regdisc's per instance")
    else:
        report.notes.append("etcd is not installed (or --no-etcd): no etcd figures")


def child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory --child")
    parser.add_argument("kind", choices=("regdisc", "naive"))
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--heartbeats", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.kind == "regdisc":
        child_answer(child_regdisc(args.count, args.heartbeats, args.seed))
    else:
        child_answer(child_naive(args.count))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    opts = options(argv)
    report = Report(BENCH, machine(), title="regdisc memory benchmark")
    report.machine["sizes"] = all_sizes(opts)
    try:
        run(opts, report)
    except BenchError as e:
        report.problems.append(str(e))
    except Exception:
        report.problems.append(traceback.format_exc())
    print(report.render(), flush=True)
    return report.exit_status()


if __name__ == "__main__":
    raise SystemExit(main())
