"""What the network benchmarks stand on: servers in subprocesses, PKI, placement and the report.

* `make_material`: a fresh CA, one server certificate (localhost, 127.0.0.1, ::1;
  server and client use, since etcd's gateway dials its own gRPC port with it)
  and one client certificate, P-256 like everything regdisc makes.
* Servers, each a subprocess pinned to the server CPU with its log in the run's
  folder: the registry (``twistd -n regdisc``, either store); the *bare*
  endpoint, a Klein app that answers a fixed small JSON to anything, over the
  registry's own TLS setup (`regdisc.tls.server_tls_options` and `tls_factory`)
  and site class, so that the registry's figures can be divided by what
  Twisted, Klein and TLS cost alone; a *trivial* endpoint on the standard
  library's ssl that answers fixed bytes without parsing HTTP, to measure the
  load generator; and, where installed, nginx (``ssl_verify_client on``, a
  static 200) and etcd (mutual TLS on its client URL, ``GOMAXPROCS=1``).
* `Report`: figures by stable name, printed as a table and as JSON lines in
  the format of `bench.feed` (``{"bench", "figure", "value", "unit"}``), with
  ``"value": null`` and a ``"skipped"`` reason for a comparison whose tool is
  not installed.

Run ``python -m bench.harness bare|trivial --port P --cert C --key K --ca A``
to serve one of the two endpoints by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from regdisc import pki

from .http_load import Endpoint, fetch

ROOT = Path(__file__).resolve().parent.parent

START_PATIENCE = 30.0
"""Seconds a server may take to start serving."""

STOP_PATIENCE = 10.0
"""Seconds a server may take to exit after SIGTERM before it is killed."""


class BenchError(Exception):
    """A scenario cannot go on; the message says what stood in the way."""


# The report.


@attrs.frozen
class Figure:
    """One measured value (None when skipped), its unit and what it means."""

    bench: str
    name: str
    value: float | int | None
    unit: str
    meaning: str
    skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        line: dict[str, object] = {
            "bench": self.bench, "figure": self.name, "value": self.value, "unit": self.unit,
        }
        if self.skipped is not None:
            line["skipped"] = self.skipped
        return line


@attrs.define
class Report:
    """The figures measured so far, the problems met, and the machine they were met on."""

    machine: dict[str, object]
    figures: list[Figure] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)

    def add(self, bench: str, name: str, value: float | int | None, unit: str, meaning: str,
            skipped: str | None = None) -> None:
        if isinstance(value, float):
            value = None if math.isnan(value) else round(value, 3)
        if value is None and skipped is None:
            skipped = "not measured"
        self.figures.append(Figure(bench, name, value, unit, meaning, skipped))

    def skip(self, bench: str, name: str, unit: str, meaning: str, reason: str) -> None:
        self.add(bench, name, None, unit, meaning, skipped=reason)

    def value(self, name: str) -> float | int | None:
        """The value of the first figure called ``name``, of whichever bench."""
        for figure in self.figures:
            if figure.name == name:
                return figure.value
        return None

    def value_of(self, bench: str, name: str) -> float | int | None:
        for figure in self.figures:
            if figure.bench == bench and figure.name == name:
                return figure.value
        return None

    def ordered(self) -> list[Figure]:
        """The figures grouped by bench, benches in the order they first appear."""
        order: dict[str, int] = {}
        for figure in self.figures:
            order.setdefault(figure.bench, len(order))
        return sorted(self.figures, key=lambda f: order[f.bench])

    def table(self) -> str:
        """The figures as an aligned table, one section per bench."""
        figures = self.ordered()
        if not figures:
            return "(no figures)"
        return "\n".join(figure_table(
            (f.bench, f.name, shown(f.value, f.skipped), f.unit, f.meaning) for f in figures
        ))

    def json_lines(self) -> list[str]:
        return [json.dumps(f.to_json()) for f in self.ordered()]


@attrs.frozen
class PartFigure:
    """One figure of a benchmark run on its own (`PartReport`)."""

    bench: str
    name: str
    value: float | int
    unit: str
    meaning: str

    def to_json(self) -> dict[str, object]:
        return {"bench": self.bench, "figure": self.name, "value": self.value, "unit": self.unit}


@attrs.define
class PartReport:
    """The report of a benchmark that also runs on its own (``python -m bench.memory``):
    its figures, notes and problems, and the machine; rendered as a heading, a
    table, then one JSON line for the machine and one per figure."""

    bench: str
    machine: dict[str, object]
    figures: list[PartFigure] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)

    def heading(self) -> list[str]:
        """The lines above the table; subclasses say what ran where."""
        return [f"regdisc {self.bench} benchmark"]

    def add(self, name: str, value: float | int, unit: str, meaning: str) -> None:
        if isinstance(value, float):
            value = round(value, 3)
        self.figures.append(PartFigure(self.bench, name, value, unit, meaning))

    def value(self, name: str) -> float | int | None:
        for figure in self.figures:
            if figure.name == name:
                return figure.value
        return None

    def render(self) -> str:
        lines = [*self.heading(), ""]
        lines.extend(figure_table(
            (None, f.name, shown(f.value), f.unit, f.meaning) for f in self.figures
        ))
        lines.extend(f"NOTE: {note}" for note in self.notes)
        lines.extend(f"PROBLEM: {problem}" for problem in self.problems)
        lines.append("")
        lines.append(json.dumps({"bench": self.bench, "machine": self.machine}))
        lines.extend(json.dumps(f.to_json()) for f in self.figures)
        return "\n".join(lines)

    def exit_status(self) -> int:
        return 2 if self.problems else 0


def figure_table(rows: Iterable[tuple[str | None, str, str, str, str]]) -> list[str]:
    """Aligned lines of ``(section, name, shown value, unit, meaning)`` rows, under a
    heading, with a ``[section]`` line wherever the section changes (None: no line)."""
    rows = list(rows)
    width = max([len(row[1]) for row in rows] + [6])
    vwidth = max([len(row[2]) for row in rows] + [5])
    uwidth = max([len(row[3]) for row in rows] + [4])
    lines = [
        f"{'figure':<{width}}  {'value':>{vwidth}}  {'unit':<{uwidth}}  meaning",
        f"{'-' * width}  {'-' * vwidth}  {'-' * uwidth}  {'-' * 7}",
    ]
    section = None
    for row_section, name, value, unit, meaning in rows:
        if row_section is not None and row_section != section:
            section = row_section
            lines.append(f"[{section}]")
        lines.append(f"{name:<{width}}  {value:>{vwidth}}  {unit:<{uwidth}}  {meaning}")
    return lines


def shown(value: float | int | None, skipped: str | None = None) -> str:
    if value is None:
        return f"skipped ({skipped})" if skipped else "skipped"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.3f}"


def ratio(numerator: float | int | None, denominator: float | int | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# The machine, its limits and placement.


def machine(server_cpu: object, load_cpu: object, nofile: int) -> dict[str, object]:
    """What the figures were measured on: CPU, versions of everything compared."""
    import klein
    import OpenSSL.SSL

    import twisted

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "klein": klein.__version__,
        "openssl": OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode(),
        "generator_openssl": ssl.OPENSSL_VERSION,
        "nginx": tool_version([find_tool("nginx"), "-v"], r"nginx/(\S+)"),
        "ab": tool_version([find_tool("ab"), "-V"], r"Version (\S+)"),
        "etcd": tool_version([find_tool("etcd"), "--version"], r"etcd Version: (\S+)"),
        "server_cpu": server_cpu,
        "load_cpu": load_cpu,
        "nofile": nofile,
    }


def find_tool(name: str) -> str | None:
    """The path of a program on PATH or in /usr/sbin (nginx lives there), or None.

    ``BENCH_WITHOUT=nginx,ab`` in the environment hides those, to try the
    skipped comparisons on a machine that has them.
    """
    if name in os.environ.get("BENCH_WITHOUT", "").split(","):
        return None
    found = shutil.which(name)
    if found is None:
        for directory in ("/usr/sbin", "/usr/local/sbin", "/usr/bin"):
            candidate = Path(directory) / name
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return found


def tool_version(argv: list[str | None], pattern: str) -> str:
    if argv[0] is None:
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)  # type: ignore[arg-type]
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(pattern, done.stdout + done.stderr)
    return found[1] if found else "unknown"


def raise_nofile() -> int:
    """Raise this process's open-files limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for wanted in (target, 65536):
        if wanted <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return wanted
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_placement() -> tuple[set[int] | None, set[int] | None]:
    """The CPUs for the servers and for the load generator: the first two we may use, if two."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if len(allowed) < 2:
        return None, None
    return {allowed[0]}, {allowed[1]}


@attrs.frozen
class CpuSnapshot:
    """Every other process's CPU time so far, and what the host stole."""

    steal: float
    wall: float
    processes: dict[int, tuple[str, float]]
    """CPU seconds of each process outside this one's tree (with its reaped children), by pid."""

    @classmethod
    def take(cls) -> CpuSnapshot:
        steal = 0.0
        try:
            ticks = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            steal = int(ticks[7]) / ServerProcess.ticks if len(ticks) > 7 else 0.0
        except (OSError, ValueError, IndexError):
            pass
        return cls(steal, time.monotonic(), _other_processes())

    def others_since(self, earlier: CpuSnapshot) -> tuple[float, float, float, list[tuple[str, float]]]:
        """CPU seconds other processes used, seconds the host stole, wall seconds, the busiest others.

        A process counts with the children it reaped meanwhile, so the
        short-lived processes of a test run count in their parent; those
        whose parent also ended are missed. Kernel threads, named in
        brackets, are left out of the sum (they do our servers' I/O too),
        not out of the busiest.
        """
        used: dict[str, float] = {}
        for pid, (name, seconds) in self.processes.items():
            before = earlier.processes.get(pid)
            grown = seconds - (before[1] if before is not None and before[0] == name else 0.0)
            if grown > 0:
                used[name] = used.get(name, 0.0) + grown
        ranked = sorted(used.items(), key=lambda item: -item[1])[:3]
        others = sum(seconds for name, seconds in used.items() if not name.startswith("["))
        return others, self.steal - earlier.steal, self.wall - earlier.wall, ranked


