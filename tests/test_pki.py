"""Tests for regdisc.pki: CA, issued certificates, files and the development PKI."""

from __future__ import annotations

import hashlib
import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from regdisc.pki import (
    DevPKI,
    PKIError,
    cert_pem,
    default_dev_pki_dir,
    ensure_dev_pki,
    fingerprint_sha256,
    init_ca_dir,
    issue_certificate,
    issue_to_dir,
    key_pem,
    make_ca,
    write_cert,
    write_key,
)

SERVER = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
JAN_2020 = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return make_ca()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(extension(cert, x509.ExtendedKeyUsage).value)


def alt_names(cert: x509.Certificate) -> tuple[list[str], list[object]]:
    sans = extension(cert, x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.DNSName), sans.get_values_for_type(
        x509.IPAddress
    )


def same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


# make_ca


def test_ca_is_self_signed_p256_ca(ca) -> None:
    """make_ca makes a self-signed P-256 CA limited to signing leaf certificates."""
    cert, key = ca
    cert.verify_directly_issued_by(cert)
    assert cert.subject == cert.issuer
    assert common_name(cert) == "regdisc root CA"
    assert isinstance(key.curve, ec.SECP256R1)
    assert same_key(cert, key)
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    key_usage = extension(cert, x509.KeyUsage)
    assert key_usage.critical
    assert key_usage.value.key_cert_sign and key_usage.value.crl_sign
    assert not key_usage.value.digital_signature
    ski = extension(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def test_ca_default_validity() -> None:
    """A CA is valid from an hour ago for ten years by default."""
    before = datetime.now(UTC)
    cert, _ = make_ca()
    after = datetime.now(UTC)
    hour = timedelta(hours=1)
    assert (
        before - hour - timedelta(seconds=1)
        <= cert.not_valid_before_utc
        <= after - hour
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(days=3650) + hour


def test_ca_uses_given_name_key_and_validity() -> None:
    """make_ca signs with a given key and honours the given name and validity."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert, returned = make_ca(
        "other CA", key=key, not_before=JAN_2020, not_after=JAN_2020 + timedelta(days=1)
    )
    assert returned is key
    assert same_key(cert, key)
    assert common_name(cert) == "other CA"
    assert cert.not_valid_before_utc == JAN_2020
    assert cert.not_valid_after_utc == JAN_2020 + timedelta(days=1)


# issue_certificate


def test_issued_certificate_verifies_against_its_ca(ca) -> None:
    """An issued leaf is signed by its CA, not by a foreign CA of the same name."""
    ca_cert, ca_key = ca
    cert, key = issue_certificate(ca_cert, ca_key, "web")
    cert.verify_directly_issued_by(ca_cert)
    assert same_key(cert, key)
    foreign, _ = make_ca()
    assert foreign.subject == ca_cert.subject
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(foreign)


def test_issued_certificate_extensions(ca) -> None:
    """A leaf is no CA, may only sign, and names its CA's key."""
    ca_cert, ca_key = ca
    cert, key = issue_certificate(ca_cert, ca_key, "web")
    assert common_name(cert) == "web"
    assert cert.issuer == ca_cert.subject
    assert isinstance(key.curve, ec.SECP256R1)
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    key_usage = extension(cert, x509.KeyUsage)
    assert key_usage.critical
    assert key_usage.value.digital_signature and not key_usage.value.key_cert_sign
    aki = extension(cert, x509.AuthorityKeyIdentifier).value
    ski = extension(ca_cert, x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_issued_certificate_default_validity(ca) -> None:
    """A leaf is valid from an hour ago for 825 days by default."""
    cert, _ = issue_certificate(*ca, "web")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(days=825, hours=1)


def test_hosts_become_dns_and_ip_alt_names(ca) -> None:
    """Hosts become DNS names, and IPv4 and IPv6 literals become IP addresses."""
    cert, _ = issue_certificate(
        *ca, "web", hosts=["localhost", "127.0.0.1", "::1", "web.example.org"]
    )
    dns, ips = alt_names(cert)
    assert dns == ["localhost", "web.example.org"]
    assert ips == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def test_no_hosts_no_alt_names(ca) -> None:
    """Without hosts a certificate has no subject alternative names."""
    cert, _ = issue_certificate(*ca, "client", server=False)
    with pytest.raises(x509.ExtensionNotFound):
        extension(cert, x509.SubjectAlternativeName)


def test_bad_host_is_refused(ca) -> None:
    """A host that is neither a DNS name nor an IP address is refused."""
    with pytest.raises(ValueError, match="'a b'"):
        issue_certificate(*ca, "web", hosts=["a b"])


@pytest.mark.parametrize(
    ("server", "client", "expected"),
    [(True, True, {SERVER, CLIENT}), (True, False, {SERVER}), (False, True, {CLIENT})],
)
def test_extended_key_usage_follows_options(ca, server, client, expected) -> None:
    """The server and client options choose the extended key usages."""
    cert, _ = issue_certificate(*ca, "web", server=server, client=client)
    assert usages(cert) == expected


def test_certificate_without_use_is_refused(ca) -> None:
    """A certificate for neither server nor client use is refused."""
    with pytest.raises(ValueError):
        issue_certificate(*ca, "web", server=False, client=False)


def test_custom_validity_is_honoured(ca) -> None:
    """Given validity bounds make expired and not-yet-valid certificates."""
    expired, _ = issue_certificate(
        *ca, "old", not_before=JAN_2020, not_after=JAN_2020 + timedelta(days=1)
    )
    assert expired.not_valid_before_utc == JAN_2020
    assert expired.not_valid_after_utc == JAN_2020 + timedelta(days=1)
    assert expired.not_valid_after_utc < datetime.now(UTC)
    future = datetime(2999, 1, 1, tzinfo=UTC)
    early, _ = issue_certificate(*ca, "early", not_before=future)
    assert early.not_valid_before_utc == future
    assert early.not_valid_after_utc == future + timedelta(days=825)


def test_past_end_alone_gives_expired_certificate(ca) -> None:
    """With only a past end, a certificate starts an hour before it."""
    cert, _ = issue_certificate(*ca, "old", not_after=JAN_2020)
    assert cert.not_valid_after_utc == JAN_2020
    assert cert.not_valid_before_utc == JAN_2020 - timedelta(hours=1)


def test_naive_datetimes_are_utc(ca) -> None:
    """Naive validity bounds are read as UTC."""
    naive = JAN_2020.replace(tzinfo=None)
    cert, _ = issue_certificate(
        *ca, "old", not_before=naive, not_after=naive + timedelta(days=1)
    )
    assert cert.not_valid_before_utc == JAN_2020


def test_end_before_start_is_refused(ca) -> None:
    """A validity that ends before it starts is refused."""
    with pytest.raises(ValueError):
        issue_certificate(
            *ca, "web", not_before=JAN_2020, not_after=JAN_2020 - timedelta(days=1)
        )


def test_serials_are_random(ca) -> None:
    """Two certificates get different serial numbers."""
    first, _ = issue_certificate(*ca, "web")
    second, _ = issue_certificate(*ca, "web")
    assert first.serial_number != second.serial_number


# PEM and fingerprints


def test_pem_round_trips(ca) -> None:
    """cert_pem and key_pem give PEM that loads back; the key is unencrypted PKCS#8."""
    cert, key = ca
    assert x509.load_pem_x509_certificate(cert_pem(cert)) == cert
    pem = key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert loaded.private_numbers() == key.private_numbers()


def test_fingerprint_is_sha256_of_der(ca) -> None:
    """The fingerprint is the lowercase hex SHA-256 of the DER, without colons."""
    cert, _ = ca
    fingerprint = fingerprint_sha256(cert)
    assert len(fingerprint) == 64
    assert set(fingerprint) <= set("0123456789abcdef")
    der = cert.public_bytes(serialization.Encoding.DER)
    assert fingerprint == hashlib.sha256(der).hexdigest()


# write_key and write_cert


def test_write_key_and_cert_modes(tmp_path, ca) -> None:
    """Keys are written 0600 and certificates 0644."""
    cert, key = ca
    write_key(tmp_path / "k.pem", key)
    write_cert(tmp_path / "c.pem", cert)
    assert mode(tmp_path / "k.pem") == 0o600
    assert mode(tmp_path / "c.pem") == 0o644
    assert load_key(tmp_path / "k.pem").private_numbers() == key.private_numbers()
    assert load_cert(tmp_path / "c.pem") == cert


def test_write_key_replaces_existing_file_as_0600(tmp_path, ca) -> None:
    """Writing over a readable file leaves only the key, mode 0600, no temporaries."""
    _, key = ca
    path = tmp_path / "k.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_key(path, key)
    assert mode(path) == 0o600
    assert path.read_bytes() == key_pem(key)
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]


def test_write_key_replaces_symlink_without_following_it(tmp_path, ca) -> None:
    """A symlink at the key's path is replaced, and its target is left untouched."""
    _, key = ca
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    path = tmp_path / "k.pem"
    path.symlink_to(target)
    write_key(path, key)
    assert not path.is_symlink()
    assert target.read_bytes() == b"untouched"
    assert path.read_bytes() == key_pem(key)


# init_ca_dir


def test_init_ca_dir_writes_ca(tmp_path) -> None:
    """init_ca_dir makes a 0700 directory holding ca.pem and its 0600 key."""
    directory = tmp_path / "a" / "pki"
    cert_path, key_path = init_ca_dir(directory, common_name="test CA")
    assert (cert_path, key_path) == (directory / "ca.pem", directory / "ca-key.pem")
    assert mode(directory) == 0o700
    assert mode(cert_path) == 0o644
    assert mode(key_path) == 0o600
    cert = load_cert(cert_path)
    assert common_name(cert) == "test CA"
    assert same_key(cert, load_key(key_path))


def test_init_ca_dir_refuses_to_overwrite(tmp_path) -> None:
    """init_ca_dir refuses an existing CA, naming ca.pem, and leaves it as it was."""
    cert_path, key_path = init_ca_dir(tmp_path)
    before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(PKIError, match=r"ca\.pem already exists") as error:
        init_ca_dir(tmp_path)
    assert str(tmp_path / "ca.pem") in str(error.value)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_init_ca_dir_force_replaces(tmp_path) -> None:
    """With force, init_ca_dir replaces the CA with a new one."""
    cert_path, _ = init_ca_dir(tmp_path)
    before = cert_path.read_bytes()
    init_ca_dir(tmp_path, force=True)
    assert cert_path.read_bytes() != before


# issue_to_dir


def test_issue_to_dir_writes_certificate_and_key(tmp_path) -> None:
    """issue_to_dir writes NAME.pem and a 0600 NAME-key.pem from the directory's CA."""
    init_ca_dir(tmp_path)
    cert_path, key_path = issue_to_dir(
        tmp_path, "web-1.example", hosts=["web-1.example", "10.0.0.1"], days=30
    )
    assert cert_path == tmp_path / "web-1.example.pem"
    assert key_path == tmp_path / "web-1.example-key.pem"
    assert mode(key_path) == 0o600
    cert = load_cert(cert_path)
    cert.verify_directly_issued_by(load_cert(tmp_path / "ca.pem"))
    assert same_key(cert, load_key(key_path))
    assert common_name(cert) == "web-1.example"
    assert alt_names(cert) == (["web-1.example"], [ipaddress.ip_address("10.0.0.1")])
    assert usages(cert) == {SERVER, CLIENT}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(days=30, hours=1)


def test_issue_to_dir_client_only(tmp_path) -> None:
    """issue_to_dir passes the server and client options on."""
    init_ca_dir(tmp_path)
    cert_path, _ = issue_to_dir(tmp_path, "agent", server=False)
    assert usages(load_cert(cert_path)) == {CLIENT}


@pytest.mark.parametrize("missing", ["ca.pem", "ca-key.pem"])
def test_issue_without_ca_names_missing_file(tmp_path, missing) -> None:
    """Issuing without a CA fails with an error naming the missing file."""
    init_ca_dir(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(PKIError) as error:
        issue_to_dir(tmp_path, "web")
    assert str(tmp_path / missing) in str(error.value)
    assert not (tmp_path / "web.pem").exists()


def test_issue_in_empty_directory_names_ca_pem(tmp_path) -> None:
    """Issuing from an empty directory fails naming its ca.pem."""
    with pytest.raises(PKIError, match=r"ca\.pem"):
        issue_to_dir(tmp_path, "web")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "web\n",
        "-web",
        ".web",
        "a/b",
        "../x",
        "a b",
        "w" * 65,
        "wéb",
        "ca",
        "ca-key",
        "web-key",
    ],
)
def test_bad_names_are_refused(tmp_path, name) -> None:
    """Names that are malformed or would clobber the CA or another key are refused."""
    init_ca_dir(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(PKIError):
        issue_to_dir(tmp_path, name)
    assert sorted(tmp_path.iterdir()) == before


def test_longest_name_is_accepted(tmp_path) -> None:
    """A 64-character name is accepted."""
    init_ca_dir(tmp_path)
    issue_to_dir(tmp_path, "w" * 64, server=False)
    assert (tmp_path / ("w" * 64 + ".pem")).exists()


def test_issue_refuses_bad_host_and_days(tmp_path) -> None:
    """issue_to_dir refuses a malformed host or fewer than one day as PKIError."""
    init_ca_dir(tmp_path)
    with pytest.raises(PKIError, match="'bad host'"):
        issue_to_dir(tmp_path, "web", hosts=["bad host"])
    with pytest.raises(PKIError, match="not a host name"):
        issue_to_dir(tmp_path, "web", hosts=["web.example\n"])
    with pytest.raises(PKIError, match="days"):
        issue_to_dir(tmp_path, "web", days=0)


def test_mismatched_ca_key_is_refused(tmp_path) -> None:
    """A ca-key.pem that is not the key of ca.pem is refused."""
    init_ca_dir(tmp_path)
    _, other_key = make_ca()
    write_key(tmp_path / "ca-key.pem", other_key)
    with pytest.raises(PKIError, match=r"ca-key\.pem is not the key of"):
        issue_to_dir(tmp_path, "web")


def test_leaf_as_ca_is_refused(tmp_path) -> None:
    """A ca.pem that is not a CA certificate is refused."""
    init_ca_dir(tmp_path)
    issue_to_dir(tmp_path, "web")
    (tmp_path / "web.pem").replace(tmp_path / "ca.pem")
    (tmp_path / "web-key.pem").replace(tmp_path / "ca-key.pem")
    with pytest.raises(PKIError, match="not a CA certificate"):
        issue_to_dir(tmp_path, "other")


def test_unreadable_key_error_shows_no_key_material(tmp_path) -> None:
    """A damaged CA key is reported by file name without any of its content."""
    init_ca_dir(tmp_path)
    key_path = tmp_path / "ca-key.pem"
    lines = key_path.read_bytes().splitlines()
    damaged = b"\n".join(lines[:2] + lines[3:])
    key_path.write_bytes(damaged)
    with pytest.raises(PKIError) as error:
        issue_to_dir(tmp_path, "web")
    message = str(error.value)
    assert str(key_path) in message
    assert "\n" not in message
    for line in damaged.splitlines()[1:-1]:
        assert line.decode() not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


# ensure_dev_pki


def test_ensure_dev_pki_creates_material(tmp_path) -> None:
    """ensure_dev_pki makes a CA, a localhost server and a client certificate."""
    directory = tmp_path / "dev"
    pki, created = ensure_dev_pki(directory)
    assert created
    assert pki == DevPKI.in_directory(directory)
    assert mode(directory) == 0o700
    assert mode(pki.server_key) == mode(pki.client_key) == 0o600
    assert mode(directory / "ca-key.pem") == 0o600
    ca = load_cert(pki.ca_cert)
    assert common_name(ca) == "regdisc development CA"
    assert same_key(ca, load_key(directory / "ca-key.pem"))

    server = load_cert(pki.server_cert)
    server.verify_directly_issued_by(ca)
    assert same_key(server, load_key(pki.server_key))
    assert common_name(server) == "localhost"
    assert alt_names(server) == (
        ["localhost"],
        [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
    )
    assert usages(server) == {SERVER}

    client = load_cert(pki.client_cert)
    client.verify_directly_issued_by(ca)
    assert same_key(client, load_key(pki.client_key))
    assert common_name(client) == "regdisc-dev-client"
    assert usages(client) == {CLIENT}


def test_dev_pki_paths() -> None:
    """DevPKI.in_directory names the five files inside the directory."""
    pki = DevPKI.in_directory(Path("/d"))
    assert pki == DevPKI(
        directory=Path("/d"),
        ca_cert=Path("/d/ca.pem"),
        server_cert=Path("/d/server.pem"),
        server_key=Path("/d/server-key.pem"),
        client_cert=Path("/d/client.pem"),
        client_key=Path("/d/client-key.pem"),
    )


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_ensure_dev_pki_reuses_complete_material(tmp_path) -> None:
    """A complete development PKI is returned as it is, with nothing written."""
    first, _ = ensure_dev_pki(tmp_path)
    before = snapshot(tmp_path)
    second, created = ensure_dev_pki(tmp_path)
    assert not created
    assert second == first
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "lost", ["ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"]
)
def test_ensure_dev_pki_regenerates_partial_material(tmp_path, lost) -> None:
    """When one file is lost, everything is made anew from a new CA."""
    pki, _ = ensure_dev_pki(tmp_path)
    old = snapshot(tmp_path)
    (tmp_path / lost).unlink()
    again, created = ensure_dev_pki(tmp_path)
    assert created
    assert again == pki
    new = snapshot(tmp_path)
    assert set(new) == set(old)
    for name in new:
        assert new[name][0] != old[name][0], name
    ca = load_cert(pki.ca_cert)
    assert same_key(ca, load_key(tmp_path / "ca-key.pem"))
    for cert_path, key_path in [
        (pki.server_cert, pki.server_key),
        (pki.client_cert, pki.client_key),
    ]:
        cert = load_cert(cert_path)
        cert.verify_directly_issued_by(ca)
        assert same_key(cert, load_key(key_path))


# default_dev_pki_dir


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"REGDISC_DEV_PKI_DIR": "/srv/pki", "XDG_DATA_HOME": "/x", "HOME": "/h"},
            "/srv/pki",
        ),
        ({"XDG_DATA_HOME": "/x", "HOME": "/h"}, "/x/regdisc/dev-pki"),
        ({"HOME": "/h"}, "/h/.local/share/regdisc/dev-pki"),
        (
            {"REGDISC_DEV_PKI_DIR": "", "XDG_DATA_HOME": "", "HOME": "/h"},
            "/h/.local/share/regdisc/dev-pki",
        ),
        (
            {"XDG_DATA_HOME": "relative", "HOME": "/h"},
            "/h/.local/share/regdisc/dev-pki",
        ),
    ],
)
def test_default_dev_pki_dir(environ, expected) -> None:
    """The directory comes from REGDISC_DEV_PKI_DIR, else XDG_DATA_HOME, else HOME."""
    assert default_dev_pki_dir(environ) == Path(expected)


def test_default_dev_pki_dir_without_home() -> None:
    """Without HOME in the mapping, the user's home directory is used."""
    assert default_dev_pki_dir({}) == Path.home() / ".local/share/regdisc/dev-pki"
