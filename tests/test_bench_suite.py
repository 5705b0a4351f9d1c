"""``python -m bench --quick`` runs every benchmark and reports every figure; no timing is asserted.

The comparisons with nginx, ab and etcd may be skipped where those are not
installed (scripts/run-tests installs none of nginx and ab), but then only
with an explicit reason; the registry's own figures are always numbers.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import PARTS, SUBBENCHES, split_output
from bench.harness import Report, find_tool, ratio
from bench.http_load import Result, parse_answer, percentile, request
from bench.scenarios import FIGURES, SCENARIOS, _prefix_end, _spread

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )


def json_lines(output: str) -> list[dict[str, Any]]:
    return split_output(output)[1]


def figures(output: str) -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for line in json_lines(output):
        if "figure" in line:
            key = (line["bench"], line["figure"])
            assert key not in found, f"{key} reported twice"
            found[key] = line
    return found


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_suite_exits_zero(quick_run: subprocess.CompletedProcess[str]) -> None:
    """The whole suite at its quick sizes ends with status 0."""
    assert quick_run.returncode == 0, quick_run.stdout + quick_run.stderr


def test_every_part_ran(quick_run: subprocess.CompletedProcess[str]) -> None:
    """Each network scenario and each other benchmark reports that it ended with status 0."""
    parts = {line["part"]: line for line in json_lines(quick_run.stdout) if "part" in line}
    assert sorted(parts) == sorted(PARTS), quick_run.stdout
    for part, line in parts.items():
        assert line["status"] == 0, (part, quick_run.stdout)


def test_every_network_figure_is_a_number_or_a_skipped_comparison(
    quick_run: subprocess.CompletedProcess[str],
) -> None:
    """Each figure of the network scenarios appears once, as a number with its unit.

    A comparison may instead be null with a reason only when its tool is not
    installed on this machine.
    """
    found = figures(quick_run.stdout)
    for bench in SCENARIOS:
        for name, spec in FIGURES[bench].items():
            line = found.get((bench, name))
            assert line is not None, f"{bench}/{name} missing\n{quick_run.stdout}"
            assert line["unit"] == spec.unit, line
            if spec.needs is not None and find_tool(spec.needs) is None:
                assert line["value"] is None, line
                assert line["skipped"] == f"{spec.needs} not installed", line
            else:
                assert is_number(line["value"]), (line, quick_run.stdout)


def _expected_names(module_name: str) -> list[str] | None:
    """The figure names another benchmark promises at its quick sizes, if it says."""
    module = importlib.import_module(module_name)
    if hasattr(module, "FIGURES"):
        return list(module.FIGURES)
    if hasattr(module, "figure_names") and hasattr(module, "options"):
        return list(module.figure_names(module.options(["--quick"])))
    return None


@pytest.mark.parametrize("part", sorted(SUBBENCHES))
def test_the_other_benchmarks_report_their_figures(
    quick_run: subprocess.CompletedProcess[str], part: str
) -> None:
    """feed, memory and leases each report their figures, as numbers, through the suite."""
    found = {name: line for (bench, name), line in figures(quick_run.stdout).items() if bench == part}
    expected = _expected_names(SUBBENCHES[part])
    if expected is None:
        assert found, quick_run.stdout
    else:
        assert sorted(found) == sorted(expected), quick_run.stdout
    for line in found.values():
        assert is_number(line["value"]), line


def test_the_machine_is_named(quick_run: subprocess.CompletedProcess[str]) -> None:
    """The suite names the CPU, its count, and the versions of what it compares."""
    [machine] = [line["machine"] for line in json_lines(quick_run.stdout)
                 if line.get("bench") == "suite" and "machine" in line]
    assert {"nproc", "cpu_model", "python", "twisted", "openssl", "nginx", "ab", "etcd"} <= set(machine)
    assert "regdisc benchmarks on" in quick_run.stdout.splitlines()[0]


def test_the_generator_outruns_the_registry(quick_run: subprocess.CompletedProcess[str]) -> None:
    """The generator's ceiling is reported against the registry's rates (a ratio, not a bound)."""
    found = figures(quick_run.stdout)
    assert is_number(found[("generator", "ceiling_vs_registry")]["value"])
    assert found[("heartbeats", "instances")]["value"] > 0


# The pieces, without a server.


def test_answers_parse_with_length_or_chunks() -> None:
    """A response is taken whole only: by Content-Length, chunked, or body-less."""
    sized = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP")
    assert parse_answer(sized) == (200, b"{}", len(sized) - 4)
    assert parse_answer(bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")) == 49
    assert parse_answer(bytearray(b"HTTP/1.1 200 OK\r\nContent-Len")) is None
    chunked = bytearray(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n1\r\n \r\n0\r\n\r\n"
    )
    assert parse_answer(chunked) == (201, b"{} ", len(chunked))
    assert parse_answer(chunked[:-2]) is None
    not_modified = bytearray(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
    assert parse_answer(not_modified) == (304, b"", len(not_modified))


def test_requests_carry_body_token_and_close() -> None:
    """A request names its length and type for a JSON body, and its token and closing when asked."""
    data = request("POST", "/x", {"a": 1}, token="t", close=True)
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b'{"a":1}'
    assert head.split(b"\r\n") == [
        b"POST /x HTTP/1.1", b"Host: localhost", b"Content-Type: application/json",
        b"Content-Length: 7", b"Authorization: Bearer t", b"Connection: close",
    ]
    assert b"Content-Length: 0" in request("PUT", "/heartbeat")


def test_results_give_rates_and_percentiles() -> None:
    """A rate is answers per second of the window; percentiles are nearest-rank, in ms."""
    result = Result(answers=50, window=2.0, latencies=[i / 1000 for i in range(1, 101)])
    assert result.rate == 25.0
    assert [result.percentile(f) for f in (0.5, 0.99, 1.0)] == [50.0, 99.0, 100.0]
    assert math.isnan(Result().percentile(0.5))
    assert percentile([3.0], 0.999) == 3.0


def test_ratios_and_spreads() -> None:
    """A ratio without its denominator is None; items are dealt evenly over connections."""
    assert ratio(3, 4) == 0.75 and ratio(None, 4) is None and ratio(3, 0) is None
    assert _spread(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert _prefix_end(b"/bench/disc-10/") == b"/bench/disc-100"


def test_a_skipped_figure_says_why() -> None:
    """A skipped figure's JSON line has a null value and the reason; NaN becomes skipped too."""
    report = Report({})
    report.add("heartbeats", "vs_etcd", None, "ratio", "m", skipped="etcd not installed")
    report.add("heartbeats", "registry_p99", float("nan"), "ms", "m")
    assert [json.loads(line) for line in report.json_lines()] == [
        {"bench": "heartbeats", "figure": "vs_etcd", "value": None, "unit": "ratio",
         "skipped": "etcd not installed"},
        {"bench": "heartbeats", "figure": "registry_p99", "value": None, "unit": "ms",
         "skipped": "not measured"},
    ]
