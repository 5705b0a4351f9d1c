"""The lease manager: runs that evict nothing at scale, and a mass expiry on the real reactor.

Run from the checkout::

    python -m bench.leases [--sizes 10000,100000,1000000] [--expiry 100000]
                           [--batches 250,1000,4000] [--quick]

Every measurement runs in a fresh Python subprocess.

1. *Runs that evict nothing*, for each of ``--sizes``: a `MemoryStore` holds
   that many registrations (TTL 30 s, registered over 10 s, so their
   deadlines spread over 10 s), and a `LeaseService` on a
   `twisted.internet.task.Clock` runs its sweep by hand:

   * *idle*: nothing is due; the median of 1,000 runs, and the ratio of the
     largest size's to the smallest's (aim: under 1 ms, independent of the
     count);
   * *steady*: every instance has sent one heartbeat 10 s after registering
     (the rate of instances that heartbeat every TTL/3), which leaves its
     first deadline stale in the heap; a run one second after the first of
     those stale deadlines pops the second's worth of them (a tenth of the
     count) and evicts nothing. The median of three consecutive runs, and the
     stale entries each popped. This is the run the lease manager makes every
     second in a steady state with heartbeats.

2. *Mass expiry*, for each of ``--batches``: a `MemoryStore` holds
   ``--expiry`` registrations that all expire at the same moment, a few
   seconds ahead; the real `LeaseService` (interval 1 s, the daemon's
   default, the constructor's ``batch``) runs on the real reactor, logging to a
   file as the daemon does (text, level info), beside a `LoopingCall` every
   1 ms that records the longest gap between its ticks. Figures: from the
   expiry moment until the store is empty (which includes waiting for the
   next run, up to 1 s), from the first evicting slice to the last, the
   longest reactor stall meanwhile (the longest tick gap; aim: under 50 ms),
   the longest slice, the slices, and the CPU per evicted instance. Once more
   at batch 1,000 with logging at ``warn``, to show what the per-instance log
   line costs.

Output: the machine, a table, notes, then one JSON line per figure::

    {"bench": "leases", "figure": "expiry_stall_1000", "value": 31.2, "unit": "ms"}

No figure is asserted. The exit status is 2 when something could not be
measured (a subprocess failed or ran out of time, the store was not emptied),
else 0.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sys
import tempfile
import time
import traceback
from pathlib import Path
from statistics import median
from typing import Any, Sequence

import attrs

from bench.memory import (
    BenchError,
    Report,
    child_answer,
    label,
    machine,
    quiet_logging,
    run_child,
    sizes_arg,
)

BENCH = "leases"

TTL = 30
SPREAD = 10.0
"""Registrations are spread over this many seconds; heartbeats come this long after."""
INTERVAL = 1.0
"""The lease manager's interval: the daemon's default REGDISC_CLEANUP_INTERVAL."""
IDLE_RUNS = 1_000
STEADY_RUNS = 3
TICK = 0.001
"""The stall detector's LoopingCall interval, in seconds."""
LEAD = 1.5
"""Seconds between the end of the fill and the mass expiry, at the least."""
GIVE_UP = 60.0
"""The longest a mass expiry may take to empty the store once it is due."""
NOLOG_BATCH = 1000


def registrations(count: int, start: float, spread: float, ttl: float,
                  expires_at: float | None = None) -> Any:
    """``count`` registrations as the Registry makes them, spread over ``spread`` seconds."""
    from regdisc.model import Credentials, Instance, Registration

    for i in range(count):
        now = start + spread * i / count
        service = f"svc-{i % 1000:04d}"
        instance = Instance(
            service=service,
            id=f"i-{i:07d}",
            host=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
            port=8000 + i % 1000,
            status="up",
            metadata={"zone": "eu-1", "version": "1.2.3"},
            tags=("web", "canary"),
            ttl=int(ttl),
            registered_at=now,
            last_heartbeat_at=now,
            expires_at=now + ttl if expires_at is None else expires_at,
        )
        credentials = Credentials(hashlib.sha256(b"%d" % i).digest(), now + 3600, None)
        yield now, Registration(instance, credentials)


