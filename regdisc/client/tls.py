"""Mutual TLS for clients: present our certificate, check the registry's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import attrs
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ..pki import default_dev_pki_dir


class ClientTLSError(Exception):
    """Client TLS material is missing or unusable; the message names the file."""


@attrs.frozen
class ClientTLS:
    """Our certificate and key, and the root CA the registry's certificate must chain to."""

    certificate: PrivateCertificate = attrs.field(repr=False)
    authority: Certificate

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path) -> ClientTLS:
        """Load PEM files; raise `ClientTLSError` naming any file that will not do."""
        material = {path: _read(path) for path in (cert, key, ca)}
        try:
            certificate = PrivateCertificate.loadPEM(material[cert] + b"\n" + material[key])
        except Exception:
            raise ClientTLSError(
                f"{cert} and {key}: not a PEM certificate and its matching private key"
            ) from None
        try:
            authority = Certificate.loadPEM(material[ca])
        except Exception:
            raise ClientTLSError(f"{ca}: not a PEM CA certificate") from None
        return cls(certificate, authority)

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str],
        cert: Path | None = None,
        key: Path | None = None,
        ca: Path | None = None,
    ) -> ClientTLS:
        """Load the given paths, else ``REGDISC_CLIENT_CERT``, ``REGDISC_CLIENT_KEY``
        and ``REGDISC_CA``, else the development PKI's client material.

        So on a development machine, a client of ``twistd -n regdisc`` needs no setting.
        """
        dev = default_dev_pki_dir(environ)

        def choose(given: Path | None, variable: str, fallback: str) -> Path:
            return given or Path(environ.get(variable) or dev / fallback)

        return cls.from_files(
            choose(cert, "REGDISC_CLIENT_CERT", "client.pem"),
            choose(key, "REGDISC_CLIENT_KEY", "client-key.pem"),
            choose(ca, "REGDISC_CA", "ca.pem"),
        )

    def policy(self) -> IPolicyForHTTPS:
        """The policy an Agent uses to open TLS connections to the registry."""
        return _Policy(self)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ClientTLSError(f"{path}: {e.strerror}") from None


@implementer(IPolicyForHTTPS)
class _Policy:
    """Checks the registry's certificate and host name against our CA only."""

    def __init__(self, tls: ClientTLS) -> None:
        self._tls = tls
        self._creators: dict[tuple[bytes, int], Any] = {}

    def creatorForNetloc(self, hostname: bytes, port: int):  # type: ignore[no-untyped-def]
        # The Agent asks for every request, pooled connection or not, and making
        # one costs more than the request: keep one per host (it makes a fresh
        # TLS connection each time it is used).
        creator = self._creators.get((hostname, port))
        if creator is None:
            # service_identity checks the host name inside optionsForClientTLS.
            creator = self._creators[hostname, port] = optionsForClientTLS(
                hostname.decode("ascii"),
                trustRoot=self._tls.authority,
                clientCertificate=self._tls.certificate,
            )
        return creator
