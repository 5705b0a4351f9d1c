"""The twistd plugin and the composition of the daemon's services."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import Application, IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogLevel, capturedLogs
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory

from regdisc import pki
from regdisc.config import load_config
from regdisc.logs import json_line, make_observer
from regdisc.tap import Options, StartupError, make_service

from .conftest import fired


def config_for(tmp_path: Path, **environ: str):
    return load_config({"HOME": str(tmp_path), **environ})


def test_plugin_is_found() -> None:
    """twistd finds the regdisc plugin, whose options are ours."""
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert makers["regdisc"].options is Options


def test_options_collect_overrides() -> None:
    """Each twistd option lands under its name; unset ones are None."""
    options = Options()
    options.parseOptions(["--port", "9000", "--log-format", "json"])
    overrides = options.overrides()
    assert overrides["port"] == "9000" and overrides["log-format"] == "json"
    assert overrides["interface"] is None


def test_service_listens_and_runs_the_lease_manager(tmp_path: Path) -> None:
    """Started, the daemon listens over TLS where configured and runs its lease and collector timers."""
    reactor = MemoryReactorClock()
    root = make_service(config_for(tmp_path, REGDISC_PORT="9443"), reactor, io.StringIO())
    root.startService()
    [(port, factory, _, interface)] = reactor.tcpServers
    assert (port, interface) == (9443, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory)
    assert len(reactor.getDelayedCalls()) == 2
    assert {root.getServiceNamed(name).running for name in ("leases", "collector")} == {True}
    fired(root.stopService())
    assert reactor.getDelayedCalls() == []


def test_development_pki_is_made_once_and_announced(tmp_path: Path) -> None:
    """Without TLS paths, a development PKI is made, logged loudly, and reused later."""
    with capturedLogs() as events:
        make_service(config_for(tmp_path), MemoryReactorClock(), io.StringIO())
    [event] = [e for e in events if e.get("event") == "tls.development_pki"]
    directory = tmp_path / ".local/share/regdisc/dev-pki"
    assert event["directory"] == str(directory)
    assert event["log_level"] == LogLevel.warn
    assert event["how"] == "created now"
    assert event["ca"] == str(directory / "ca.pem")
    ca_before = (directory / "ca.pem").read_bytes()
    assert (directory / "server-key.pem").stat().st_mode & 0o777 == 0o600
    with capturedLogs() as events:
        make_service(config_for(tmp_path), MemoryReactorClock(), io.StringIO())
    assert [e["how"] for e in events if e.get("event") == "tls.development_pki"] == ["made earlier"]
    assert (directory / "ca.pem").read_bytes() == ca_before


def test_configured_tls_paths_generate_nothing(tmp_path: Path) -> None:
    """With TLS paths set, a missing file is a startup error naming it, and nothing is made."""
    config = config_for(
        tmp_path,
        REGDISC_TLS_CERT=str(tmp_path / "server.pem"),
        REGDISC_TLS_KEY=str(tmp_path / "server-key.pem"),
        REGDISC_TLS_CA=str(tmp_path / "ca.pem"),
    )
    with pytest.raises(StartupError) as raised:
        make_service(config, MemoryReactorClock(), io.StringIO())
    assert str(tmp_path / "server.pem") in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_configured_tls_paths_are_used(tmp_path: Path) -> None:
    """Configured material is loaded; a key that does not match is refused by name."""
    ca, ca_key = pki.make_ca()
    cert, key = pki.issue_certificate(ca, ca_key, "localhost", hosts=["localhost"])
    other_cert, _ = pki.issue_certificate(ca, ca_key, "other", hosts=["other"])
    pki.write_cert(tmp_path / "ca.pem", ca)
    pki.write_cert(tmp_path / "cert.pem", cert)
    pki.write_key(tmp_path / "key.pem", key)
    pki.write_cert(tmp_path / "other.pem", other_cert)
    paths = dict(REGDISC_TLS_KEY=str(tmp_path / "key.pem"), REGDISC_TLS_CA=str(tmp_path / "ca.pem"))
    make_service(config_for(tmp_path, REGDISC_TLS_CERT=str(tmp_path / "cert.pem"), **paths),
                 MemoryReactorClock(), io.StringIO())
    with pytest.raises(StartupError) as raised:
        make_service(config_for(tmp_path, REGDISC_TLS_CERT=str(tmp_path / "other.pem"), **paths),
                     MemoryReactorClock(), io.StringIO())
    assert "other.pem" in str(raised.value)
    assert "PRIVATE KEY" not in str(raised.value)


def test_root_hands_twistd_its_log_observer(tmp_path: Path) -> None:
    """The root service sets the log observer on twistd's Application."""
    stream = io.StringIO()
    root = make_service(config_for(tmp_path, REGDISC_LOG_FORMAT="json"), MemoryReactorClock(), stream)
    application = Application("regdisc")
    root.setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is root.observer
    Logger(observer=observer, namespace="t").info("hello {who}", who="you", event="x.y")
    line = json.loads(stream.getvalue())
    assert (line["message"], line["event"], line["who"], line["level"]) == ("hello you", "x.y", "you", "info")


