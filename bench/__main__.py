"""Every benchmark of regdisc in one run: ``python -m bench [--quick]``.

Runs the network scenarios of `bench.scenarios` (the load generator's
ceiling, heartbeats, discovery reads, registrations and rotations, new TLS
connections, the etcd store), then `bench.feed`, `bench.memory` and
`bench.leases`, each through its ``main([...])`` in a fresh interpreter (each
runs its own reactor and places its own processes). Prints the machine, each
part's table as it ends, a summary table, then one JSON line per figure::

    {"bench": "heartbeats", "figure": "vs_bare", "value": 0.83, "unit": "ratio"}

A comparison whose tool is not installed (nginx, ab, etcd) has ``"value":
null`` and a ``"skipped"`` reason; nothing is installed by the benchmark.
Each part is bounded in time; the whole takes a few minutes at full size on
two cores, and well under a minute with ``--quick`` (tiny sizes, half-second
windows). The exit status is 0 when every part ran cleanly, 1 when a part
reported a broken correctness property (its own status 1), else 2 if anything
went wrong. No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from .harness import (
    ROOT,
    BenchError,
    CpuSnapshot,
    Report,
    cpu_placement,
    machine,
    make_material,
    raise_nofile,
)
from .scenarios import SCENARIOS, Sizes, run_scenarios

SUBBENCHES = {"feed": "bench.feed", "memory": "bench.memory", "leases": "bench.leases"}
"""The other benchmarks, by part name: modules with ``main(argv) -> int``."""

PARTS = (*SCENARIOS, *SUBBENCHES)

BUDGET = {False: 570.0, True: 150.0}
"""Seconds the whole suite may take, at full size and with ``--quick``."""

PART_LIMIT = {False: 330.0, True: 90.0}
"""Seconds one of the other benchmarks may take (each also bounds itself)."""

_CALL_MAIN = """\
import importlib, sys, traceback
try:
    module = importlib.import_module(sys.argv[1])
except ModuleNotFoundError as e:
    if e.name != sys.argv[1]:
        raise
    print(f"{sys.argv[1]} does not exist")
    sys.exit(3)
try:
    status = module.main(sys.argv[2:])
except Exception:
    traceback.print_exc(file=sys.stdout)
    status = 2
sys.exit(status)
"""
"""Imports a part and calls its ``main``; an exception exits 2, not Python's 1 (a broken property)."""


@attrs.define
class Outcome:
    """How a part ended."""

    status: int
    seconds: float
    output: str = ""


def run_subbench(
    module: str, args: Sequence[str], limit: float, cpus: set[int] | None
) -> Outcome:
    """``module.main(args)`` in a fresh interpreter, on all of ``cpus``, within ``limit`` seconds.

    Past the limit it gets SIGINT (the reactor stops and its ``finally``
    blocks stop its servers), then SIGKILL.
    """
    def prepare() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", _CALL_MAIN, module, *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=prepare, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        output += f"\n(stopped after {limit:g} s)"
        return Outcome(-1, time.monotonic() - started, output)
    return Outcome(process.returncode, time.monotonic() - started, output)


def split_output(output: str) -> tuple[list[str], list[dict[str, object]]]:
    """A part's human lines and its JSON lines."""
    text, objects = [], []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                objects.append(json.loads(line))
                continue
            except ValueError:
                pass
        text.append(line)
    return text, objects


