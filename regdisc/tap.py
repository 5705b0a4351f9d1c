"""How the daemon starts: twistd options and the composition of its services."""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from .api import RegistryAPI
from .resource import APIResource
from .client.tls import ClientTLS, ClientTLSError
from .config import SETTINGS, Config, ConfigError, EtcdSettings, load_config
from .etcd.gateway import EtcdGateway
from .etcd.store import EtcdStore
from .lease import LeaseService
from .logs import make_observer
from .pki import PKIError, ensure_dev_pki
from .registry import Registry
from .site import RegistrySite
from .collector import YoungCollector
from .feed import ChangeFeed
from .store import MemoryStore
from .tls import TLSFileError, TLSFiles, peer_from_request, server_tls_options, tls_factory

log = Logger()


class Options(usage.Options):
    """twistd options; each overrides the environment variable of the same meaning."""

    optParameters = [
        [s.option, None, None, f"{s.help} [env {s.variable}, default {s.default or 'none'}]"]
        for s in SETTINGS
    ]

    def overrides(self) -> dict[str, str | None]:
        """The options given on the command line, by option name."""
        return {s.option: self[s.option] for s in SETTINGS}


class StartupError(Exception):
    """The daemon cannot start; the message says why in one line."""


class RootService(MultiService):
    """The daemon's root, which also hands twistd the log observer to use."""

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        # twistd reads the observer from the Application's components
        # (AppLogger.start) after makeService returns.
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def makeService(options: Options) -> RootService:
    """twistd's entry: settings from the environment and options, then the services."""
    from twisted.internet import reactor

    try:
        config = load_config(os.environ, options.overrides())
        return make_service(config, reactor)
    except (ConfigError, StartupError) as e:
        sys.stderr.write(f"regdisc: {e}\n")
        raise SystemExit(1) from None


def make_service(config: Config, reactor: Any, stream: IO[str] = sys.stdout) -> RootService:
    """The daemon's services under one `RootService`, on ``reactor``."""
    tls_options = server_tls_options_for(config)
    root = RootService(make_observer(config.log_format, config.log_level, stream))
    collector = YoungCollector(reactor)
    collector.setName("collector")
    collector.setServiceParent(root)
    store: Any
    if config.etcd is None:
        store = MemoryStore(ChangeFeed(clock=reactor))
        leases = LeaseService(store, reactor, config.cleanup_interval)
        leases.setName("leases")
        leases.setServiceParent(root)
    else:
        # etcd ends leases itself: no lease manager on any node.
        store = _etcd_store(config.etcd, reactor)
        store.setName("store")
        store.setServiceParent(root)
    registry = Registry(store, reactor, config.token_ttl)
    api = RegistryAPI(registry, config.ttl, peer_from_request)
    site = RegistrySite(APIResource(api), reactor=reactor)

    endpoint = serverFromString(reactor, config.listen)
    https = HTTPSService(endpoint, tls_factory(tls_options, site))
    https.setName("https")
    https.setServiceParent(root)
    return root


class HTTPSService(StreamServerEndpointService):
    """Serves the API; stopping it also drops the connections it holds.

    A stopped registry must look stopped: without this, clients holding
    keep-alive connections would go on being answered. The connections are
    aborted, not shut down politely: a TLS shutdown waits for the peer's
    reply, which an idle pooled client never sends.
    """

    def __init__(self, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        # Fail the start, rather than log and run portless, when the port is taken.
        self._raiseSynchronously = True

    def stopService(self) -> Deferred:
        stopped = super().stopService()
        for connection in list(self.factory.wrappedFactory.protocols):
            connection.transport.abortConnection()
        return stopped


def listening_port(root: MultiService) -> Deferred:
    """Fires with the `IListeningPort` of a started daemon (tests use port 0)."""
    return root.getServiceNamed("https")._waitingForPort


def _etcd_store(settings: EtcdSettings, reactor: Any) -> EtcdStore:
    tls = None
    if settings.tls is not None:
        try:
            tls = ClientTLS.from_files(settings.tls.cert, settings.tls.key, settings.tls.ca)
        except ClientTLSError as e:
            raise StartupError(f"etcd TLS: {e}") from None
    gateway = EtcdGateway(list(settings.endpoints), reactor, tls=tls)
    return EtcdStore(gateway, settings.prefix, reactor)


def server_tls_options_for(config: Config) -> Any:
    """The server's TLS options, from the configured files or the development PKI."""
    files = config.tls
    try:
        if files is None:
            files = _development_pki(config)
        return server_tls_options(files)
    except (TLSFileError, PKIError) as e:
        raise StartupError(str(e)) from None


def _development_pki(config: Config) -> TLSFiles:
    pki, created = ensure_dev_pki(config.dev_pki_dir)
    log.warn(
        "NO TLS PATHS ARE SET: serving with the development PKI in {directory} "
        "({how}). Its CA {ca}; a client certificate {client_cert} with key {client_key}. "
        "Set REGDISC_TLS_CERT, REGDISC_TLS_KEY and REGDISC_TLS_CA for real use.",
        event="tls.development_pki",
        directory=str(pki.directory),
        how="created now" if created else "made earlier",
        ca=str(pki.ca_cert),
        server_cert=str(pki.server_cert),
        server_key=str(pki.server_key),
        client_cert=str(pki.client_cert),
        client_key=str(pki.client_key),
    )
    return TLSFiles(cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert)