def test_log_level_filters(tmp_path: Path) -> None:
    """Events below the configured level are dropped."""
    stream = io.StringIO()
    log = Logger(observer=make_observer("text", LogLevel.warn, stream))
    log.info("quiet")
    log.warn("loud")
    assert "loud" in stream.getvalue() and "quiet" not in stream.getvalue()


def test_json_lines_carry_failures() -> None:
    """A failure event's JSON line carries its traceback and stays one line."""
    stream = io.StringIO()
    log = Logger(observer=make_observer("json", LogLevel.info, stream))
    try:
        raise ValueError("bad")
    except ValueError:
        log.failure("it broke", event="x.failed")
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "x.failed" and "ValueError: bad" in record["traceback"]


def test_json_line_survives_unserializable_values() -> None:
    """Values JSON cannot hold are written as their repr."""
    line = json.loads(json_line({"log_format": "x", "thing": object(), "log_time": 0}))
    assert line["thing"].startswith("<object object")


def test_twistd_refuses_bad_settings_in_one_line(tmp_path: Path) -> None:
    """twistd with a malformed variable exits 1 with one line naming it."""
    env = {**os.environ, "HOME": str(tmp_path), "REGDISC_PORT": "abc"}
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "regdisc"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["regdisc: REGDISC_PORT: not a port: 'abc'"]
    assert not (tmp_path / ".local").exists()


def test_the_etcd_store_replaces_the_lease_manager(tmp_path: Path) -> None:
    """With the etcd store, the store is a child service and no node runs a lease manager."""
    from regdisc.etcd.store import EtcdStore

    config = config_for(tmp_path, REGDISC_STORE="etcd", REGDISC_ETCD_ENDPOINTS="http://127.0.0.1:1")
    root = make_service(config, MemoryReactorClock(), io.StringIO())
    assert isinstance(root.getServiceNamed("store"), EtcdStore)
    with pytest.raises(KeyError):
        root.getServiceNamed("leases")


def test_missing_etcd_tls_files_are_a_startup_error(tmp_path: Path) -> None:
    """A configured etcd TLS file that is missing stops startup, naming it."""
    config = config_for(
        tmp_path, REGDISC_STORE="etcd", REGDISC_ETCD_ENDPOINTS="https://127.0.0.1:1",
        REGDISC_ETCD_CERT=str(tmp_path / "c.pem"), REGDISC_ETCD_KEY=str(tmp_path / "k.pem"),
        REGDISC_ETCD_CA=str(tmp_path / "ca.pem"),
    )
    with pytest.raises(StartupError) as raised:
        make_service(config, MemoryReactorClock(), io.StringIO())
    assert "etcd TLS" in str(raised.value) and "c.pem" in str(raised.value)