def _other_processes() -> dict[int, tuple[str, float]]:
    mine = set(_process_tree(os.getpid()))
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if entry == "2" or fields[1] == "2":
            name = f"[{name}]"  # a kernel thread: its work may be our servers' I/O
        ticks = sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime
        found[int(entry)] = (name, ticks / ServerProcess.ticks)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# PKI.


@attrs.frozen
class Material:
    """The PKI files of one run."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_combined: Path
    """The client certificate and its key in one PEM file, as ab's -E wants them."""

    def endpoint(self, port: int) -> Endpoint:
        return Endpoint("127.0.0.1", port, self.ca, self.client_cert, self.client_key)


def make_material(directory: Path) -> Material:
    """A fresh CA, a server certificate (server and client use) and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = pki.make_ca("regdisc bench CA")
    server_cert, server_key = pki.issue_certificate(
        ca_cert, ca_key, "localhost", hosts=["localhost", "127.0.0.1", "::1"],
        server=True, client=True,
    )
    client_cert, client_key = pki.issue_certificate(ca_cert, ca_key, "bench-client", server=False)
    material = Material(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        client_combined=directory / "client-combined.pem",
    )
    pki.write_cert(material.ca, ca_cert)
    pki.write_cert(material.server_cert, server_cert)
    pki.write_key(material.server_key, server_key)
    pki.write_cert(material.client_cert, client_cert)
    pki.write_key(material.client_key, client_key)
    material.client_combined.write_bytes(pki.cert_pem(client_cert) + pki.key_pem(client_key))
    material.client_combined.chmod(0o600)
    return material


# Server processes.


class ServerProcess:
    """A server in a subprocess (its own session), its log, and what /proc says of it."""

    ticks = os.sysconf("SC_CLK_TCK")

    def __init__(self, name: str, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log = log

    @classmethod
    def start(
        cls, name: str, argv: Sequence[str], port: int, directory: Path,
        cpus: set[int] | None, env: Mapping[str, str] | None = None,
    ) -> ServerProcess:
        def prepare() -> None:  # in the child, before exec
            raise_nofile()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        log = directory / f"{name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                list(argv), cwd=directory, env=dict(env if env is not None else os.environ),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=prepare, start_new_session=True,
            )
        return cls(name, process, port, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        return self.process.poll()

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far of all its threads and live child processes.

        Children count because nginx serves from a worker process under its master.
        """
        if self.process.poll() is not None:
            raise BenchError(f"{self.name} exited:\n{self.log_tail()}")
        return sum(_process_cpu_ticks(pid) for pid in _process_tree(self.process.pid)) / self.ticks

    def rss_bytes(self) -> int:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        raise BenchError(f"{self.name} exited:\n{self.log_tail()}")

    def open_files(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.process.pid}/fd"))
        except OSError:
            raise BenchError(f"{self.name} exited:\n{self.log_tail()}") from None

    def nofile_limit(self) -> int:
        """Its limit of open files (-1 if /proc does not say)."""
        try:
            limits = Path(f"/proc/{self.process.pid}/limits").read_text()
        except OSError:
            raise BenchError(f"{self.name} exited:\n{self.log_tail()}") from None
        for line in limits.splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        return -1

    def log_lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self, count: int = 15) -> str:
        return "\n".join(self.log_lines()[-count:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_PATIENCE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_PATIENCE)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/PID/task/*/children."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue.extend(int(child) for child in children)
        except OSError:
            continue
    return found


def _process_cpu_ticks(pid: int) -> int:
    """utime + stime of /proc/PID/stat, in clock ticks (0 once it has gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def wait_serving(
    server: ServerProcess, endpoint: Endpoint, target: str = "/",
    ready: Callable[[int], bool] = lambda status: status == 200,
    limit: float = START_PATIENCE,
) -> None:
    """Return once ``GET target`` answers a status ``ready`` accepts; fail if the server exits."""
    deadline = time.monotonic() + limit
    last = "nothing tried"
    context = endpoint.context()
    while time.monotonic() < deadline:
        code = server.exited()
        if code is not None:
            raise BenchError(f"{server.name} exited with status {code}:\n{server.log_tail()}")
        try:
            status, _, _ = fetch(endpoint, "GET", target, timeout=5, context=context)
            if ready(status):
                return
            last = f"HTTP {status}"
        except (OSError, ssl.SSLError) as e:
            last = f"{e.__class__.__name__}: {e}"
        time.sleep(0.1)
    raise BenchError(f"{server.name} did not serve within {limit:g} s ({last}):\n{server.log_tail()}")


def _twistd() -> str:
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if found is None:
        raise BenchError("twistd is not installed beside this Python nor on PATH")
    return found


def _python_env(directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGDISC_")}
    env.update(
        HOME=str(directory),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def start_registry(
    name: str, directory: Path, material: Material, cpus: set[int] | None,
    extra_env: Mapping[str, str] | None = None, profile: Path | None = None,
) -> ServerProcess:
    """``twistd -n --pidfile= regdisc`` on a free port (memory store unless ``extra_env`` says)."""
    port = free_port()
    env = _python_env(directory)
    env.update(
        REGDISC_PORT=str(port),
        REGDISC_TLS_CERT=str(material.server_cert),
        REGDISC_TLS_KEY=str(material.server_key),
        REGDISC_TLS_CA=str(material.ca),
        REGDISC_LOG_LEVEL="warn",
        REGDISC_LOG_FORMAT="json",
    )
    env.update(extra_env or {})
    argv = [_twistd(), "-n", "--pidfile="]
    if profile is not None:
        # twistd's own profiler: the daemon's code is not touched.
        argv += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
    server = ServerProcess.start(name, [*argv, "regdisc"], port, directory, cpus, env)
    try:
        # 200 once serving: an etcd node answers 503 until its mirror has loaded.
        wait_serving(server, material.endpoint(port), "/registry/services")
    except BaseException:
        server.stop()
        raise
    return server


def start_bare(directory: Path, material: Material, cpus: set[int] | None) -> ServerProcess:
    """The bare Klein endpoint (`serve_bare`) in a subprocess."""
    return _start_module_server("bare", directory, material, cpus)


def start_trivial(directory: Path, material: Material, cpus: set[int] | None) -> ServerProcess:
    """The trivial endpoint (`serve_trivial`) in a subprocess."""
    return _start_module_server("trivial", directory, material, cpus)


def _start_module_server(kind: str, directory: Path, material: Material,
                         cpus: set[int] | None) -> ServerProcess:
    port = free_port()
    argv = [
        sys.executable, "-m", "bench.harness", kind, "--port", str(port),
        "--cert", str(material.server_cert), "--key", str(material.server_key),
        "--ca", str(material.ca),
    ]
    server = ServerProcess.start(kind, argv, port, directory, cpus, _python_env(directory))
    try:
        wait_serving(server, material.endpoint(port))
    except BaseException:
        server.stop()
        raise
    return server


_NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {directory}/nginx-body;
    proxy_temp_path {directory}/nginx-proxy;
    fastcgi_temp_path {directory}/nginx-fastcgi;
    uwsgi_temp_path {directory}/nginx-uwsgi;
    scgi_temp_path {directory}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def start_nginx(directory: Path, material: Material, cpus: set[int] | None) -> ServerProcess | None:
    """nginx with one worker, mutual TLS and a static 200, or None when it is not installed."""
    nginx = find_tool("nginx")
    if nginx is None:
        return None
    port = free_port()
    home = directory / "nginx"
    home.mkdir(exist_ok=True)
    conf = home / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(
        directory=home, port=port, cert=material.server_cert, key=material.server_key,
        ca=material.ca, body=BARE_BODY.decode(),
    ))
    # -e: nginx opens its default error log before reading the configuration.
    argv = [nginx, "-p", str(home), "-c", str(conf), "-e", str(home / "nginx-error.log")]
    server = ServerProcess.start("nginx", argv, port, directory, cpus)
    try:
        wait_serving(server, material.endpoint(port))
    except BaseException:
        server.stop()
        raise
    return server


def start_etcd(directory: Path, material: Material, cpus: set[int] | None) -> ServerProcess | None:
    """One etcd member with mutual TLS on its client URL and GOMAXPROCS=1, or None if not installed."""
    etcd = find_tool("etcd")
    if etcd is None:
        return None
    client_port, peer_port = free_port(), free_port()
    while peer_port == client_port:
        peer_port = free_port()
    client_url = f"https://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    argv = [
        etcd,
        "--name=bench",
        f"--data-dir={directory / 'etcd-data'}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=bench={peer_url}",
        f"--initial-cluster-token=regdisc-bench-{os.getpid()}-{client_port}",
        f"--cert-file={material.server_cert}",
        f"--key-file={material.server_key}",
        f"--trusted-ca-file={material.ca}",
        "--client-cert-auth",
        # Debian's 3.4 build crashes at start with the default capnslog logger.
        "--logger=zap",
        "--log-level=warn",
        "--log-outputs=stderr",
    ]
    env = dict(os.environ, GOMAXPROCS="1")
    server = ServerProcess.start("etcd", argv, client_port, directory, cpus, env)
    try:
        wait_serving(server, material.endpoint(client_port), "/health")
    except BaseException:
        server.stop()
        raise
    return server


# ApacheBench, as a second opinion on the load generator.


@attrs.frozen
class AbResult:
    rate: float
    failed: int
    p50: float | None
    p99: float | None


def run_ab(material: Material, port: int, concurrency: int, seconds: float) -> AbResult:
    """``ab -k`` on ``GET /`` for ``seconds``; ab is single-threaded C."""
    ab = find_tool("ab")
    if ab is None:
        raise BenchError("ab is not installed")
    argv = [
        ab, "-k", "-q", "-S", "-c", str(concurrency), "-t", f"{max(1, round(seconds))}",
        # -t implies -n 50000; a later -n lifts that.
        "-n", "100000000", "-E", str(material.client_combined),
        f"https://127.0.0.1:{port}/",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out = done.stdout
    rate = re.search(r"Requests per second:\s+([\d.]+)", out)
    if done.returncode != 0 or rate is None:
        raise BenchError(f"ab failed ({done.returncode}): {(done.stderr or out)[-300:]}")
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    p50 = re.search(r"^\s+50%\s+(\d+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\d+)", out, re.MULTILINE)
    return AbResult(
        float(rate[1]),
        int(failed[1] if failed else 0) + int(non2xx[1] if non2xx else 0),
        float(p50[1]) if p50 else None,
        float(p99[1]) if p99 else None,
    )


# The bare endpoint: what Twisted, Klein and the registry's TLS cost alone.

BARE_BODY = b'{"data":{"ok":true}}'


def bare_resource() -> Any:
    """A Klein resource that answers every path and method with `BARE_BODY`."""
    from klein import Klein

    class BareAPI:
        app = Klein()

        @app.route("/", branch=True, methods=["GET", "PUT", "POST", "DELETE"])
        def anything(self, request: Any) -> bytes:
            request.setHeader("Content-Type", "application/json")
            return BARE_BODY

    return BareAPI().app.resource()


def serve_bare(port: int, cert: Path, key: Path, ca: Path) -> None:
    """Serve `bare_resource` as the daemon serves its API: same TLS options, wrapper and site."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from regdisc.site import RegistrySite
    from regdisc.tls import TLSFiles, server_tls_options, tls_factory

    options = server_tls_options(TLSFiles(cert=cert, key=key, ca=ca))
    site = RegistrySite(bare_resource(), reactor=reactor)
    endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
    listening = endpoint.listen(tls_factory(options, site))
    listening.addErrback(lambda failure: (print(failure.getTraceback()), reactor.stop()))
    reactor.run()


# The trivial endpoint: the least a TLS server can do per request.

_TRIVIAL_ANSWER = (
    # Connection: keep-alive keeps ab's HTTP/1.0 keep-alive requests on one connection.
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BARE_BODY)).encode() + b"\r\n\r\n" + BARE_BODY
)


def serve_trivial(port: int, cert: Path, key: Path, ca: Path) -> None:
    """Answer fixed bytes to each request head (bodies are not expected), over mutual TLS.

    It does not parse HTTP, keeps connections alive unless a request says
    ``Connection: close``, and runs until SIGTERM.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    context.load_verify_locations(cafile=str(ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    shaking: set[int] = set()
    buffers: dict[int, bytearray] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def close(sock: ssl.SSLSocket) -> None:
        fd = sock.fileno()
        selector.unregister(sock)
        shaking.discard(fd)
        buffers.pop(fd, None)
        sock.close()

    while True:
        for ready, _ in selector.select():
            if ready.data is None:
                while True:
                    try:
                        raw, _ = listener.accept()
                    except BlockingIOError:
                        break
                    raw.setblocking(False)
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                    shaking.add(sock.fileno())
                    buffers[sock.fileno()] = bytearray()
                    selector.register(sock, selectors.EVENT_READ, sock)
                    _trivial_shake(sock, shaking, close)
                continue
            sock = ready.data
            if sock.fileno() in shaking:
                _trivial_shake(sock, shaking, close)
                continue
            _trivial_read(sock, buffers[sock.fileno()], close)


def _trivial_shake(sock: ssl.SSLSocket, shaking: set[int], close: Callable[[Any], None]) -> None:
    try:
        sock.do_handshake()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return  # both directions are small: the peer's next flight makes it readable
    except (ssl.SSLError, OSError):
        close(sock)
        return
    shaking.discard(sock.fileno())


def _trivial_read(sock: ssl.SSLSocket, buffer: bytearray, close: Callable[[Any], None]) -> None:
    while True:
        try:
            data = sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (ssl.SSLError, OSError):
            close(sock)
            return
        if not data:
            close(sock)
            return
        buffer += data
        answers = buffer.count(b"\r\n\r\n")
        if answers:
            closing = b"connection: close" in buffer.lower()
            del buffer[:buffer.rindex(b"\r\n\r\n") + 4]
            try:
                sock.sendall(_TRIVIAL_ANSWER * answers)
            except (ssl.SSLError, OSError):
                close(sock)
                return
            if closing:
                close(sock)
                return
        if not sock.pending():
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.harness", description="Serve the bare or the trivial endpoint."
    )
    parser.add_argument("kind", choices=["bare", "trivial"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    args = parser.parse_args(argv)
    serve = serve_bare if args.kind == "bare" else serve_trivial
    serve(args.port, args.cert, args.key, args.ca)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
