"""The daemon over real mutual TLS on the loopback interface.

Each test starts the daemon from `make_service` on a port of its own and talks
to it with treq through a non-persistent pool: the happy path, the peer
identity the handlers see, the handshakes the server (or the client) refuses,
TLS versions and IPv6. Every wait is on a Deferred with a timeout.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from regdisc.config import load_config
from regdisc.pki import (
    cert_pem,
    fingerprint_sha256,
    issue_certificate,
    key_pem,
    make_ca,
    write_cert,
    write_key,
)
from regdisc.tap import listening_port, make_service

TIMEOUT = 10
"""Seconds any single wait may take before the test fails instead of hanging."""

SERVER_HOSTS = ("localhost", "127.0.0.1", "::1")
LOOPBACK = "tcp:0:interface=127.0.0.1"
LOOPBACK6 = r"tcp6:0:interface=\:\:1"

Key = ec.EllipticCurvePrivateKey

# Twisted hands pyOpenSSL its own key objects, which pyOpenSSL deprecates; as an
# error that warning would fail each handshake inside the reactor (STYLE 11).
pytestmark = pytest.mark.filterwarnings("ignore:.*pyOpenSSL.*:DeprecationWarning")


# PKI.


@attrs.frozen
class Identity:
    """A certificate and its key, in memory and written as PEM files."""

    cert: x509.Certificate
    key: Key
    cert_path: Path
    key_path: Path

    def private_certificate(self) -> PrivateCertificate:
        return PrivateCertificate.loadPEM(cert_pem(self.cert) + key_pem(self.key))


@attrs.frozen
class PKI:
    """A CA and what it issues, under one directory."""

    directory: Path
    ca_cert: x509.Certificate
    ca_key: Key
    ca_path: Path

    @classmethod
    def create(cls, directory: Path, common_name: str) -> PKI:
        directory.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = make_ca(common_name)
        ca_path = directory / "ca.pem"
        write_cert(ca_path, ca_cert)
        return cls(directory, ca_cert, ca_key, ca_path)

    def issue(self, name: str, **kwargs: Any) -> Identity:
        cert, key = issue_certificate(self.ca_cert, self.ca_key, name, **kwargs)
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        write_cert(cert_path, cert)
        write_key(key_path, key)
        return Identity(cert, key, cert_path, key_path)

    def trust_root(self) -> Certificate:
        return Certificate.loadPEM(cert_pem(self.ca_cert))


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI.create(tmp_path / "pki", "regdisc test CA")


@pytest.fixture
def server_identity(pki: PKI) -> Identity:
    return pki.issue("server", hosts=SERVER_HOSTS, server=True, client=False)


@pytest.fixture
def alice(pki: PKI) -> Identity:
    return pki.issue("alice", server=False, client=True)


@pytest.fixture
def bob(pki: PKI) -> Identity:
    return pki.issue("bob", server=False, client=True)


# Log events.


@implementer(ILogObserver)
class Events:
    """Structured log events seen while a test runs, by their ``event`` key."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._waiting: list[tuple[str, Deferred]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.seen.append(event)
        for waiter in list(self._waiting):
            name, d = waiter
            if event.get("event") == name:
                self._waiting.remove(waiter)
                # Fire in a later turn, not inside the emitter's call.
                reactor.callLater(0, d.callback, event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e.get("event") == name]

    def wait_for(self, name: str) -> Deferred:
        """Fires with the first event called ``name``, already seen or still to come."""
        found = self.named(name)
        if found:
            return _succeed_later(found[0])
        d: Deferred = Deferred()
        self._waiting.append((name, d))
        return d.addTimeout(TIMEOUT, reactor)


def _succeed_later(value: Any) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(0, d.callback, value)
    return d


@pytest.fixture
def events() -> Any:
    observer = Events()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


# The daemon.


@attrs.frozen
class Daemon:
    root: Any
    url: str
    stream: io.StringIO