def options(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and half-second windows: well under a minute")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, in this order: {','.join(PARTS)}")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of each measurement window (5; quick: 0.3)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write a cProfile of the (memory-store) registry to this file (it slows the "
                        "registry: its figures are then not comparable)")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown parts: {', '.join(unknown)} (known: {', '.join(PARTS)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = options(sys.argv[1:] if argv is None else argv)
    began = time.monotonic()
    budget = BUDGET[args.quick]
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.duration is not None:
        sizes = attrs.evolve(sizes, duration=args.duration)
    nofile = raise_nofile()
    all_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    server_cpus, load_cpus = cpu_placement()
    report = Report(machine(
        min(server_cpus) if server_cpus else "any", min(load_cpus) if load_cpus else "any", nofile
    ))
    m = report.machine
    print(
        f"regdisc benchmarks on {m['cpu_model']} ({m['nproc']} CPUs), kernel {m['kernel']}, "
        f"Python {m['python']}, Twisted {m['twisted']}, Klein {m['klein']}, {m['openssl']}; "
        f"generator on {m['generator_openssl']}; nginx {m['nginx']}, ab {m['ab']}, etcd {m['etcd']}",
        flush=True,
    )
    print(
        f"servers pinned to CPU {m['server_cpu']}, load generator to CPU {m['load_cpu']}; "
        f"{'quick' if args.quick else 'full'} sizes: {sizes.instances:,} instances, "
        f"{sizes.connections} connections, windows of {sizes.duration:g} s after {sizes.warmup:g} s",
        flush=True,
    )
    outcomes: dict[str, Outcome] = {}
    extra_json: list[dict[str, object]] = []

    def progress(line: str) -> None:
        print(f"  {line} ({time.monotonic() - began:.0f} s in)", file=sys.stderr, flush=True)

    ours = [part for part in args.parts if part in SCENARIOS]
    if ours:
        started = time.monotonic()
        before = CpuSnapshot.take()
        try:
            with tempfile.TemporaryDirectory(prefix="regdisc-bench-") as directory:
                if load_cpus is not None:
                    os.sched_setaffinity(0, load_cpus)
                try:
                    material = make_material(Path(directory))
                    took = run_scenarios(
                        Path(directory), material, server_cpus, sizes, report, ours,
                        profile=args.profile, progress=progress, deadline=began + budget / 2,
                    )
                finally:
                    if all_cpus is not None:
                        os.sched_setaffinity(0, all_cpus)
            for part, (seconds, problems) in took.items():
                outcomes[part] = Outcome(2 if problems else 0, seconds)
        except BenchError as e:
            report.problems.append(str(e))
        except Exception:
            import traceback

            report.problems.append(traceback.format_exc())
        others, steal, wall, busiest = CpuSnapshot.take().others_since(before)
        cpus = len(all_cpus) if all_cpus else (os.cpu_count() or 1)
        named = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in busiest)
        note = (
            f"while the network scenarios ran ({wall:.0f} s), other user processes used "
            f"{others:.1f} CPU-seconds ({100 * others / max(wall * cpus, 1e-9):.0f} % of the "
            f"{cpus} CPUs{'; busiest: ' + named if named else ''}) and the host stole {steal:.1f}"
        )
        if others > 0.1 * wall * cpus:
            note += ": the figures are disturbed, run again on a quiet machine"
        report.notes.append(note)
        report.machine["others_cpu_seconds"] = round(others, 1)
        report.machine["steal_cpu_seconds"] = round(steal, 1)
        print("\n" + report.table(), flush=True)
        for problem in report.problems:
            print(f"PROBLEM: {problem}", flush=True)
        ours_seconds = time.monotonic() - started
        progress(f"network scenarios: {ours_seconds:.1f} s")

    for part in (p for p in args.parts if p in SUBBENCHES):
        remaining = budget - (time.monotonic() - began)
        if remaining < 10:
            report.problems.append(f"{part}: not run, the suite's {budget:g} s were spent")
            outcomes[part] = Outcome(2, 0.0)
            continue
        progress(f"{part}...")
        outcome = run_subbench(
            SUBBENCHES[part], ["--quick"] if args.quick else [],
            min(PART_LIMIT[args.quick], remaining), all_cpus,
        )
        outcomes[part] = outcome
        text, objects = split_output(outcome.output)
        print(f"\n== {SUBBENCHES[part]} (exit {outcome.status}, {outcome.seconds:.1f} s) ==", flush=True)
        print("\n".join(text), flush=True)
        found = 0
        for line in objects:
            if "figure" in line:
                found += 1
                value = line.get("value")
                report.add(
                    str(line.get("bench", part)), str(line["figure"]),
                    value if isinstance(value, (int, float)) and not isinstance(value, bool) else None,
                    str(line.get("unit", "")), f"see {SUBBENCHES[part]} above",
                    skipped=line.get("skipped") if value is None else None,  # type: ignore[arg-type]
                )
            else:
                extra_json.append(line)
        if outcome.status != 0:
            report.problems.append(f"{part}: {SUBBENCHES[part]} exited with status {outcome.status}")
        elif not found:
            report.problems.append(f"{part}: {SUBBENCHES[part]} printed no figure")
        progress(f"{part}: {outcome.seconds:.1f} s")

    print("\n== summary ==")
    print(report.table())
    for note in report.notes:
        print(f"NOTE: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print(f"suite took {time.monotonic() - began:.1f} s")
    print()
    print(json.dumps({"bench": "suite", "machine": report.machine}))
    for line in extra_json:
        print(json.dumps(line))
    for part, outcome in outcomes.items():
        print(json.dumps({"bench": "suite", "part": part, "status": outcome.status,
                          "seconds": round(outcome.seconds, 1)}))
    for line in report.json_lines():
        print(line)
    sys.stdout.flush()
    if any(outcome.status == 1 for outcome in outcomes.values()):
        return 1
    return 2 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
