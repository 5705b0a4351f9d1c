"""Real etcd members for tests: subprocesses on free loopback ports in a tmp folder.

`start_cluster` starts one or three members (optionally with mutual TLS on the
client URLs) and waits until they are healthy; the `etcd_cluster` fixture does
the same from a test and stops whatever it started. Other test modules reuse
it with ``from .etcd_harness import etcd_cluster  # noqa: F401``.

Starting and health checks block (``subprocess``, ``urllib``), so they belong in
synchronous fixtures or between reactor turns, and every wait is bounded.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import attrs
import pytest

from regdisc import pki
from regdisc.client.tls import ClientTLS

HEALTH_PATIENCE = 20.0
"""The longest a member may take to become healthy, in seconds."""
HEALTH_STEP = 0.1
STOP_PATIENCE = 10.0
"""How long a member may take to exit after SIGTERM before it is killed."""

# The debian etcd-server 3.4 build crashes at start with the default capnslog
# logger; zap works.
_LOG_FLAGS = ("--logger=zap", "--log-level=warn", "--log-outputs=stderr")
# Fast elections keep leader changes and quorum loss short in tests.
_TIMING_FLAGS = ("--heartbeat-interval=50", "--election-timeout=500")
_CHECKPOINT = "--experimental-enable-lease-checkpoint"
_CHECKPOINT_PERSIST = "--experimental-enable-lease-checkpoint-persist"


class EtcdNotFound(RuntimeError):
    """No etcd binary: the message says how to install one."""


class EtcdStartError(RuntimeError):
    """A member exited or did not become healthy in time; the message ends with its log."""


def find_etcd() -> str:
    """The etcd binary's path; raise `EtcdNotFound` saying how to install it.

    Tests do not skip without etcd: CI installs it (see scripts/run-tests).
    """
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if found is None:
        raise EtcdNotFound(
            "etcd is not installed: run `sudo apt-get install etcd-server` "
            "(Debian/Ubuntu), or scripts/run-tests, which installs it"
        )
    return found


@functools.lru_cache(maxsize=None)
def _accepts_flag(etcd: str, flag: str) -> bool:
    # `etcd --help` does not list every flag it parses (3.4.23 hides
    # checkpoint-persist), so ask the flag parser: with --version, etcd
    # parses the flags, prints its version and exits 0, or exits 2 on an
    # unknown flag.
    result = subprocess.run(
        [etcd, flag, "--version"], capture_output=True, timeout=10, check=False
    )
    return result.returncode == 0


def etcd_flags(etcd: str) -> list[str]:
    """The flags every member gets besides names, URLs and TLS."""
    flags = [*_LOG_FLAGS, *_TIMING_FLAGS, _CHECKPOINT]
    # Without persistence a lease's remaining TTL is checkpointed to the
    # followers but lost on a full restart; add it where this etcd has it.
    if _accepts_flag(etcd, _CHECKPOINT_PERSIST):
        flags.append(_CHECKPOINT_PERSIST)
    return flags


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@attrs.frozen
class ClusterTLS:
    """The files of a cluster's PKI: a CA, the members' server identity and a client identity."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> ClusterTLS:
        directory.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = pki.make_ca("etcd test CA")
        # etcd's own JSON gateway dials its gRPC server presenting the server
        # certificate, so that certificate needs client use too.
        server_cert, server_key = pki.issue_certificate(
            ca_cert, ca_key, "etcd", hosts=["127.0.0.1", "localhost"], server=True, client=True
        )
        client_cert, client_key = pki.issue_certificate(
            ca_cert, ca_key, "regdisc", server=False, client=True
        )
        paths = cls(
            directory / "ca.pem",
            directory / "etcd.pem",
            directory / "etcd-key.pem",
            directory / "client.pem",
            directory / "client-key.pem",
        )
        pki.write_cert(paths.ca, ca_cert)
        pki.write_cert(paths.server_cert, server_cert)
        pki.write_key(paths.server_key, server_key)
        pki.write_cert(paths.client_cert, client_cert)
        pki.write_key(paths.client_key, client_key)
        return paths

    def server_flags(self) -> list[str]:
        return [
            f"--cert-file={self.server_cert}",
            f"--key-file={self.server_key}",
            f"--trusted-ca-file={self.ca}",
            "--client-cert-auth",
        ]

    def client_tls(self) -> ClientTLS:
        return ClientTLS.from_files(self.client_cert, self.client_key, self.ca)

    def ssl_context(self) -> ssl.SSLContext:
        """A blocking client's context, for health checks."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


@attrs.define
class EtcdMember:
    """One etcd member process; ``start`` after ``stop``/``kill`` rejoins with the same data."""

    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    argv: list[str] = attrs.field(repr=False)
    tls: ClusterTLS | None = attrs.field(default=None, repr=False)
    process: subprocess.Popen[bytes] | None = attrs.field(default=None, repr=False)
    _started_once: bool = attrs.field(default=False, repr=False)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, wait: bool = True) -> None:
        """Start the process; after the first start, rejoin as an existing member.

        With ``wait``, return once the member reports itself healthy, which
        needs a quorum of the cluster running.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        state = "existing" if self._started_once else "new"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.argv, f"--initial-cluster-state={state}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._started_once = True
        if wait:
            self.wait_healthy()

    def stop(self, patience: float = STOP_PATIENCE) -> None:
        """SIGTERM, wait up to ``patience`` seconds, then SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(patience)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_PATIENCE)
        self.process = None

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers true now (a leader and a quorum)."""
        try:
            answer = self._get("/health", timeout=1.0)
        except (OSError, ValueError):
            return False
        return answer.get("health") == "true"

    def wait_healthy(self, patience: float = HEALTH_PATIENCE) -> None:
        """Poll ``/health`` every HEALTH_STEP seconds; raise `EtcdStartError` after ``patience``."""
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EtcdStartError(
                    f"{self.name} exited with {self.process.returncode}\n{self.log_tail()}"
                )
            if self.healthy():
                return
            if self.process is not None:
                # Doubles as the pause between polls, ending early if etcd exits.
                try:
                    self.process.wait(HEALTH_STEP)
                except subprocess.TimeoutExpired:
                    pass
            else:
                raise EtcdStartError(f"{self.name} is not running")
        raise EtcdStartError(f"{self.name} not healthy within {patience:g} s\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        """The member's ``/v3/maintenance/status`` answer."""
        return self._post("/v3/maintenance/status", {})

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _get(self, path: str, timeout: float) -> Any:
        with urllib.request.urlopen(
            self.client_url + path, timeout=timeout, context=self._context()
        ) as response:
            return json.loads(response.read())

    def _post(self, path: str, body: Any, timeout: float = 2.0) -> Any:
        request = urllib.request.Request(
            self.client_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout, context=self._context()) as response:
            return json.loads(response.read())

    def _context(self) -> ssl.SSLContext | None:
        return self.tls.ssl_context() if self.tls is not None else None


@attrs.define
class EtcdCluster:
    """Members of one cluster, started in ``directory``."""

    directory: Path
    members: list[EtcdMember]
    tls: ClusterTLS | None = None

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs."""
        return [m.client_url for m in self.members]

    @property
    def client_tls(self) -> ClientTLS | None:
        """Client TLS for the gateway (None for a plain http cluster)."""
        return self.tls.client_tls() if self.tls is not None else None

    def member_at(self, client_url: str) -> EtcdMember:
        """The member whose client URL is ``client_url``."""
        for m in self.members:
            if m.client_url == client_url.rstrip("/"):
                return m
        raise KeyError(client_url)

    def leader(self) -> EtcdMember | None:
        """The member the running members name as leader, or None if they name none."""
        ids: dict[str, EtcdMember] = {}
        leaders = set()
        for m in self.members:
            if not m.running:
                continue
            try:
                status = m.status()
            except (OSError, ValueError):
                continue
            ids[status["header"]["member_id"]] = m
            if status.get("leader", "0") != "0":
                leaders.add(status["leader"])
        for leader in leaders:
            if leader in ids:
                return ids[leader]
        return None

    def wait_healthy(self, patience: float = HEALTH_PATIENCE) -> None:
        """Wait until every running member is healthy."""
        for m in self.members:
            if m.running:
                m.wait_healthy(patience)

    def stop(self) -> None:
        """Stop every member."""
        for m in self.members:
            m.stop()


def start_cluster(
    directory: Path, size: int = 1, tls: bool = False, flags: Sequence[str] | None = None
) -> EtcdCluster:
    """Start ``size`` members (1 or 3) in ``directory`` and wait until all are healthy.

    ``flags`` replace `etcd_flags` (the logging, timing and checkpoint flags).
    """
    if size not in (1, 3):
        raise ValueError("a test cluster has 1 or 3 members")
    etcd = find_etcd()
    directory.mkdir(parents=True, exist_ok=True)
    cluster_tls = ClusterTLS.create(directory / "pki") if tls else None
    scheme = "https" if tls else "http"
    ports = free_ports(2 * size)
    names = [f"m{i}" for i in range(size)]
    client_urls = [f"{scheme}://127.0.0.1:{ports[2 * i]}" for i in range(size)]
    peer_urls = [f"http://127.0.0.1:{ports[2 * i + 1]}" for i in range(size)]
    initial = ",".join(f"{n}={p}" for n, p in zip(names, peer_urls))
    token = f"regdisc-test-{os.getpid()}-{ports[0]}"
    common = [*(etcd_flags(etcd) if flags is None else flags)]
    common += cluster_tls.server_flags() if cluster_tls else []
    members = []
    for name, client_url, peer_url in zip(names, client_urls, peer_urls):
        argv = [
            etcd,
            f"--name={name}",
            f"--data-dir={directory / name}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-token={token}",
            *common,
        ]
        members.append(
            EtcdMember(
                name, client_url, peer_url, directory / name, directory / f"{name}.log",
                argv, cluster_tls,
            )
        )
    cluster = EtcdCluster(directory, members, cluster_tls)
    try:
        for m in members:
            m.start(wait=False)
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[Callable[..., EtcdCluster]]:
    """A factory ``(size=1, tls=False) -> EtcdCluster``; every cluster it starts is stopped after the test."""
    started: list[EtcdCluster] = []

    def start(size: int = 1, tls: bool = False) -> EtcdCluster:
        cluster = start_cluster(tmp_path / f"etcd{len(started)}", size, tls)
        started.append(cluster)
        return cluster

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop()


__all__ = [
    "ClusterTLS",
    "EtcdCluster",
    "EtcdMember",
    "EtcdNotFound",
    "EtcdStartError",
    "etcd_cluster",
    "etcd_flags",
    "find_etcd",
    "free_ports",
    "start_cluster",
]
