"""The lease-checkpoint benchmark runs with a short TTL and reports every figure; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.lease_checkpoint import ELECTION_FIGURES, figure_names, modes
from tests.etcd_harness import find_etcd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.lease_checkpoint", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def figures(output: str) -> dict[str, dict[str, Any]]:
    return {line["figure"]: line for line in lines(output) if "figure" in line}


def test_quick_run_exits_zero(quick_run: subprocess.CompletedProcess[str]) -> None:
    """A quick run against real 3-member clusters ends with status 0."""
    assert quick_run.returncode == 0, quick_run.stdout + quick_run.stderr


def test_quick_run_prints_every_figure_as_a_number(
    quick_run: subprocess.CompletedProcess[str],
) -> None:
    """Each figure of each mode this etcd can run has one JSON line with a number and its unit."""
    expected = figure_names(modes(find_etcd()))
    found = figures(quick_run.stdout)
    assert sorted(found) == sorted(expected), quick_run.stdout + quick_run.stderr
    for name, line in found.items():
        assert line["bench"] == "lease_checkpoint"
        value = line["value"]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), line
        suffix = next(s for s in ELECTION_FIGURES if name.endswith("_" + s))
        assert line["unit"] == ELECTION_FIGURES[suffix][0]


def test_quick_run_modes_cover_checkpointing_off_and_on(
    quick_run: subprocess.CompletedProcess[str],
) -> None:
    """The settings line names the TTL and both modes, with and without the checkpoint flag."""
    [settings] = [line["settings"] for line in lines(quick_run.stdout) if "settings" in line]
    assert settings["ttl"] == 3
    flags = settings["modes"]
    assert "--experimental-enable-lease-checkpoint" not in flags["checkpoint_off"]
    assert "--experimental-enable-lease-checkpoint" in flags["checkpoint_on"]
    found = figures(quick_run.stdout)
    assert found["checkpoint_off_expected_expiry"]["value"] == 3
