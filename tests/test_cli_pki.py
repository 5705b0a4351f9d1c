"""Tests for the ``regdisc pki`` command line, in process and as a real process."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from regdisc.cli import main

REPO = Path(__file__).resolve().parent.parent
SERVER = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def alt_names(cert: x509.Certificate) -> list[object]:
    return list(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )


def error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("regdisc: error: ")
    return lines[0]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    assert main(["pki", "init", str(directory)]) == 0
    return directory


# In process.


def test_init_prints_written_paths(tmp_path, capsys) -> None:
    """pki init writes the CA and prints both paths, one per line."""
    directory = tmp_path / "pki"
    assert main(["pki", "init", str(directory), "--cn", "Test CA"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        str(directory / "ca.pem"),
        str(directory / "ca-key.pem"),
    ]
    assert err == ""
    cert = load_cert(directory / "ca.pem")
    assert (
        cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    )


def test_init_refuses_existing_ca(ca_dir, capsys) -> None:
    """pki init over an existing CA exits 1 with one error line naming ca.pem."""
    capsys.readouterr()
    before = (ca_dir / "ca.pem").read_bytes()
    assert main(["pki", "init", str(ca_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert error_line(err) == f"regdisc: error: {ca_dir / 'ca.pem'} already exists"
    assert (ca_dir / "ca.pem").read_bytes() == before


def test_init_force_replaces_ca(ca_dir) -> None:
    """pki init --force replaces an existing CA."""
    before = (ca_dir / "ca.pem").read_bytes()
    assert main(["pki", "init", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "ca.pem").read_bytes() != before


def test_init_reports_os_error(tmp_path, capsys) -> None:
    """pki init into a path that is a file exits 1 with one error line."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["pki", "init", str(blocker)]) == 1
    assert "Not a directory" in error_line(capsys.readouterr().err)


def test_issue_defaults_to_both_uses_and_name_as_host(ca_dir, capsys) -> None:
    """pki issue makes a server and client certificate for the host NAME by default."""
    capsys.readouterr()
    assert main(["pki", "issue", "web", "--dir", str(ca_dir)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == [str(ca_dir / "web.pem"), str(ca_dir / "web-key.pem")]
    cert = load_cert(ca_dir / "web.pem")
    cert.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))
    assert usages(cert) == {SERVER, CLIENT}
    assert alt_names(cert) == [x509.DNSName("web")]


def test_issue_repeated_hosts(ca_dir) -> None:
    """Each --host becomes a subject alternative name."""
    argv = ["pki", "issue", "web", "--dir", str(ca_dir)]
    assert main([*argv, "--host", "web.example", "--host", "::1"]) == 0
    assert alt_names(load_cert(ca_dir / "web.pem")) == [
        x509.DNSName("web.example"),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]


def test_issue_server_only(ca_dir) -> None:
    """--server issues for server use only."""
    assert main(["pki", "issue", "api", "--dir", str(ca_dir), "--server"]) == 0
    cert = load_cert(ca_dir / "api.pem")
    assert usages(cert) == {SERVER}
    assert alt_names(cert) == [x509.DNSName("api")]


def test_issue_client_only(ca_dir) -> None:
    """--client issues for client use only, with no host names."""
    assert main(["pki", "issue", "agent", "--dir", str(ca_dir), "--client"]) == 0
    cert = load_cert(ca_dir / "agent.pem")
    assert usages(cert) == {CLIENT}
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_issue_days(ca_dir) -> None:
    """--days sets how long the certificate is valid."""
    assert main(["pki", "issue", "web", "--dir", str(ca_dir), "--days", "30"]) == 0
    cert = load_cert(ca_dir / "web.pem")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(days=30, hours=1)


def test_issue_without_ca_fails(tmp_path, capsys) -> None:
    """pki issue from a directory without a CA exits 1 naming ca.pem."""
    assert main(["pki", "issue", "web", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert str(tmp_path / "ca.pem") in error_line(err)


@pytest.mark.parametrize("name", ["-", "a/b", "ca", "bad_host"])
def test_issue_bad_name_fails(ca_dir, capsys, name) -> None:
    """A bad certificate name, or one that is no host name for a server, exits 1."""
    capsys.readouterr()
    assert main(["pki", "issue", "--dir", str(ca_dir), "--", name]) == 1
    error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["pki"],
        ["nope"],
        ["pki", "init"],
        ["pki", "issue", "web"],
        ["pki", "issue", "web", "--dir", "d", "--server", "--client"],
        ["pki", "issue", "web", "--dir", "d", "--days", "0"],
        ["pki", "issue", "web", "--dir", "d", "--days", "x"],
    ],
)
def test_usage_errors_exit_2(argv, capsys) -> None:
    """Usage errors exit with status 2 and a usage message."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert "usage: regdisc" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["pki", "--help"], ["pki", "init", "--help"], ["pki", "issue", "-h"]],
)
def test_help_on_every_verb(argv, capsys) -> None:
    """--help works on every verb and sub-verb and exits 0."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: regdisc")


# As a real process.


def regdisc(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])
    )
    return subprocess.run(
        [sys.executable, "-m", "regdisc.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_process_init_then_issue(tmp_path) -> None:
    """The command makes a CA and issues a certificate that verifies against it."""
    directory = tmp_path / "pki"
    init = regdisc("pki", "init", str(directory))
    assert (init.returncode, init.stderr) == (0, "")
    issue = regdisc(
        "pki", "issue", "web", "--dir", str(directory), "--host", "127.0.0.1"
    )
    assert (issue.returncode, issue.stderr) == (0, "")
    assert issue.stdout.splitlines() == [
        str(directory / "web.pem"),
        str(directory / "web-key.pem"),
    ]
    cert = load_cert(directory / "web.pem")
    cert.verify_directly_issued_by(load_cert(directory / "ca.pem"))
    assert alt_names(cert) == [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    assert (directory / "web-key.pem").stat().st_mode & 0o777 == 0o600


def test_process_issue_without_ca_fails(tmp_path) -> None:
    """The command exits 1 with one error line when the directory has no CA."""
    result = regdisc("pki", "issue", "x", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert str(tmp_path / "ca.pem") in error_line(result.stderr)


def test_process_usage_error_exits_2(tmp_path) -> None:
    """The command exits 2 on a usage error."""
    result = regdisc("pki", "issue", "x")
    assert result.returncode == 2
    assert "usage: regdisc pki issue" in result.stderr