@pytest_twisted.async_yield_fixture
async def start_daemon(tmp_path: Path) -> Any:
    """A function that starts a daemon; every daemon it started is stopped afterwards."""
    roots: list[Any] = []

    async def start(pki: PKI, server: Identity, listen: str = LOOPBACK) -> Daemon:
        config = load_config(
            {
                "REGDISC_LISTEN": listen,
                "REGDISC_TLS_CERT": str(server.cert_path),
                "REGDISC_TLS_KEY": str(server.key_path),
                "REGDISC_TLS_CA": str(pki.ca_path),
                "HOME": str(tmp_path),
            },
            {},
        )
        # The daemon's own observer is installed by twistd only; the stream
        # just keeps stdout clean. Tests read events through `Events`.
        stream = io.StringIO()
        root = make_service(config, reactor, stream=stream)
        root.startService()
        roots.append(root)
        port = await listening_port(root).addTimeout(TIMEOUT, reactor)
        host = port.getHost()
        netloc = f"[{host.host}]" if ":" in host.host else host.host
        return Daemon(root, f"https://{netloc}:{host.port}", stream)

    yield start
    for root in roots:
        await root.stopService()


# Clients.


@implementer(IPolicyForHTTPS)
class ClientTLSPolicy:
    """Trust one CA for the server's certificate and present a client certificate, if any."""

    def __init__(self, trust_root: Certificate, client: PrivateCertificate | None) -> None:
        self._trust_root = trust_root
        self._client = client

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        kwargs: dict[str, Any] = {"trustRoot": self._trust_root}
        if self._client is not None:
            kwargs["clientCertificate"] = self._client
        return optionsForClientTLS(hostname.decode("ascii"), **kwargs)


@implementer(IPolicyForHTTPS)
class FixedOptionsPolicy:
    """Use one context factory for every connection (no host name check)."""

    def __init__(self, options: Any) -> None:
        self._options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self._options


@pytest.fixture
def make_agent() -> Any:
    """A function that makes an Agent for a TLS policy; its pool is closed afterwards."""
    pools: list[HTTPConnectionPool] = []

    def make(policy: IPolicyForHTTPS) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=False)
        pools.append(pool)
        return Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=TIMEOUT)

    yield make
    for pool in pools:
        pytest_twisted.blockon(pool.closeCachedConnections())


@pytest.fixture
def make_client(make_agent: Callable) -> Callable:
    """A function that makes a treq client for a TLS policy."""
    return lambda policy: treq.client.HTTPClient(make_agent(policy))


def client_for(make_client: Callable, pki: PKI, identity: Identity | None) -> Any:
    """A client trusting ``pki`` that presents ``identity``, or no certificate."""
    certificate = identity.private_certificate() if identity is not None else None
    return make_client(ClientTLSPolicy(pki.trust_root(), certificate))


async def call(client: Any, method: str, url: str, **kwargs: Any) -> tuple[Any, Any]:
    """Make one request and read its JSON answer; fire with (response, body)."""
    response = await client.request(method, url, timeout=TIMEOUT, **kwargs)
    body = await treq.json_content(response).addTimeout(TIMEOUT, reactor)
    return response, body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def refused(client: Any, method: str, url: str, **kwargs: Any) -> list[BaseException]:
    """Make a request that must get no HTTP response; fire with the causes of its failure."""
    outcome: list[Any] = []
    d = client.request(method, url, timeout=TIMEOUT, **kwargs)
    d.addBoth(outcome.append)
    await d
    assert outcome, "the request neither answered nor failed"
    result = outcome[0]
    assert isinstance(result, Failure), f"an HTTP response came back: {result!r}"
    return _causes(result.value)


def _causes(error: BaseException) -> list[BaseException]:
    """The error and, for the HTTP client's wrappers, the failures they carry."""
    if isinstance(error, (ResponseNeverReceived, RequestTransmissionFailed)):
        return [error] + [c for f in error.reasons for c in _causes(f.value)]
    return [error]


async def assert_registry_empty(client: Any, daemon: Daemon) -> None:
    response, body = await call(client, "GET", daemon.url + "/registry/services")
    assert response.code == 200
    assert body == {"data": {"services": []}}


REGISTRATION = {"host": "10.0.0.5", "port": 8080, "ttl": 60}


