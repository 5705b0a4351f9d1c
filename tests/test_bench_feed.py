"""The feed benchmark runs at its quick sizes and reports every figure; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from bench.feed import FIGURES, HTTPConnection, Report, exit_status, parse_response, percentile

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.feed", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def figures(output: str) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {line["figure"]: line for line in lines if "figure" in line}


def test_quick_run_exits_zero(quick_run: subprocess.CompletedProcess[str]) -> None:
    """A quick run against a real daemon ends with status 0."""
    assert quick_run.returncode == 0, quick_run.stdout + quick_run.stderr


def test_quick_run_prints_every_figure_as_a_number(
    quick_run: subprocess.CompletedProcess[str],
) -> None:
    """Each figure has one JSON line with a numeric value and its unit."""
    found = figures(quick_run.stdout)
    assert sorted(found) == sorted(FIGURES), quick_run.stdout + quick_run.stderr
    for name, line in found.items():
        assert line["bench"] == "feed"
        assert isinstance(line["value"], (int, float)) and not isinstance(line["value"], bool), line
        assert line["unit"] == FIGURES[name][0]


def test_quick_run_wakes_no_watcher_of_another_service(
    quick_run: subprocess.CompletedProcess[str],
) -> None:
    """Changes to fan answer none of the watchers of other services, and all were held."""
    found = figures(quick_run.stdout)
    assert found["cross_service_wakeups"]["value"] == 0
    assert found["isolation_watchers"]["value"] == 20
    assert found["isolation_changes"]["value"] == 100
    assert found["held_queries"]["value"] == 50
    assert found["fanout_answered"]["value"] == 20


def test_quick_run_names_the_machine(quick_run: subprocess.CompletedProcess[str]) -> None:
    """The output names the CPU count and model and the Python and Twisted versions."""
    [machine] = [
        json.loads(line)["machine"] for line in quick_run.stdout.splitlines()
        if line.startswith('{"bench": "feed", "machine"')
    ]
    assert {"nproc", "cpu_model", "python", "twisted"} <= set(machine)


def test_exit_status_puts_a_cross_service_wakeup_first() -> None:
    """A cross-service wakeup exits 1, even with other problems; problems alone exit 2."""
    report = Report("feed", {})
    report.figure("cross_service_wakeups", 0)
    assert exit_status(report) == 0
    report.problems.append("fan-out: 3 connections failed")
    assert exit_status(report) == 2
    woken = Report("feed", {})
    woken.figure("cross_service_wakeups", 1)
    assert exit_status(woken) == 1
    woken.problems.append("the daemon logged 1 error")
    assert exit_status(woken) == 1
    assert woken.figures[0].to_json() == {
        "bench": "feed", "figure": "cross_service_wakeups", "value": 1, "unit": "answers",
    }


def test_responses_parse_with_length_or_chunks() -> None:
    """The load generator reads Content-Length, chunked and body-less answers, whole only."""
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Regdisc-Index: 7\r\n\r\n{}rest"
    headers = {"content-length": "2", "x-regdisc-index": "7"}
    assert parse_response(sized) == (200, headers, b"{}", len(sized) - len(b"rest"))
    chunked = (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n1\r\n \r\n0\r\n\r\n"
    )
    status, _, body, used = parse_response(chunked) or (0, {}, b"", 0)
    assert (status, body, used) == (201, b"{} ", len(chunked))
    assert parse_response(chunked[:-2]) is None
    assert parse_response(sized[:-6]) is None
    not_modified = parse_response(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n')
    assert not_modified is not None and not_modified[2] == b""


def test_percentile_is_nearest_rank() -> None:
    """p50 of 1..100 is 50, p99 is 99, p100 the max; one value is every percentile."""
    values = [float(v) for v in range(100, 0, -1)]
    assert [percentile(values, f) for f in (0.5, 0.99, 1.0)] == [50, 99, 100]
    assert percentile([4.0], 0.99) == 4.0


def test_a_request_given_up_on_drops_its_connection() -> None:
    """Cancelling a request (its timeout) aborts the connection; its loss fails nothing twice."""
    live: set[HTTPConnection] = set()
    connection = HTTPConnection(live)
    transport = StringTransport()
    connection.makeConnection(transport)
    failures: list[Failure] = []
    connection.request("GET", "/registry/services").addErrback(failures.append).cancel()
    assert [f.type for f in failures] == [CancelledError]
    assert transport.disconnecting
    connection.connectionLost(Failure(ConnectionDone()))
    assert live == set() and connection.closed
