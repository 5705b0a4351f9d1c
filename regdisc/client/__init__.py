"""The Twisted client of the registry: `RegistryClient` and its results and errors."""

from .errors import (
    InstanceExists,
    InstanceNotFound,
    InvalidRequest,
    RegistryError,
    RegistryUnavailable,
    RequestTimedOut,
    TLSRefused,
    TokenExpired,
    Unauthorized,
)
from .http import InstanceList, Lease, Registered, RegistryClient, ServiceSummary, Token
from .registration import InstanceRegistration
from .tls import ClientTLS, ClientTLSError
from .watcher import ServiceWatcher

__all__ = [
    "ClientTLS",
    "ClientTLSError",
    "InstanceExists",
    "InstanceList",
    "InstanceNotFound",
    "InstanceRegistration",
    "InvalidRequest",
    "Lease",
    "Registered",
    "RegistryClient",
    "RegistryError",
    "RegistryUnavailable",
    "RequestTimedOut",
    "ServiceSummary",
    "ServiceWatcher",
    "TLSRefused",
    "Token",
    "TokenExpired",
    "Unauthorized",
]