async def assert_refused_by_server(
    make_client: Callable, pki: PKI, daemon: Daemon, events: Events, client: Any, why: str
) -> None:
    """The handshake fails on the client, the server logs it, the registry is unchanged."""
    causes = await refused(
        client, "POST", daemon.url + "/registry/services/web/instances", json=REGISTRATION
    )
    assert any(isinstance(c, (SSL.Error, ConnectionLost)) for c in causes), causes
    event = await events.wait_for("tls.handshake_refused")
    assert event["peer_address"].startswith("127.0.0.1:")
    assert why in event["reason"]
    assert not events.named("instance.registered")
    good = client_for(make_client, pki, pki_identity(pki, "carol"))
    await assert_registry_empty(good, daemon)


def pki_identity(pki: PKI, name: str) -> Identity:
    return pki.issue(name, server=False, client=True)


# 1. The full round trip.


@pytest_twisted.ensureDeferred
async def test_round_trip_over_mutual_tls(
    start_daemon: Callable, make_client: Callable, pki: PKI, server_identity: Identity, alice: Identity
) -> None:
    """An instance registers, beats, is listed, rotates its token and deregisters over mutual TLS."""
    daemon = await start_daemon(pki, server_identity)
    client = client_for(make_client, pki, alice)
    instances = daemon.url + "/registry/services/web/instances"

    response, body = await call(client, "POST", instances, json=REGISTRATION)
    assert response.code == 201, body
    instance_id = body["data"]["instance"]["id"]
    token = body["data"]["token"]
    assert body["data"]["token_expires_at"]
    one = f"{instances}/{instance_id}"

    response, body = await call(client, "PUT", one + "/heartbeat", headers=bearer(token))
    assert response.code == 200, body
    assert body["data"]["ttl"] == 60
    assert body["data"]["expires_at"]

    response, body = await call(client, "GET", daemon.url + "/registry/services")
    assert response.code == 200
    assert body["data"]["services"] == [{"name": "web", "instances": 1}]

    response, body = await call(client, "GET", instances)
    assert response.code == 200
    assert [i["id"] for i in body["data"]["instances"]] == [instance_id]

    response, body = await call(client, "GET", one)
    assert response.code == 200
    assert body["data"]["instance"]["host"] == "10.0.0.5"
    assert body["data"]["instance"]["port"] == 8080

    response, body = await call(client, "POST", one + "/token", headers=bearer(token))
    assert response.code == 200, body
    new_token = body["data"]["token"]
    assert new_token != token

    response, body = await call(client, "PUT", one + "/heartbeat", headers=bearer(token))
    assert response.code == 401
    assert body["error"]["code"] == "unauthorized"
    response, body = await call(client, "PUT", one + "/heartbeat", headers=bearer(new_token))
    assert response.code == 200, body

    response, body = await call(client, "DELETE", one, headers=bearer(new_token))
    assert response.code == 200, body
    assert body["data"]["instance"]["id"] == instance_id

    response, body = await call(client, "GET", one)
    assert response.code == 404
    assert body["error"]["code"] == "instance_not_found"


# 2. The peer identity.