def child_runs(count: int) -> dict[str, Any]:
    """Idle and steady lease-manager runs over ``count`` registrations, on a Clock."""
    quiet_logging()
    from twisted.internet.task import Clock

    from regdisc.lease import LeaseService
    from regdisc.store import MemoryStore

    clock = Clock()
    store = MemoryStore()
    service = LeaseService(store, clock, INTERVAL)
    start = 1_700_000_000.0
    clock.advance(start)
    stored = []
    for now, registration in registrations(count, start, SPREAD, TTL):
        stored.append(store.create(registration, now).result)
    perf = time.perf_counter_ns

    def timed_runs(at: float, runs: int) -> list[int]:
        clock.advance(at - clock.seconds())
        times = []
        for _ in range(runs):
            before = len(store)
            t0 = perf()
            service.sweep()
            times.append(perf() - t0)
            if len(store) != before:
                raise BenchError("a run that should evict nothing evicted")
        return times

    # Idle: the earliest deadline is start + TTL.
    idle = timed_runs(start + TTL - 0.5, IDLE_RUNS)
    # One heartbeat each, SPREAD seconds after registering: the first deadlines go stale.
    for registration in stored:
        instance = registration.instance
        store.renew(registration, instance.registered_at + SPREAD)
    del stored
    heap_after_heartbeats = len(store._deadlines)
    idle_after = timed_runs(start + TTL - 0.5, IDLE_RUNS)
    # Steady: at TTL the first stale deadline is due; each later second brings
    # a second's worth of them (count / SPREAD).
    timed_runs(start + TTL, 1)
    steady = []
    popped = []
    for k in range(1, STEADY_RUNS + 1):
        entries = len(store._deadlines)
        steady += timed_runs(start + TTL + k * INTERVAL, 1)
        popped.append(entries - len(store._deadlines))
    if len(store) != count:
        raise BenchError(f"the store holds {len(store)} registrations, not {count}")
    gc.collect()
    return {
        "count": count,
        "idle_median_ns": median(idle),
        "idle_max_ns": max(idle),
        "idle_after_heartbeats_median_ns": median(idle_after),
        "heap_after_heartbeats": heap_after_heartbeats,
        "steady_median_ns": median(steady),
        "steady_popped": median(popped),
    }


def child_expiry(count: int, batch: int, level: str, log_path: str) -> dict[str, Any]:
    """A mass expiry of ``count`` registrations under the real LeaseService and reactor."""
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import LogLevel, globalLogBeginner

    from regdisc.lease import LeaseService
    from regdisc.logs import make_observer
    from regdisc.store import MemoryStore

    log_file = open(log_path, "w", encoding="utf-8")
    globalLogBeginner.beginLoggingTo(
        [make_observer("text", LogLevel.levelWithName(level), log_file)],
        discardBuffer=True, redirectStandardIO=False,
    )
    store = MemoryStore()
    # Time the fill on a few first, to set the expiry just far enough ahead.
    probe = MemoryStore()
    t0 = time.perf_counter()
    for now, registration in registrations(1000, time.time(), 0.0, TTL):
        probe.create(registration, now)
    per = (time.perf_counter() - t0) / 1000
    del probe
    expires_at = time.time() + LEAD + 2.0 * per * count
    filled_from = time.time()
    for now, registration in registrations(count, filled_from, 0.0, TTL, expires_at):
        store.create(registration, now)
    gc.collect()
    if time.time() > expires_at - 0.5:
        raise BenchError("filling the store took longer than planned: the expiry came too soon")

    service = LeaseService(store, reactor, INTERVAL, batch=batch)
    # (start, duration, evicted, CPU time), perf_counter and thread_time
    slices: list[tuple[float, float, int, float]] = []
    evict = store.evict_expired

    def counted_evict(now: float, limit: int) -> list[Any]:
        evicted = evict(now, limit)
        if evicted:
            slices.append((time.perf_counter(), 0.0, len(evicted), 0.0))
        return evicted

    store.evict_expired = counted_evict  # type: ignore[method-assign]
    # A slice lasts from the eviction to the end of its log lines: time the
    # service's slice, which does both, where it can be found.
    inner = getattr(service, "_slice", None)
    if inner is not None:
        def timed_slice(*args: Any) -> None:
            t0, c0 = time.perf_counter(), time.thread_time()
            n = len(slices)
            inner(*args)
            if len(slices) > n:
                evicted = slices[-1][2]
                slices[-1] = (t0, time.perf_counter() - t0, evicted, time.thread_time() - c0)
        service._slice = timed_slice  # type: ignore[method-assign]

    state: dict[str, Any] = {
        "last": None, "idle_gap": 0.0, "drain_gap": 0.0, "gone": None, "due": None,
        "ticks": 0, "stopping": False,
    }
    expiry_perf = time.perf_counter() + (expires_at - time.time())

    def tick() -> None:
        now = time.perf_counter()
        last = state["last"]
        state["last"] = now
        state["ticks"] += 1
        if last is not None:
            gap = now - last
            if now < expiry_perf:
                state["idle_gap"] = max(state["idle_gap"], gap)
            elif state["gone"] is None:
                state["drain_gap"] = max(state["drain_gap"], gap)
        if state["stopping"]:
            return
        if now >= expiry_perf and state["gone"] is None and len(store) == 0:
            state["gone"] = now
            state["stopping"] = True
            reactor.callLater(0.05, reactor.stop)
        elif now > expiry_perf + GIVE_UP:
            state["stopping"] = True
            reactor.stop()

    ticker = LoopingCall(tick)

    def begin() -> None:
        ticker.start(TICK, now=True)
        service.startService()

    reactor.callWhenRunning(begin)
    reactor.run()
    service.stopService()
    log_file.close()
    if state["gone"] is None:
        raise BenchError(f"{len(store)} of {count} instances were still held {GIVE_UP:g} s "
                         "after they expired")
    evicted = sum(s[2] for s in slices)
    if evicted != count:
        raise BenchError(f"{evicted} evicted, not {count}")
    first, last = slices[0], slices[-1]
    return {
        "count": count,
        "batch": batch,
        "level": level,
        "gone_after_expiry_s": state["gone"] - expiry_perf,
        "first_slice_after_expiry_s": first[0] - expiry_perf,
        "drain_s": last[0] + last[1] - first[0],
        "drain_gap_s": state["drain_gap"],
        "idle_gap_s": state["idle_gap"],
        "slice_max_s": max(s[1] for s in slices),
        "slice_median_s": median(s[1] for s in slices),
        "slice_sum_s": sum(s[1] for s in slices),
        "slice_cpu_s": sum(s[3] for s in slices),
        "slices": len(slices),
        "ticks": state["ticks"],
        "log_bytes": Path(log_path).stat().st_size,
    }


