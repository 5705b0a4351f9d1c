"""Certificate authority, certificates and keys for regdisc's mutual TLS.

Material is made with ``cryptography`` on ECDSA P-256 and kept as in-memory
objects; the file helpers write it as PEM into a PKI directory laid out as
``ca.pem``, ``ca-key.pem`` and ``NAME.pem``, ``NAME-key.pem`` per issued name.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DevPKI",
    "PKIError",
    "cert_pem",
    "default_dev_pki_dir",
    "ensure_dev_pki",
    "fingerprint_sha256",
    "init_ca_dir",
    "issue_certificate",
    "issue_to_dir",
    "key_pem",
    "make_ca",
    "write_cert",
    "write_key",
]

_CA_LIFETIME = timedelta(days=3650)
_LEAF_LIFETIME = timedelta(days=825)
# Certificates start an hour early so that a peer whose clock lags a little
# still accepts them.
_BACKDATE = timedelta(hours=1)

_CERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)

_CA_FILE = "ca.pem"
_CA_KEY_FILE = "ca-key.pem"

_DEV_CA_NAME = "regdisc development CA"
_DEV_SERVER_NAME = "localhost"
_DEV_SERVER_HOSTS = ("localhost", "127.0.0.1", "::1")
_DEV_CLIENT_NAME = "regdisc-dev-client"


class PKIError(Exception):
    """A PKI file operation failed; the message names the file, never key material."""


# In-memory material.


def make_ca(
    common_name: str = "regdisc root CA",
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Make a self-signed CA that signs leaf certificates only (path length 0).

    Validity defaults to an hour ago until ten years on; a new P-256 key is made
    unless ``key`` is given.
    """
    if key is None:
        key = _new_key()
    start, end = _validity(not_before, not_after, _CA_LIFETIME)
    name = _name(common_name)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    server: bool = True,
    client: bool = True,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue a leaf certificate and its new P-256 key, signed by the CA.

    ``hosts`` become subject alternative names: IP literals as IP addresses,
    anything else as DNS names. ``server`` and ``client`` choose the extended
    key usages; at least one is required. Validity defaults to an hour ago
    until 825 days on.
    """
    if not (server or client):
        raise ValueError("a certificate needs server or client use, or both")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    alt_names = [_general_name(host) for host in hosts]
    key = _new_key()
    public_key = key.public_key()
    start, end = _validity(not_before, not_after, _LEAF_LIFETIME)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alt_names), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def cert_pem(cert: x509.Certificate) -> bytes:
    """Return the certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Return the SHA-256 of the certificate's DER as lowercase hex without colons."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _utc(moment: datetime) -> datetime:
    # cryptography reads naive datetimes as UTC; make that explicit so they
    # compare with aware ones.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def _validity(
    not_before: datetime | None, not_after: datetime | None, lifetime: timedelta
) -> tuple[datetime, datetime]:
    """Fill in missing validity bounds around now.

    A missing start is an hour before now, or before ``not_after`` if that is
    earlier (so an expired certificate needs only ``not_after``); a missing end
    is ``lifetime`` after now, or after ``not_before`` if that is later.
    """
    now = datetime.now(UTC)
    end_given = None if not_after is None else _utc(not_after)
    if not_before is None:
        start = min(now, end_given or now) - _BACKDATE
    else:
        start = _utc(not_before)
    end = end_given if end_given is not None else max(now, start) + lifetime
    if end <= start:
        raise ValueError("not_after must be later than not_before")
    return start, end


