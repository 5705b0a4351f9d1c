"""How long a dead instance outlives its lease when etcd's leader changes, with and without checkpoints.

Run from the checkout::

    python -m bench.lease_checkpoint [--ttl 10] [--quick]

etcd keeps lease deadlines in the leader's memory only; a new leader gives
every lease its full TTL again, unless lease checkpointing has told the
followers how much was left. For each mode this starts a 3-member etcd
cluster on loopback (heartbeat 50 ms, election 500 ms, as the tests'
harness), grants a lease of ``--ttl`` seconds, attaches a key, renews the
lease once and never again (the instance dies). At 60 % of the TTL after that
renewal it stops the leader (SIGTERM) to force an election, reads the lease's
remaining TTL once the new leader is known, then polls ``range`` every 50 ms
until the key is gone. Modes:

* ``no_election``: checkpointing off and no leader change, the baseline:
  how late etcd deletes an expired key anyway (it checks leases every 500 ms);
* ``checkpoint_off``: the tests' flags minus the checkpoint ones;
* ``checkpoint_on``: the tests' flags (``etcd_flags``): checkpointing on, and
  persisted where this etcd knows the flag;
* ``checkpoint_on_1s``: the same with a checkpoint interval of one second,
  only where this etcd accepts an interval flag (3.4.23 accepts none: its
  interval is fixed at five minutes).

Times are from this process's monotonic clock and relative to the moment the
renewal's answer arrived; the key's disappearance is known to within one
poll (50 ms plus a request). Output: a table, then a line of settings and one
JSON line per figure::

    {"bench": "lease_checkpoint", "figure": "checkpoint_off_extra_delay", "value": 6.9, "unit": "s"}

No timing is asserted. The exit status is 2 when a figure could not be
measured (a cluster did not start, no new leader, the key outlived the
bound), else 0. Every member is stopped and the temporary folder removed at
the end, whatever happened.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from regdisc.etcd.gateway import EtcdError, EtcdGateway, EtcdUnavailable
from tests.etcd_harness import (
    EtcdCluster,
    EtcdMember,
    etcd_flags,
    find_etcd,
    start_cluster,
)

from .harness import figure_table, shown

BENCH = "lease_checkpoint"

POLL_STEP = 0.05
"""Seconds between ``range`` polls for the key."""
LEADER_STEP = 0.02
"""Seconds between status polls for the new leader."""
ELECTION_PATIENCE = 15.0
"""The longest a new leader may take to appear after the leader is stopped."""
GATEWAY_TIMEOUT = 1.0
"""Per endpoint and request: short, so that a poll during the election stays short."""
KILL_AT = 0.6
"""When the leader is stopped, as a fraction of the TTL after the last renewal."""

_CHECKPOINT_PREFIX = "--experimental-enable-lease-checkpoint"
_INTERVAL_FLAGS = (
    "--experimental-lease-checkpoint-interval",
    "--lease-checkpoint-interval",
)
"""Names a checkpoint-interval flag may have, in the order they are tried."""
INTERVAL = "1s"


class BenchError(Exception):
    """The benchmark cannot go on; the message says what stood in the way."""


# Modes and figures.


@attrs.frozen
class Mode:
    """One way of running etcd: its name, its flags, and whether the leader is stopped."""

    name: str
    title: str
    flags: tuple[str, ...]
    election: bool = True


ELECTION_FIGURES: dict[str, tuple[str, str]] = {
    "expected_expiry": ("s", "when the key should go: the TTL granted, after the last renewal"),
    "actual_expiry": ("s", "when it went, after the last renewal (to within one 50 ms poll)"),
    "extra_delay": ("s", "how much longer the dead instance stayed: actual - expected"),
    "extra_delay_fraction": ("TTL", "the same, as a fraction of the TTL"),
    "election_time": ("ms", "from SIGTERM to the leader until a survivor names a new one"),
    "ttl_after_election": ("s", "remaining TTL etcd reported just after the election"),
    "ttl_due_after_election": ("s", "remaining TTL it should have reported then"),
}
"""The figures of a mode with an election, by suffix: unit and meaning."""

BASELINE_FIGURES = ("expected_expiry", "actual_expiry", "extra_delay", "extra_delay_fraction")
"""The figures of the mode without an election."""


def accepts_flag(etcd: str, flag: str) -> bool:
    """Whether etcd's flag parser takes ``flag``: with ``--version`` it exits 0, or 2 if unknown."""
    try:
        result = subprocess.run(
            [etcd, flag, "--version"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@functools.lru_cache(maxsize=None)
def interval_flag(etcd: str) -> str | None:
    """The checkpoint-interval flag set to one second, if this etcd has one."""
    for name in _INTERVAL_FLAGS:
        flag = f"{name}={INTERVAL}"
        if accepts_flag(etcd, flag):
            return flag
    return None


def modes(etcd: str) -> list[Mode]:
    """The modes this etcd can run, in order."""
    with_checkpoints = etcd_flags(etcd)
    without = [f for f in with_checkpoints if not f.startswith(_CHECKPOINT_PREFIX)]
    found = [
        Mode("no_election", "checkpointing off, no leader change", tuple(without), election=False),
        Mode("checkpoint_off", "checkpointing off", tuple(without)),
        Mode("checkpoint_on", "checkpointing on (default interval, 5 min)", tuple(with_checkpoints)),
    ]
    interval = interval_flag(etcd)
    if interval is not None:
        found.append(
            Mode("checkpoint_on_1s", f"checkpointing on, {interval}", (*with_checkpoints, interval))
        )
    return found


def figure_names(mode_list: Sequence[Mode]) -> list[str]:
    """Every figure the modes report, in order."""
    names = []
    for mode in mode_list:
        suffixes = ELECTION_FIGURES if mode.election else BASELINE_FIGURES
        names.extend(f"{mode.name}_{suffix}" for suffix in suffixes)
    return names


@attrs.frozen
class Figure:
    name: str
    value: float | int
    unit: str
    meaning: str
    mode: str

    def to_json(self) -> dict[str, object]:
        return {"bench": BENCH, "figure": self.name, "value": self.value, "unit": self.unit}


@attrs.define
class Report:
    """The figures measured so far, the problems met and the settings they were met with."""

    settings: dict[str, object]
    figures: list[Figure] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)

    def add(self, mode: Mode, suffix: str, value: float | int) -> None:
        unit, meaning = ELECTION_FIGURES[suffix]
        if isinstance(value, float):
            value = round(value, 3)
        self.figures.append(Figure(f"{mode.name}_{suffix}", value, unit, meaning, mode.title))

    def render(self) -> str:
        s = self.settings
        lines = [
            f"etcd lease expiry across a leader change: etcd {s['etcd_version']}, "
            f"TTL {s['ttl']} s, leader stopped at {KILL_AT:.0%} of it, "
            f"checkpoint interval flag: {s['interval_flag'] or 'none accepted'}",
            "",
        ]
        lines.extend(figure_table(
            (f.mode, f.name, shown(f.value), f.unit, f.meaning) for f in self.figures
        ))
        for problem in self.problems:
            lines.append(f"PROBLEM: {problem}")
        lines.append("")
        lines.append(json.dumps({"bench": BENCH, "settings": self.settings}))
        lines.extend(json.dumps(f.to_json()) for f in self.figures)
        return "\n".join(lines)


# Clusters: the harness's members, with flags of our choosing.


def start_members(directory: Path, flags: Sequence[str], started: list[EtcdCluster]) -> EtcdCluster:
    """Start three plain-http members with ``flags`` (instead of the harness's,
    which always turn checkpointing on) and wait until they are healthy."""
    cluster = start_cluster(directory, size=3, flags=flags)
    started.append(cluster)
    return cluster


def member_id(member: EtcdMember) -> str:
    return str(member.status()["header"]["member_id"])


def named_leader(member: EtcdMember) -> str | None:
    """The leader ``member`` names now, or None if none or it does not answer."""
    try:
        leader = str(member.status().get("leader", "0"))
    except (OSError, ValueError, KeyError):
        return None
    return None if leader == "0" else leader


# The measurement.


def sleep(reactor: Any, seconds: float) -> Deferred:
    return deferLater(reactor, max(seconds, 0.0), lambda: None)


async def until(reactor: Any, moment: float) -> None:
    await sleep(reactor, moment - time.monotonic())


async def find_leader(reactor: Any, cluster: EtcdCluster) -> EtcdMember:
    deadline = time.monotonic() + ELECTION_PATIENCE
    while time.monotonic() < deadline:
        leader = await deferToThread(cluster.leader)
        if leader is not None:
            return leader
        await sleep(reactor, 0.1)
    raise BenchError("the cluster named no leader")


async def key_gone(reactor: Any, gateway: EtcdGateway, key: bytes, deadline: float) -> float:
    """Poll ``range`` every POLL_STEP until ``key`` is gone; the monotonic time of the answer."""
    while True:
        sent = time.monotonic()
        if sent > deadline:
            raise BenchError("the key was still there at the end of the bound")
        try:
            _, kvs = await gateway.range(key)
        except (EtcdUnavailable, EtcdError):
            pass  # no answer during the election: not gone as far as we know
        else:
            if not kvs:
                return time.monotonic()
        await until(reactor, sent + POLL_STEP)


async def new_leader(reactor: Any, survivors: list[EtcdMember], old: str) -> float:
    """Poll the survivors' status until one names a leader other than ``old``; when."""
    deadline = time.monotonic() + ELECTION_PATIENCE
    while time.monotonic() < deadline:
        sent = time.monotonic()
        for member in survivors:
            leader = await deferToThread(named_leader, member)
            if leader is not None and leader != old:
                return time.monotonic()
        await until(reactor, sent + LEADER_STEP)
    raise BenchError(f"no new leader within {ELECTION_PATIENCE:g} s of stopping the old one")


async def remaining_ttl(reactor: Any, gateway: EtcdGateway, lease: int, granted: int) -> tuple[int, float]:
    """The lease's remaining TTL as the leader reports it, and when it was read.

    A leader that has not yet applied its first entry of the term has not
    promoted its lessor, and reports leases as never expiring: ask again.
    """
    deadline = time.monotonic() + 3.0
    while True:
        try:
            ttl = await gateway.lease_ttl(lease)
        except EtcdUnavailable:
            ttl = None
        read = time.monotonic()
        if ttl is not None and ttl <= granted + 5:
            return ttl, read
        if read > deadline:
            raise BenchError(f"no plausible remaining TTL after the election (last: {ttl})")
        await sleep(reactor, POLL_STEP)


async def measure(reactor: Any, mode: Mode, cluster: EtcdCluster, ttl: int, report: Report,
                  stopping: list[Deferred]) -> None:
    """One mode on its running cluster: lease, key, one renewal, election, expiry."""
    leader = await find_leader(reactor, cluster)
    old = await deferToThread(member_id, leader)
    survivors = [m for m in cluster.members if m is not leader]
    gateway = EtcdGateway([m.client_url for m in survivors], reactor, timeout=GATEWAY_TIMEOUT)
    try:
        lease, granted = await gateway.lease_grant(ttl)
        key = f"/bench/lease_checkpoint/{mode.name}".encode()
        await gateway.put(key, b"instance", lease=lease)
        await sleep(reactor, 0.5)
        await gateway.lease_keepalive(lease)
        renewed = time.monotonic()  # the last renewal: the instance dies now
        expected = renewed + granted
        # Wide enough for a full reset and a slow election, bounded all the same.
        deadline = renewed + 3 * granted + ELECTION_PATIENCE
        if mode.election:
            await until(reactor, renewed + KILL_AT * granted)
            assert leader.process is not None
            leader.process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            stopping.append(deferToThread(leader.stop))  # reaps it, SIGKILL if it lingers
            elected = await new_leader(reactor, survivors, old)
            after, read = await remaining_ttl(reactor, gateway, lease, granted)
        gone = await key_gone(reactor, gateway, key, deadline)
    finally:
        await gateway.close()
    report.add(mode, "expected_expiry", float(granted))
    report.add(mode, "actual_expiry", gone - renewed)
    report.add(mode, "extra_delay", gone - expected)
    report.add(mode, "extra_delay_fraction", (gone - expected) / granted)
    if mode.election:
        report.add(mode, "election_time", (elected - stopped) * 1000)
        report.add(mode, "ttl_after_election", after)
        report.add(mode, "ttl_due_after_election", expected - read)


async def run(reactor: Any, directory: Path, mode_list: list[Mode], ttl: int,
              report: Report, started: list[EtcdCluster], phase: list[str]) -> None:
    """Every mode in turn, each on a fresh cluster stopped once it is measured.

    The baseline (no election) shares the first cluster with ``checkpoint_off``:
    the same flags, measured before its leader is stopped.
    """
    cluster: EtcdCluster | None = None
    flags: tuple[str, ...] | None = None
    for index, mode in enumerate(mode_list):
        phase[0] = mode.name
        if cluster is None or flags != mode.flags:
            if cluster is not None:
                await deferToThread(cluster.stop)
            cluster = await deferToThread(
                start_members, directory / f"{index}-{mode.name}", mode.flags, started
            )
            flags = mode.flags
        stopping: list[Deferred] = []
        try:
            await measure(reactor, mode, cluster, ttl, report, stopping)
        finally:
            for d in stopping:
                await d
        if mode.election:  # one member down: the next mode starts afresh
            await deferToThread(cluster.stop)
            cluster = None
    if cluster is not None:
        await deferToThread(cluster.stop)


def drive(directory: Path, mode_list: list[Mode], ttl: int, timeout: float,
          report: Report, started: list[EtcdCluster]) -> None:
    """Run the modes on the reactor within ``timeout`` seconds in all."""
    from twisted.internet import reactor

    phase = ["starting"]
    outcome: list[Failure | None] = []
    expired: list[bool] = []

    def finished(result: object) -> None:
        outcome.append(result if isinstance(result, Failure) else None)
        if reactor.running:
            reactor.stop()

    def go() -> None:
        d = Deferred.fromCoroutine(run(reactor, directory, mode_list, ttl, report, started, phase))

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = reactor.callLater(timeout, expire)
        d.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        d.addBoth(finished)

    def hard_stop() -> None:
        if not outcome:
            outcome.append(Failure(BenchError("the run did not unwind after the timeout")))
            reactor.stop()

    reactor.callWhenRunning(go)
    reactor.callLater(timeout + 30, hard_stop)
    reactor.run()
    if not outcome:
        raise BenchError(f"interrupted during {phase[0]}")
    failure = outcome[0]
    if expired:
        raise BenchError(f"ran out of time ({timeout:g} s in all) during {phase[0]}")
    if failure is not None:
        if failure.check(BenchError):
            raise BenchError(f"{phase[0]}: {failure.value}")
        raise BenchError(f"{phase[0]}: {failure.getTraceback()}")


def etcd_version(etcd: str) -> str:
    try:
        out = subprocess.run([etcd, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.partition(":")[2].strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lease_checkpoint", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--ttl", type=int, default=None, help="lease TTL in seconds (10; quick: 3)")
    parser.add_argument("--quick", action="store_true", help="a TTL of 3 s: well under a minute")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for everything (default from the TTL and the modes)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    ttl = args.ttl if args.ttl is not None else (3 if args.quick else 10)
    if ttl < 2:
        parser.error("--ttl must be at least 2")

    etcd = find_etcd()
    mode_list = modes(etcd)
    timeout = args.timeout or 30.0 + len(mode_list) * (4 * ttl + 25.0)
    report = Report({
        "etcd_version": etcd_version(etcd),
        "ttl": ttl,
        "kill_at": KILL_AT,
        "modes": {m.name: list(m.flags) for m in mode_list},
        "interval_flag": interval_flag(etcd),
    })
    started: list[EtcdCluster] = []
    try:
        with tempfile.TemporaryDirectory(prefix="regdisc-lease-bench-") as directory:
            try:
                drive(Path(directory), mode_list, ttl, timeout, report, started)
            finally:
                for cluster in started:
                    cluster.stop()
    except BenchError as e:
        report.problems.append(str(e))
    except Exception:
        import traceback

        report.problems.append(traceback.format_exc())
    missing = [n for n in figure_names(mode_list) if n not in {f.name for f in report.figures}]
    if missing and not report.problems:
        report.problems.append(f"figures not measured: {', '.join(missing)}")
    print(report.render(), flush=True)
    return 2 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
