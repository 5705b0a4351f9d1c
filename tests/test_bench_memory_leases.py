"""The memory and lease-manager benchmarks run at their quick sizes and report every figure.

No timing or size is asserted: only that each run ends with status 0 and
prints one numeric JSON line per figure it promises.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import leases, memory

ROOT = Path(__file__).resolve().parent.parent


def quick(module: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )


@pytest.fixture(scope="module")
def memory_run() -> subprocess.CompletedProcess[str]:
    return quick("bench.memory")


@pytest.fixture(scope="module")
def leases_run() -> subprocess.CompletedProcess[str]:
    return quick("bench.leases")


def figures(output: str, bench: str) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    found: dict[str, dict[str, Any]] = {}
    for line in lines:
        if "figure" in line:
            assert line["bench"] == bench, line
            assert line["figure"] not in found, f"{line['figure']} reported twice"
            found[line["figure"]] = line
    return found


def check_figures(run: subprocess.CompletedProcess[str], bench: str, expected: list[str]) -> None:
    found = figures(run.stdout, bench)
    assert sorted(found) == sorted(expected), run.stdout + run.stderr
    for line in found.values():
        value = line["value"]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), line
        assert math.isfinite(value), line
        assert isinstance(line["unit"], str) and line["unit"], line


def test_memory_quick_run_exits_zero(memory_run: subprocess.CompletedProcess[str]) -> None:
    assert memory_run.returncode == 0, memory_run.stdout + memory_run.stderr


def test_memory_quick_run_prints_every_figure_as_a_number(
    memory_run: subprocess.CompletedProcess[str],
) -> None:
    """Every figure, the etcd ones too where etcd is installed."""
    expected = memory.figure_names(memory.options(["--quick"]))
    assert "rss_per_instance_10k" in expected and "heartbeat_ratio_10k" in expected
    check_figures(memory_run, "memory", expected)


def test_memory_quick_run_names_the_machine(memory_run: subprocess.CompletedProcess[str]) -> None:
    [machine] = [
        json.loads(line)["machine"] for line in memory_run.stdout.splitlines()
        if line.startswith('{"bench": "memory", "machine"')
    ]
    assert {"nproc", "cpu_model", "python", "twisted"} <= set(machine)


def test_leases_quick_run_exits_zero(leases_run: subprocess.CompletedProcess[str]) -> None:
    assert leases_run.returncode == 0, leases_run.stdout + leases_run.stderr


def test_leases_quick_run_prints_every_figure_as_a_number(
    leases_run: subprocess.CompletedProcess[str],
) -> None:
    expected = leases.figure_names(leases.options(["--quick"]))
    assert "idle_run_ratio" in expected and "expiry_stall_1000" in expected
    check_figures(leases_run, "leases", expected)


def test_leases_quick_run_evicts_every_instance(
    leases_run: subprocess.CompletedProcess[str],
) -> None:
    """Each mass expiry emptied the store, in whole batches but the last."""
    found = figures(leases_run.stdout, "leases")
    for batch in (250, 1000, 4000):
        assert found[f"expiry_slices_{batch}"]["value"] == math.ceil(10_000 / batch)


def test_sizes_are_labelled_for_figure_names() -> None:
    assert [memory.label(n) for n in (1_000_000, 100_000, 10_000, 1_000, 1_500)] == [
        "1m", "100k", "10k", "1k", "1500",
    ]


def test_a_failed_run_exits_two() -> None:
    report = memory.Report("memory", {}, title="t")
    report.add("x", 1.23456, "B", "a figure")
    assert report.exit_status() == 0
    assert report.figures[0].to_json() == {
        "bench": "memory", "figure": "x", "value": 1.235, "unit": "B",
    }
    report.problems.append("a child ran out of time")
    assert report.exit_status() == 2