def _general_name(host: str) -> x509.GeneralName:
    """Return ``host`` as an IP address or DNS subject alternative name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.fullmatch(host):
        raise ValueError(f"not a host name or IP address: {host!r}")
    return x509.DNSName(host)


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


# Files.


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write the key as PEM, readable by its owner only (0600) from creation on."""
    _write_file(path, key_pem(key), 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    """Write the certificate as PEM, readable by all (0644)."""
    _write_file(path, cert_pem(cert), 0o644)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file with ``mode``, or atomically replace the old one.

    O_EXCL also refuses to follow a symlink planted at ``path``; the
    replacement goes through a temporary file made 0600 by ``mkstemp``, so key
    material is never readable by others, not even briefly.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode)
    except FileExistsError:
        pass
    else:
        try:
            _fill(fd, data, mode)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        _fill(fd, data, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fill(fd: int, data: bytes, mode: int) -> None:
    """Set the mode exactly (the umask may have narrowed it), write, sync, close."""
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _make_private_dir(directory: Path) -> None:
    """Create ``directory`` with mode 0700 if missing; leave an existing one be."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    directory.chmod(0o700)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path} does not exist") from None
    except OSError as error:
        raise PKIError(f"{path}: {error.strerror}") from None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_file(path))
    except ValueError:
        raise PKIError(f"{path} is not a PEM certificate") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    # Parse errors are replaced, not chained: their text could quote the file.
    try:
        key = serialization.load_pem_private_key(_read_file(path), password=None)
    except (ValueError, TypeError):
        raise PKIError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} is not an elliptic-curve private key")
    return key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / _CA_FILE, directory / _CA_KEY_FILE
    cert = _load_cert(cert_path)
    key = _load_key(key_path)
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        is_ca = constraints.value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PKIError(f"{cert_path} is not a CA certificate")
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise PKIError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def init_ca_dir(
    directory: Path, *, common_name: str = "regdisc root CA", force: bool = False
) -> tuple[Path, Path]:
    """Make a CA in ``directory`` as ca.pem and ca-key.pem; return those two paths.

    An existing ca.pem is replaced only with ``force``.
    """
    cert_path, key_path = directory / _CA_FILE, directory / _CA_KEY_FILE
    if cert_path.exists() and not force:
        raise PKIError(f"{cert_path} already exists")
    cert, key = make_ca(common_name)
    _make_private_dir(directory)
    # The key goes first: a ca.pem on disk always has its key beside it.
    write_key(key_path, key)
    write_cert(cert_path, cert)
    return cert_path, key_path


def issue_to_dir(
    directory: Path,
    name: str,
    *,
    hosts: Sequence[str] = (),
    server: bool = True,
    client: bool = True,
    days: int = 825,
) -> tuple[Path, Path]:
    """Issue NAME.pem and NAME-key.pem in ``directory`` from its CA; return their paths.

    The common name is ``name``. Existing files of that name are replaced.
    """
    if not _CERT_NAME.fullmatch(name):
        raise PKIError(
            f"not a certificate name: {name!r} (letters, digits, '.', '_', '-'; "
            "up to 64, starting with a letter or digit)"
        )
    # These would overwrite the CA's files or another name's key.
    if name == "ca" or name.endswith("-key"):
        raise PKIError(f"reserved certificate name: {name!r}")
    if days < 1:
        raise PKIError(f"days must be at least 1, not {days}")
    if not (server or client):
        raise PKIError("a certificate needs server or client use, or both")
    for host in hosts:
        try:
            _general_name(host)
        except ValueError as error:
            raise PKIError(str(error)) from None
    ca_cert, ca_key = _load_ca(directory)
    not_after = datetime.now(UTC) + timedelta(days=days)
    cert, key = issue_certificate(
        ca_cert,
        ca_key,
        name,
        hosts=hosts,
        server=server,
        client=client,
        not_after=not_after,
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    write_key(key_path, key)
    write_cert(cert_path, cert)
    return cert_path, key_path


# Development PKI.


@attrs.frozen
class DevPKI:
    """Paths of the development CA and its server and client certificates."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> DevPKI:
        """Return the development PKI paths inside ``directory``."""
        return cls(
            directory=directory,
            ca_cert=directory / _CA_FILE,
            server_cert=directory / "server.pem",
            server_key=directory / "server-key.pem",
            client_cert=directory / "client.pem",
            client_key=directory / "client-key.pem",
        )


def _dev_files(pki: DevPKI) -> tuple[Path, ...]:
    """Return the five files of a development PKI, the client certificate last."""
    return (
        pki.ca_cert,
        pki.server_key,
        pki.server_cert,
        pki.client_key,
        pki.client_cert,
    )


def ensure_dev_pki(directory: Path) -> tuple[DevPKI, bool]:
    """Return the development PKI in ``directory``, making it if incomplete.

    The flag says whether new material was made. When any of the five files is
    missing, all are made anew from a new CA, never mixed with old ones.
    """
    pki = DevPKI.in_directory(directory)
    if all(path.exists() for path in _dev_files(pki)):
        return pki, False
    ca_cert, ca_key = make_ca(_DEV_CA_NAME)
    server_cert, server_key = issue_certificate(
        ca_cert, ca_key, _DEV_SERVER_NAME, hosts=_DEV_SERVER_HOSTS, client=False
    )
    client_cert, client_key = issue_certificate(
        ca_cert, ca_key, _DEV_CLIENT_NAME, server=False
    )
    _make_private_dir(directory)
    # Remove the old set first and write the client certificate last, so that
    # an interrupted run leaves a set that the next call regenerates.
    ca_key_path = directory / _CA_KEY_FILE
    for path in (ca_key_path, *_dev_files(pki)):
        path.unlink(missing_ok=True)
    write_key(ca_key_path, ca_key)
    write_cert(pki.ca_cert, ca_cert)
    write_key(pki.server_key, server_key)
    write_cert(pki.server_cert, server_cert)
    write_key(pki.client_key, client_key)
    write_cert(pki.client_cert, client_cert)
    return pki, True


def default_dev_pki_dir(environ: Mapping[str, str]) -> Path:
    """Return where the development PKI lives according to ``environ``.

    REGDISC_DEV_PKI_DIR if set, else regdisc/dev-pki under XDG_DATA_HOME
    (ignored unless absolute, as the XDG spec says) or ~/.local/share.
    """
    explicit = environ.get("REGDISC_DEV_PKI_DIR")
    if explicit:
        return Path(explicit)
    data_home = environ.get("XDG_DATA_HOME")
    if data_home and Path(data_home).is_absolute():
        base = Path(data_home)
    else:
        home = environ.get("HOME")
        base = (Path(home) if home else Path.home()) / ".local" / "share"
    return base / "regdisc" / "dev-pki"
