"""Mutual TLS for the server: its context, the verified peer, refused handshakes."""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocolFactory,
    IProtocolNegotiationFactory,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from .model import Peer
from .openssl import describe_ssl_error
from .pki import fingerprint_sha256

log = Logger()


class TLSFileError(Exception):
    """A configured TLS file is missing, unreadable or not what it should be."""


@attrs.frozen
class TLSFiles:
    """Where the server's certificate, its key and the root CA are."""

    cert: Path
    key: Path
    ca: Path


def server_tls_options(files: TLSFiles) -> CertificateOptions:
    """TLS 1.2 or newer, a client certificate required and checked against the CA alone.

    Giving ``trustRoot`` makes Twisted demand a peer certificate and verify it
    against that root only, never the system trust store.
    """
    cert = _read(files.cert, "certificate")
    key = _read(files.key, "private key")
    ca = _read(files.ca, "CA certificate")
    try:
        private = PrivateCertificate.loadPEM(cert + b"\n" + key)
    except Exception:
        raise TLSFileError(
            f"{files.cert} and {files.key}: not a PEM certificate and its matching private key"
        ) from None
    try:
        authority = Certificate.loadPEM(ca)
    except Exception:
        raise TLSFileError(f"{files.ca}: not a PEM CA certificate") from None
    return _ServerOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        trustRoot=trustRootFromCertificates([authority]),
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


class _ServerOptions(CertificateOptions):
    """CertificateOptions that also note why a client certificate failed verification."""

    _noting = False

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        if not self._noting:  # the context is made once and cached
            context.set_verify(context.get_verify_mode(), _note_verify_error)
            self._noting = True
        return context


def _note_verify_error(
    connection: SSL.Connection, certificate: object, error: int, depth: int, ok: int
) -> bool:
    # OpenSSL's own message is only "certificate verify failed"; keep the
    # reason on the connection's protocol for the refusal's log event.
    if not ok:
        connection.get_app_data().regdisc_verify_error = error
    return bool(ok)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSFileError(f"{path}: cannot read the TLS {what}: {e.strerror}") from None


def peer_of(certificate: x509.Certificate, address: str) -> Peer:
    """The identity a verified certificate gives its holder."""
    # Interned: every instance a certificate registers keeps its fingerprint.
    return Peer(
        certificate.subject.rfc4514_string(),
        sys.intern(fingerprint_sha256(certificate)),
        address,
    )


def peer_from_request(request: IRequest) -> Peer | None:
    """The verified client of a request's connection, or None without TLS."""
    return getattr(request.transport, "peer", None)


def tls_factory(options: CertificateOptions, factory: IProtocolFactory) -> TLSMemoryBIOFactory:
    """Serve ``factory`` over TLS, recording each verified peer and each refused handshake."""
    return TLSMemoryBIOFactory(options, False, _PeerRecordingFactory(factory))


@implementer(IHandshakeListener)
class _PeerRecordingProtocol(ProtocolWrapper):
    """Knows the verified peer of its connection once the handshake has completed."""

    _handshaken = False
    _peer: Peer | None = None

    def handshakeCompleted(self) -> None:
        self._handshaken = True

    @property
    def peer(self) -> Peer | None:
        """The verified client; worked out on first use, as most connections never need it."""
        if self._peer is None and self._handshaken:
            cert = self.transport.getPeerCertificate()
            if cert is not None:
                self._peer = peer_of(cert.to_cryptography(), _address(self.transport.getPeer()))
        return self._peer

    def connectionLost(self, reason: Failure) -> None:
        if not self._handshaken and reason.check(SSL.Error):
            text = describe_ssl_error(reason.value)
            why = _VERIFY_ERRORS.get(getattr(self.transport, "regdisc_verify_error", None))
            log.warn(
                "refused a TLS handshake from {peer_address}: {reason}",
                event="tls.handshake_refused",
                peer_address=_address(self.transport.getPeer()),
                reason=f"{text}: {why}" if why else text,
            )
        super().connectionLost(reason)


# OpenSSL's X509_V_ERR codes that tell apart the refusals operators meet most.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate (another CA?)",
    21: "unable to verify the first certificate",
    26: "unsuitable certificate purpose",
}


@implementer(IProtocolNegotiationFactory)
class _PeerRecordingFactory(WrappingFactory):
    protocol = _PeerRecordingProtocol
    noisy = False

    def acceptableProtocols(self) -> list[bytes]:
        # Twisted's ALPN callback fails the handshake when a client offers
        # protocols and the factory names none, so name the one we speak.
        return [b"http/1.1"]


def _address(address: object) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