# The run.


@attrs.frozen
class Options:
    sizes: list[int]
    expiry: int
    batches: list[int]
    timeout: float
    quick: bool


def options(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.leases", description=(__doc__ or "").split("\n\n")[0]
    )
    add = parser.add_argument
    add("--sizes", type=sizes_arg, default=None,
        help="registrations for the runs that evict nothing (10000,100000,1000000)")
    add("--expiry", type=int, default=None, help="instances that expire at once (100000)")
    add("--batches", type=sizes_arg, default=None, help="batch sizes to try (250,1000,4000)")
    add("--quick", action="store_true", help="sizes 1k and 10k, expiry of 10k: a few seconds")
    add("--timeout", type=float, default=None, help="seconds per subprocess (180; quick: 60)")
    args = parser.parse_args(argv)
    if args.quick:
        sizes, expiry = [1_000, 10_000], 10_000
    else:
        sizes, expiry = [10_000, 100_000, 1_000_000], 100_000
    batches = args.batches or [250, 1000, 4000]
    expiry = args.expiry or expiry
    if expiry < 1:
        parser.error("--expiry must be at least 1")
    return Options(
        sizes=args.sizes or sizes, expiry=expiry, batches=batches,
        timeout=args.timeout or (60.0 if args.quick else 180.0), quick=args.quick,
    )


def figure_names(opts: Options) -> list[str]:
    """Every figure a successful run with these options reports, in order."""
    names = []
    for n in opts.sizes:
        lab = label(n)
        names += [f"idle_run_{lab}", f"idle_run_max_{lab}", f"idle_run_heartbeats_{lab}",
                  f"steady_run_{lab}", f"steady_popped_{lab}"]
    names += ["idle_run_ratio", "steady_run_ratio"]
    for b in opts.batches:
        names += [f"expiry_gone_{b}", f"expiry_first_slice_{b}", f"expiry_drain_{b}",
                  f"expiry_stall_{b}", f"expiry_slice_max_{b}", f"expiry_slice_median_{b}",
                  f"expiry_slices_{b}",
                  f"expiry_cost_{b}", f"expiry_idle_gap_{b}"]
    names += ["expiry_stall_nolog", "expiry_drain_nolog", "expiry_cost_nolog"]
    return names