@pytest_twisted.ensureDeferred
async def test_client_certificate_identifies_the_registrant(
    start_daemon: Callable,
    make_client: Callable,
    events: Events,
    pki: PKI,
    server_identity: Identity,
    alice: Identity,
    bob: Identity,
) -> None:
    """The registrant's certificate may re-register its instance; another certificate may not."""
    daemon = await start_daemon(pki, server_identity)
    as_alice = client_for(make_client, pki, alice)
    as_bob = client_for(make_client, pki, bob)
    instances = daemon.url + "/registry/services/web/instances"
    one = instances + "/web-1"
    spec = dict(REGISTRATION, id="web-1")

    response, body = await call(as_alice, "POST", instances, json=spec)
    assert response.code == 201, body
    first_token = body["data"]["token"]

    response, body = await call(as_alice, "POST", instances, json=spec)
    assert response.code == 200, body
    second_token = body["data"]["token"]
    assert second_token != first_token
    response, body = await call(as_alice, "PUT", one + "/heartbeat", headers=bearer(first_token))
    assert response.code == 401
    assert body["error"]["code"] == "unauthorized"
    response, body = await call(as_alice, "PUT", one + "/heartbeat", headers=bearer(second_token))
    assert response.code == 200, body

    response, body = await call(as_bob, "POST", instances, json=spec)
    assert response.code == 409, body
    assert body["error"]["code"] == "instance_exists"
    response, body = await call(as_bob, "PUT", one + "/heartbeat", headers=bearer(second_token))
    assert response.code == 200, "the token, not the certificate, authorizes a heartbeat"

    alice_fingerprint = fingerprint_sha256(alice.cert)
    [registered] = events.named("instance.registered")
    assert "alice" in registered["peer_subject"]
    assert registered["peer_fingerprint"] == alice_fingerprint
    assert registered["peer_address"].startswith("127.0.0.1:")
    [reregistered] = events.named("instance.reregistered")
    assert reregistered["peer_fingerprint"] == alice_fingerprint
    [refused_event] = events.named("instance.register_refused")
    assert "bob" in refused_event["peer_subject"]
    assert refused_event["peer_fingerprint"] == fingerprint_sha256(bob.cert)
    [auth_failed] = events.named("auth.failed")
    assert auth_failed["code"] == "unauthorized"
    assert auth_failed["peer_fingerprint"] == alice_fingerprint


# 3. Refused handshakes.


@pytest_twisted.ensureDeferred
async def test_client_without_certificate_is_refused(
    start_daemon: Callable, make_client: Callable, events: Events, pki: PKI, server_identity: Identity
) -> None:
    """A client that presents no certificate gets no HTTP answer and changes nothing."""
    daemon = await start_daemon(pki, server_identity)
    client = client_for(make_client, pki, None)
    await assert_refused_by_server(make_client, pki, daemon, events, client, "peer did not return a certificate")


@pytest_twisted.ensureDeferred
async def test_certificate_from_foreign_ca_is_refused(
    start_daemon: Callable,
    make_client: Callable,
    events: Events,
    tmp_path: Path,
    pki: PKI,
    server_identity: Identity,
) -> None:
    """A client certificate issued by another CA is refused in the handshake."""
    daemon = await start_daemon(pki, server_identity)
    foreign = PKI.create(tmp_path / "foreign", "regdisc test CA")
    mallory = foreign.issue("alice", server=False, client=True)
    client = make_client(ClientTLSPolicy(pki.trust_root(), mallory.private_certificate()))
    await assert_refused_by_server(make_client, pki, daemon, events, client, "unable to get local issuer certificate")


@pytest_twisted.ensureDeferred
async def test_expired_certificate_is_refused(
    start_daemon: Callable, make_client: Callable, events: Events, pki: PKI, server_identity: Identity
) -> None:
    """A client certificate whose validity has ended is refused in the handshake."""
    daemon = await start_daemon(pki, server_identity)
    expired = pki.issue(
        "expired", server=False, client=True, not_after=datetime.now(UTC) - timedelta(days=1)
    )
    client = client_for(make_client, pki, expired)
    await assert_refused_by_server(make_client, pki, daemon, events, client, "certificate has expired")


@pytest_twisted.ensureDeferred
async def test_not_yet_valid_certificate_is_refused(
    start_daemon: Callable, make_client: Callable, events: Events, pki: PKI, server_identity: Identity
) -> None:
    """A client certificate whose validity has not begun is refused in the handshake."""
    daemon = await start_daemon(pki, server_identity)
    early = pki.issue(
        "early", server=False, client=True, not_before=datetime.now(UTC) + timedelta(days=1)
    )
    client = client_for(make_client, pki, early)
    await assert_refused_by_server(make_client, pki, daemon, events, client, "certificate is not yet valid")


