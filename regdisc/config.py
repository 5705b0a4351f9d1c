"""The daemon's settings: from the environment, overridden by twistd options."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import attrs
from twisted.logger import LogLevel

from .pki import default_dev_pki_dir
from .tls import TLSFiles
from .validation import TTLBounds

T = TypeVar("T")


class ConfigError(Exception):
    """A setting has a value the daemon cannot use; the message names the setting."""


@attrs.frozen
class Setting:
    """One setting: its variable, its twistd option, its default and meaning."""

    variable: str
    option: str
    default: str | None
    help: str


SETTINGS = (
    Setting("REGDISC_PORT", "port", "8443", "TCP port to listen on"),
    Setting("REGDISC_INTERFACE", "interface", "127.0.0.1", "address to listen on"),
    Setting("REGDISC_LISTEN", "listen", None, "a Twisted server endpoint (e.g. systemd:domain=INET:index=0); replaces port and interface"),
    Setting("REGDISC_TLS_CERT", "tls-cert", None, "server certificate (PEM)"),
    Setting("REGDISC_TLS_KEY", "tls-key", None, "server private key (PEM)"),
    Setting("REGDISC_TLS_CA", "tls-ca", None, "root CA certificate that client certificates must chain to (PEM)"),
    Setting("REGDISC_DEV_PKI_DIR", "dev-pki-dir", None, "where the development PKI is made when no TLS path is set"),
    Setting("REGDISC_CLEANUP_INTERVAL", "cleanup-interval", "1", "seconds between lease-manager runs"),
    Setting("REGDISC_DEFAULT_TTL", "default-ttl", "30", "lease TTL in seconds when a registration names none"),
    Setting("REGDISC_MIN_TTL", "min-ttl", "1", "shortest lease TTL accepted, seconds"),
    Setting("REGDISC_MAX_TTL", "max-ttl", "3600", "longest lease TTL accepted, seconds"),
    Setting("REGDISC_TOKEN_TTL", "token-ttl", "3600", "lifetime of an instance token, seconds"),
    Setting("REGDISC_LOG_FORMAT", "log-format", "text", "text or json (one JSON object per line)"),
    Setting("REGDISC_LOG_LEVEL", "log-level", "info", "debug, info, warn, error or critical"),
    Setting("REGDISC_STORE", "store", "memory", "memory (one node) or etcd (several nodes sharing etcd)"),
    Setting("REGDISC_ETCD_ENDPOINTS", "etcd-endpoints", None, "etcd client URLs, comma-separated (with the etcd store)"),
    Setting("REGDISC_ETCD_PREFIX", "etcd-prefix", "/regdisc/", "the etcd key prefix the registry owns"),
    Setting("REGDISC_ETCD_CERT", "etcd-cert", None, "client certificate for etcd (PEM)"),
    Setting("REGDISC_ETCD_KEY", "etcd-key", None, "client key for etcd (PEM)"),
    Setting("REGDISC_ETCD_CA", "etcd-ca", None, "CA certificate of etcd's servers (PEM)"),
)


@attrs.frozen
class EtcdSettings:
    """Where etcd is, under which prefix, and the client TLS files for it (all or none)."""

    endpoints: tuple[str, ...]
    prefix: str
    tls: TLSFiles | None


@attrs.frozen
class Config:
    """Every setting of the daemon, checked."""

    listen: str
    tls: TLSFiles | None
    dev_pki_dir: Path
    cleanup_interval: float
    ttl: TTLBounds
    token_ttl: int
    log_format: str
    log_level: LogLevel
    etcd: EtcdSettings | None = None
    """None for the memory store."""


def load_config(
    environ: Mapping[str, str], overrides: Mapping[str, str | None] = {}
) -> Config:
    """Build the `Config` from variables, then options (keyed by option name).

    Raises `ConfigError` naming the variable, or the option, that is wrong.
    """
    values: dict[str, tuple[str | None, str]] = {}
    for s in SETTINGS:
        value, source = environ.get(s.variable) or None, s.variable
        if overrides.get(s.option) is not None:
            value, source = overrides[s.option], "--" + s.option
        values[s.variable] = (value if value is not None else s.default, source)

    def get(variable: str, parse: Callable[[str, str], T]) -> T:
        value, source = values[variable]
        assert value is not None
        return parse(value.strip(), source)

    def path(variable: str) -> Path | None:
        value, _ = values[variable]
        return Path(value) if value else None

    port = get("REGDISC_PORT", _port)
    interface = get("REGDISC_INTERFACE", _interface)
    listen = values["REGDISC_LISTEN"][0] or _tcp_endpoint(port, interface)
    minimum = get("REGDISC_MIN_TTL", _seconds)
    maximum = get("REGDISC_MAX_TTL", _seconds)
    if minimum > maximum:
        raise ConfigError(
            f"{values['REGDISC_MIN_TTL'][1]}: {minimum} is above "
            f"{values['REGDISC_MAX_TTL'][1]} ({maximum})"
        )
    default = get("REGDISC_DEFAULT_TTL", _seconds)
    if not minimum <= default <= maximum:
        raise ConfigError(
            f"{values['REGDISC_DEFAULT_TTL'][1]}: {default} is outside {minimum} to {maximum}"
        )
    return Config(
        listen=listen,
        tls=_tls_paths(values, path),
        dev_pki_dir=path("REGDISC_DEV_PKI_DIR") or default_dev_pki_dir(environ),
        cleanup_interval=get("REGDISC_CLEANUP_INTERVAL", _interval),
        ttl=TTLBounds(default=default, minimum=minimum, maximum=maximum),
        token_ttl=get("REGDISC_TOKEN_TTL", _seconds),
        log_format=get("REGDISC_LOG_FORMAT", _log_format),
        log_level=get("REGDISC_LOG_LEVEL", _log_level),
        etcd=_etcd(values, get, path),
    )


def _etcd(
    values: Mapping[str, tuple[str | None, str]],
    get: Callable[[str, Callable[[str, str], T]], T],
    path: Callable[[str], Path | None],
) -> EtcdSettings | None:
    store = get("REGDISC_STORE", _store)
    if store == "memory":
        return None
    raw, source = values["REGDISC_ETCD_ENDPOINTS"]
    if not raw:
        raise ConfigError(f"{source}: required with the etcd store (e.g. https://10.0.0.1:2379)")
    endpoints = tuple(_endpoint(e.strip(), source) for e in raw.split(",") if e.strip())
    prefix = get("REGDISC_ETCD_PREFIX", _prefix)
    names = ("REGDISC_ETCD_CERT", "REGDISC_ETCD_KEY", "REGDISC_ETCD_CA")
    paths = [path(name) for name in names]
    tls = None
    if any(paths):
        for name, found in zip(names, paths):
            if found is None:
                raise ConfigError(f"{values[name][1]}: required when any etcd TLS path is set")
        tls = TLSFiles(cert=paths[0], key=paths[1], ca=paths[2])  # type: ignore[arg-type]
    if tls is None and any(e.startswith("https:") for e in endpoints):
        raise ConfigError(
            f"{values['REGDISC_ETCD_CA'][1]}: https etcd endpoints need "
            "REGDISC_ETCD_CERT, REGDISC_ETCD_KEY and REGDISC_ETCD_CA"
        )
    return EtcdSettings(endpoints, prefix, tls)


def _store(value: str, source: str) -> str:
    if value not in ("memory", "etcd"):
        raise ConfigError(f"{source}: must be memory or etcd, not {value!r}")
    return value


def _endpoint(value: str, source: str) -> str:
    scheme, sep, rest = value.partition("://")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("http", "https") or not sep or not colon or not host or not port.isdigit():
        raise ConfigError(f"{source}: not an etcd URL such as https://10.0.0.1:2379: {value!r}")
    return value.rstrip("/")


def _prefix(value: str, source: str) -> str:
    if not (value.startswith("/") and value.endswith("/") and len(value) > 1):
        raise ConfigError(f"{source}: must start and end with '/', such as /regdisc/: {value!r}")
    return value


def _tls_paths(
    values: Mapping[str, tuple[str | None, str]], path: Callable[[str], Path | None]
) -> TLSFiles | None:
    names = ("REGDISC_TLS_CERT", "REGDISC_TLS_KEY", "REGDISC_TLS_CA")
    paths = [path(name) for name in names]
    if not any(paths):
        return None
    for name, found in zip(names, paths):
        if found is None:
            raise ConfigError(
                f"{values[name][1]}: required when any TLS path is set "
                "(set all of the certificate, the key and the CA)"
            )
    cert, key, ca = paths
    return TLSFiles(cert=cert, key=key, ca=ca)  # type: ignore[arg-type]


def _port(value: str, source: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise ConfigError(f"{source}: not a port: {value!r}")
    return int(value)


def _interface(value: str, source: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{source}: not an IP address: {value!r}") from None


def _tcp_endpoint(port: int, interface: str) -> str:
    # Endpoint strings separate arguments with ':', so an IPv6 address escapes its own.
    return f"tcp:{port}:interface={interface.replace(':', chr(92) + ':')}"


def _seconds(value: str, source: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{source}: not a positive whole number of seconds: {value!r}")
    return int(value)


def _interval(value: str, source: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ConfigError(f"{source}: not a number of seconds above 0 and at most 3600: {value!r}")
    return seconds


def _log_format(value: str, source: str) -> str:
    if value not in ("text", "json"):
        raise ConfigError(f"{source}: must be text or json, not {value!r}")
    return value


def _log_level(value: str, source: str) -> LogLevel:
    try:
        return LogLevel.levelWithName(value.lower())
    except Exception:
        raise ConfigError(
            f"{source}: must be debug, info, warn, error or critical, not {value!r}"
        ) from None
