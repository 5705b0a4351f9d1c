"""Real daemons and real certificates for tests: a PKI on disk and daemons on loopback."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import attrs
from twisted.internet.defer import Deferred

from regdisc import pki
from regdisc.client import ClientTLS, RegistryClient
from regdisc.config import load_config
from regdisc.tap import RootService, listening_port, make_service


@attrs.frozen
class Identity:
    """A certificate and key on disk, issued by a `LocalPKI`'s CA."""

    name: str
    cert: Path
    key: Path
    certificate: Any  # cryptography x509.Certificate


@attrs.define
class LocalPKI:
    """A CA in a folder, with a server identity for localhost and client identities."""

    directory: Path
    ca_cert: Any
    ca_key: Any
    ca: Path

    @classmethod
    def create(cls, directory: Path, common_name: str = "test CA") -> LocalPKI:
        directory.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = pki.make_ca(common_name)
        pki.write_cert(directory / "ca.pem", ca_cert)
        return cls(directory, ca_cert, ca_key, directory / "ca.pem")

    def issue(
        self, name: str, hosts: Sequence[str] = (), server: bool = False, client: bool = True,
        **validity: Any,
    ) -> Identity:
        """Issue ``name`` (a client certificate unless told otherwise) into the folder."""
        cert, key = pki.issue_certificate(
            self.ca_cert, self.ca_key, name, hosts=hosts, server=server, client=client, **validity
        )
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        pki.write_cert(cert_path, cert)
        pki.write_key(key_path, key)
        return Identity(name, cert_path, key_path, cert)

    def server(self) -> Identity:
        """The server identity for localhost, 127.0.0.1 and ::1 (issued once)."""
        path = self.directory / "server.pem"
        if path.exists():
            return Identity("server", path, self.directory / "server-key.pem", None)
        return self.issue("server", hosts=["localhost", "127.0.0.1", "::1"], server=True, client=False)

    def client_tls(self, identity: Identity) -> ClientTLS:
        """Client TLS material presenting ``identity`` and trusting this CA."""
        return ClientTLS.from_files(identity.cert, identity.key, self.ca)


@attrs.define
class Daemon:
    """A daemon started in-process on an ephemeral loopback port."""

    root: RootService
    port: int
    log: io.StringIO

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def stop(self) -> Deferred:
        return self.root.stopService()


async def start_daemon(test_pki: LocalPKI, reactor: Any, port: int = 0, **environ: str) -> Daemon:
    """Start a daemon serving with ``test_pki``'s server identity on 127.0.0.1.

    ``port`` 0 picks a free one; pass a port to restart a daemon where it was.
    """
    server = test_pki.server()
    config = load_config(
        {
            "HOME": str(test_pki.directory),
            "REGDISC_LISTEN": f"tcp:{port}:interface=127.0.0.1",
            "REGDISC_TLS_CERT": str(server.cert),
            "REGDISC_TLS_KEY": str(server.key),
            "REGDISC_TLS_CA": str(test_pki.ca),
            **environ,
        }
    )
    log = io.StringIO()
    root = make_service(config, reactor, log)
    root.startService()
    listening = await listening_port(root)
    return Daemon(root, listening.getHost().port, log)


def client_for(daemon_or_urls: Daemon | Sequence[str], tls: ClientTLS, reactor: Any, **kwargs: Any) -> RegistryClient:
    """A `RegistryClient` for a daemon (or URLs); close it at the end of the test."""
    urls = [daemon_or_urls.url] if isinstance(daemon_or_urls, Daemon) else list(daemon_or_urls)
    return RegistryClient(urls, tls, reactor, **kwargs)