@pytest_twisted.ensureDeferred
async def test_client_refuses_server_certificate_for_another_host(
    start_daemon: Callable, make_client: Callable, events: Events, pki: PKI, alice: Identity
) -> None:
    """A client refuses a server whose certificate names another host, and sends it nothing."""
    other = pki.issue("other", hosts=["other.example"], server=True, client=False)
    daemon = await start_daemon(pki, other)
    client = client_for(make_client, pki, alice)

    causes = await refused(
        client, "POST", daemon.url + "/registry/services/web/instances", json=REGISTRATION
    )

    assert any(isinstance(c, VerificationError) for c in causes), causes
    # The daemon's own certificate does not fit its address either, so check
    # the registry with a client that verifies the CA and not the name.
    unchecked = CertificateOptions(
        privateKey=alice.private_certificate().privateKey.original,
        certificate=alice.private_certificate().original,
        trustRoot=pki.trust_root(),
    )
    await assert_registry_empty(make_client(FixedOptionsPolicy(unchecked)), daemon)
    assert not events.named("instance.registered")


# 4. TLS versions.


class _VersionLimitedOptions(CertificateOptions):
    """Client options that may offer old TLS versions despite OpenSSL's security level.

    OpenSSL 3 refuses to offer TLS 1.0 and 1.1 above security level 0, so the
    client lowers it; otherwise it would fail before sending a single byte and
    the server's refusal would go untested.
    """

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        return context


def version_limited_client(
    make_client: Callable, pki: PKI, identity: Identity, version: Any
) -> Any:
    """A client that speaks ``version`` and no other, with a good certificate."""
    private = identity.private_certificate()
    options = _VersionLimitedOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        trustRoot=pki.trust_root(),
        insecurelyLowerMinimumTo=version,
        lowerMaximumSecurityTo=version,
    )
    return make_client(FixedOptionsPolicy(options))


@pytest_twisted.ensureDeferred
async def test_tls_1_1_is_refused(
    start_daemon: Callable,
    make_client: Callable,
    events: Events,
    pki: PKI,
    server_identity: Identity,
    alice: Identity,
) -> None:
    """A client that speaks at most TLS 1.1 gets no HTTP answer, even with a good certificate."""
    daemon = await start_daemon(pki, server_identity)
    client = version_limited_client(make_client, pki, alice, TLSVersion.TLSv1_1)

    # A GET: a body producer stopped before it started raises AttributeError
    # in twisted.web.client.FileBodyProducer, which would hide the TLS error
    # when the client fails before connecting.
    causes = await refused(client, "GET", daemon.url + "/registry/services")

    errors = [c for c in causes if isinstance(c, SSL.Error)]
    assert errors, causes
    if "no protocols available" not in str(errors[0]):
        # The hello went out: the server refused it and says so.
        event = await events.wait_for("tls.handshake_refused")
        assert "unsupported protocol" in event["reason"]
    await assert_registry_empty(client_for(make_client, pki, alice), daemon)


@pytest_twisted.ensureDeferred
async def test_tls_1_2_is_accepted(
    start_daemon: Callable, make_client: Callable, pki: PKI, server_identity: Identity, alice: Identity
) -> None:
    """A client that speaks at most TLS 1.2 is served: 1.3 is not required."""
    daemon = await start_daemon(pki, server_identity)
    client = version_limited_client(make_client, pki, alice, TLSVersion.TLSv1_2)
    await assert_registry_empty(client, daemon)


# 5. IPv6.


def _ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_serves_over_ipv6_loopback(
    start_daemon: Callable, make_agent: Callable, pki: PKI, server_identity: Identity, alice: Identity
) -> None:
    """The daemon listens on ::1 and answers a client that verifies the address ::1."""
    # Loopback IPv6 is part of what the daemon promises (its development
    # certificate names ::1): a machine without it fails here rather than skip.
    assert _ipv6_loopback_usable(), "::1 cannot be bound on this machine"
    daemon = await start_daemon(pki, server_identity, listen=LOOPBACK6)
    assert daemon.url.startswith("https://[::1]:")
    agent = make_agent(ClientTLSPolicy(pki.trust_root(), alice.private_certificate()))

    # The Agent, not treq: hyperlink's to_uri() IDNA-encodes an IPv6 literal
    # host and fails (python-hyper/hyperlink#68).
    url = (daemon.url + "/registry/services").encode("ascii")
    response = await agent.request(b"GET", url).addTimeout(TIMEOUT, reactor)
    body = await treq.json_content(response).addTimeout(TIMEOUT, reactor)

    assert response.code == 200
    assert body == {"data": {"services": []}}