def run(opts: Options, report: Report) -> None:
    idle: dict[int, float] = {}
    steady: dict[int, float] = {}
    for n in opts.sizes:
        lab = label(n)
        a = run_child("bench.leases", ["runs", "--count", str(n)], opts.timeout)
        idle[n] = a["idle_median_ns"] / 1000
        steady[n] = a["steady_median_ns"] / 1e6
        report.add(f"idle_run_{lab}", idle[n], "us",
                   f"median lease-manager run, nothing due, {n:,} held (aim: < 1000)")
        report.add(f"idle_run_max_{lab}", a["idle_max_ns"] / 1000, "us",
                   f"slowest of {IDLE_RUNS:,} such runs")
        report.add(f"idle_run_heartbeats_{lab}", a["idle_after_heartbeats_median_ns"] / 1000, "us",
                   f"the same after one heartbeat each (heap of {a['heap_after_heartbeats']:,})")
        report.add(f"steady_run_{lab}", steady[n], "ms",
                   "median run one second into the stale deadlines heartbeats left: evicts "
                   "nothing, one reactor turn")
        report.add(f"steady_popped_{lab}", int(a["steady_popped"]), "entries",
                   "stale heap entries such a run pops (count / 10)")
    small, large = opts.sizes[0], opts.sizes[-1]
    report.add("idle_run_ratio", idle[large] / idle[small], "x",
               f"idle run at {label(large)} / at {label(small)} (aim: ~1)")
    report.add("steady_run_ratio", steady[large] / steady[small], "x",
               f"steady run at {label(large)} / at {label(small)}")
    with tempfile.TemporaryDirectory(prefix="regdisc-bench-leases-") as directory:
        runs = [(b, "info", str(b)) for b in opts.batches] + [(NOLOG_BATCH, "warn", "nolog")]
        for batch, level, suffix in runs:
            a = run_child("bench.leases", [
                "expiry", "--count", str(opts.expiry), "--batch", str(batch), "--level", level,
                "--log", str(Path(directory) / f"expiry-{suffix}.log"),
            ], opts.timeout)
            n = a["count"]
            cost = a["slice_cpu_s"] / n * 1e6
            if suffix == "nolog":
                report.add("expiry_stall_nolog", a["drain_gap_s"] * 1000, "ms",
                           f"longest stall, batch {batch}, logging at warn (no line per eviction)")
                report.add("expiry_drain_nolog", a["drain_s"], "s",
                           "first evicting slice to last, the same")
                report.add("expiry_cost_nolog", cost, "us",
                           "CPU per evicted instance, the same")
                continue
            report.add(f"expiry_gone_{batch}", a["gone_after_expiry_s"], "s",
                       f"{n:,} expired at once, batch {batch}: until none is held "
                       f"(waits for the next 1 s run)")
            report.add(f"expiry_first_slice_{batch}", a["first_slice_after_expiry_s"], "s",
                       "from the expiry to the first evicting slice (the timer's phase)")
            report.add(f"expiry_drain_{batch}", a["drain_s"], "s",
                       "from the first evicting slice to the end of the last")
            report.add(f"expiry_stall_{batch}", a["drain_gap_s"] * 1000, "ms",
                       f"longest gap between {TICK * 1000:g} ms ticks meanwhile (aim: < 50)")
            report.add(f"expiry_slice_max_{batch}", a["slice_max_s"] * 1000, "ms",
                       "longest slice: evictions, change feed and their log lines")
            report.add(f"expiry_slice_median_{batch}", a["slice_median_s"] * 1000, "ms",
                       "median slice (less noisy than the longest on a shared machine)")
            report.add(f"expiry_slices_{batch}", a["slices"], "slices",
                       "reactor turns that evicted")
            report.add(f"expiry_cost_{batch}", cost, "us",
                       "CPU per evicted instance (thread CPU time in slices / count), "
                       "logging at info")
            report.add(f"expiry_idle_gap_{batch}", a["idle_gap_s"] * 1000, "ms",
                       "longest tick gap before the expiry: the detector's own jitter")


def child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.leases --child")
    parser.add_argument("kind", choices=("runs", "expiry"))
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--level", default="info")
    parser.add_argument("--log", default="/dev/null")
    args = parser.parse_args(argv)
    if args.kind == "runs":
        child_answer(child_runs(args.count))
    else:
        child_answer(child_expiry(args.count, args.batch, args.level, args.log))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    opts = options(argv)
    report = Report(BENCH, machine(), title="regdisc lease-manager benchmark")
    report.machine["sizes"] = opts.sizes
    report.machine["expiry"] = opts.expiry
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
