"""Settings from the environment and twistd options."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.logger import LogLevel

from regdisc.config import ConfigError, load_config
from regdisc.tls import TLSFiles

HOME = {"HOME": "/home/u"}


def test_defaults() -> None:
    """With nothing set, every setting takes its documented default."""
    config = load_config(HOME)
    assert config.listen == "tcp:8443:interface=127.0.0.1"
    assert config.tls is None
    assert config.dev_pki_dir == Path("/home/u/.local/share/regdisc/dev-pki")
    assert config.cleanup_interval == 1.0
    assert (config.ttl.default, config.ttl.minimum, config.ttl.maximum) == (30, 1, 3600)
    assert config.token_ttl == 3600
    assert (config.log_format, config.log_level) == ("text", LogLevel.info)


def test_environment_sets_everything() -> None:
    """Every variable is read."""
    config = load_config(
        {
            **HOME,
            "REGDISC_PORT": "9000",
            "REGDISC_INTERFACE": "::1",
            "REGDISC_TLS_CERT": "/c.pem",
            "REGDISC_TLS_KEY": "/k.pem",
            "REGDISC_TLS_CA": "/ca.pem",
            "REGDISC_DEV_PKI_DIR": "/pki",
            "REGDISC_CLEANUP_INTERVAL": "0.5",
            "REGDISC_DEFAULT_TTL": "10",
            "REGDISC_MIN_TTL": "5",
            "REGDISC_MAX_TTL": "60",
            "REGDISC_TOKEN_TTL": "120",
            "REGDISC_LOG_FORMAT": "json",
            "REGDISC_LOG_LEVEL": "WARN",
        }
    )
    assert config.listen == r"tcp:9000:interface=\:\:1"
    assert config.tls == TLSFiles(Path("/c.pem"), Path("/k.pem"), Path("/ca.pem"))
    assert config.dev_pki_dir == Path("/pki")
    assert config.cleanup_interval == 0.5
    assert (config.ttl.default, config.ttl.minimum, config.ttl.maximum) == (10, 5, 60)
    assert config.token_ttl == 120
    assert (config.log_format, config.log_level) == ("json", LogLevel.warn)


def test_options_override_the_environment() -> None:
    """A twistd option wins over its variable; an unset option does not."""
    config = load_config(
        {**HOME, "REGDISC_PORT": "9000", "REGDISC_MAX_TTL": "60"},
        {"port": "9100", "max-ttl": None},
    )
    assert config.listen.startswith("tcp:9100:")
    assert config.ttl.maximum == 60


def test_listen_replaces_port_and_interface() -> None:
    """REGDISC_LISTEN takes any endpoint description."""
    config = load_config({**HOME, "REGDISC_LISTEN": "systemd:domain=INET:index=0"})
    assert config.listen == "systemd:domain=INET:index=0"


@pytest.mark.parametrize(
    "environ, overrides, message",
    [
        ({"REGDISC_PORT": "abc"}, {}, "REGDISC_PORT: not a port: 'abc'"),
        ({"REGDISC_PORT": "70000"}, {}, "REGDISC_PORT: not a port: '70000'"),
        ({}, {"port": "-1"}, "--port: not a port: '-1'"),
        ({"REGDISC_INTERFACE": "example.com"}, {}, "REGDISC_INTERFACE: not an IP address"),
        ({"REGDISC_DEFAULT_TTL": "-5"}, {}, "REGDISC_DEFAULT_TTL: not a positive whole number"),
        ({"REGDISC_MIN_TTL": "0"}, {}, "REGDISC_MIN_TTL: not a positive whole number"),
        ({"REGDISC_MAX_TTL": "1.5"}, {}, "REGDISC_MAX_TTL: not a positive whole number"),
        ({"REGDISC_TOKEN_TTL": "x"}, {}, "REGDISC_TOKEN_TTL: not a positive whole number"),
        ({"REGDISC_MIN_TTL": "100", "REGDISC_MAX_TTL": "10"}, {}, "REGDISC_MIN_TTL: 100 is above REGDISC_MAX_TTL (10)"),
        ({"REGDISC_DEFAULT_TTL": "5000"}, {}, "REGDISC_DEFAULT_TTL: 5000 is outside 1 to 3600"),
        ({"REGDISC_CLEANUP_INTERVAL": "0"}, {}, "REGDISC_CLEANUP_INTERVAL: not a number of seconds"),
        ({"REGDISC_CLEANUP_INTERVAL": "nan"}, {}, "REGDISC_CLEANUP_INTERVAL: not a number of seconds"),
        ({"REGDISC_LOG_FORMAT": "xml"}, {}, "REGDISC_LOG_FORMAT: must be text or json"),
        ({"REGDISC_LOG_LEVEL": "loud"}, {}, "REGDISC_LOG_LEVEL: must be debug"),
        ({"REGDISC_TLS_CERT": "/c.pem"}, {}, "REGDISC_TLS_KEY: required when any TLS path is set"),
        ({"REGDISC_TLS_CERT": "/c", "REGDISC_TLS_KEY": "/k"}, {}, "REGDISC_TLS_CA: required"),
    ],
)
def test_malformed_values_name_the_setting(
    environ: dict[str, str], overrides: dict[str, str], message: str
) -> None:
    """A malformed value raises a one-line error that names its variable or option."""
    with pytest.raises(ConfigError) as raised:
        load_config({**HOME, **environ}, overrides)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_empty_variables_count_as_unset() -> None:
    """An empty variable (as EnvironmentFile may leave) takes the default."""
    config = load_config({**HOME, "REGDISC_PORT": "", "REGDISC_TLS_CERT": ""})
    assert config.listen.startswith("tcp:8443:")
    assert config.tls is None


def test_the_etcd_store() -> None:
    """REGDISC_STORE=etcd reads the endpoints, the prefix and the etcd TLS files."""
    config = load_config({
        **HOME,
        "REGDISC_STORE": "etcd",
        "REGDISC_ETCD_ENDPOINTS": "https://10.0.0.1:2379, https://10.0.0.2:2379/",
        "REGDISC_ETCD_PREFIX": "/prod/",
        "REGDISC_ETCD_CERT": "/c.pem",
        "REGDISC_ETCD_KEY": "/k.pem",
        "REGDISC_ETCD_CA": "/ca.pem",
    })
    assert config.etcd is not None
    assert config.etcd.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert config.etcd.prefix == "/prod/"
    assert config.etcd.tls == TLSFiles(Path("/c.pem"), Path("/k.pem"), Path("/ca.pem"))
    assert load_config(HOME).etcd is None


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"REGDISC_STORE": "redis"}, "REGDISC_STORE: must be memory or etcd"),
        ({"REGDISC_STORE": "etcd"}, "REGDISC_ETCD_ENDPOINTS: required with the etcd store"),
        ({"REGDISC_STORE": "etcd", "REGDISC_ETCD_ENDPOINTS": "10.0.0.1:2379"},
         "REGDISC_ETCD_ENDPOINTS: not an etcd URL"),
        ({"REGDISC_STORE": "etcd", "REGDISC_ETCD_ENDPOINTS": "http://h:2379", "REGDISC_ETCD_PREFIX": "regdisc"},
         "REGDISC_ETCD_PREFIX: must start and end with '/'"),
        ({"REGDISC_STORE": "etcd", "REGDISC_ETCD_ENDPOINTS": "http://h:2379", "REGDISC_ETCD_CERT": "/c"},
         "REGDISC_ETCD_KEY: required when any etcd TLS path is set"),
        ({"REGDISC_STORE": "etcd", "REGDISC_ETCD_ENDPOINTS": "https://h:2379"},
         "REGDISC_ETCD_CA: https etcd endpoints need"),
    ],
)
def test_bad_etcd_settings_name_the_variable(environ: dict[str, str], message: str) -> None:
    """A wrong etcd setting stops startup with a line naming it."""
    with pytest.raises(ConfigError) as raised:
        load_config({**HOME, **environ})
    assert str(raised.value).startswith(message)
