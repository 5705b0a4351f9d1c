"""Instances and the rules of their leases: pure values, no I/O and no clock."""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Mapping

import attrs

SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
"""A service name is a lowercase DNS label."""

INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""An instance id: 1 to 128 characters, safe in a URL path segment."""

METADATA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""A metadata key: safe as the ``KEY`` of a ``?meta.KEY=VALUE`` filter."""

MAX_METADATA_ENTRIES = 64
MAX_METADATA_VALUE = 1024
MAX_TAGS = 64
MAX_TAG_LENGTH = 128
MAX_HOST_LENGTH = 253

STATUSES = ("up", "starting", "down", "out_of_service")
"""Every status an instance may have; ``up`` is the default."""


SHARED_VALUES = 4096
"""How many distinct metadata mappings, and tag tuples, `shared_metadata` and
`shared_tags` remember."""


def shared_metadata(metadata: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only mapping equal to ``metadata`` (same order too), the same object
    for equal ones among the last `SHARED_VALUES` distinct mappings.

    The instances of a service mostly carry the same metadata, and a dict of
    their own would cost each about 200 bytes.
    """
    return _shared_metadata(tuple(metadata.items()))


@functools.lru_cache(maxsize=SHARED_VALUES)
def _shared_metadata(items: tuple[tuple[str, str], ...]) -> Mapping[str, str]:
    return MappingProxyType(dict(items))


@functools.lru_cache(maxsize=SHARED_VALUES)
def shared_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """``tags``, or an equal tuple met before: one tuple for the many instances
    that carry the same tags."""
    return tags


def rfc3339(timestamp: float) -> str:
    """Format POSIX seconds as an RFC 3339 UTC timestamp with milliseconds."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def from_rfc3339(text: str) -> float:
    """POSIX seconds from an RFC 3339 timestamp, as `rfc3339` writes them."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@attrs.frozen(weakref_slot=False)
class Instance:
    """One live service instance as discovery shows it.

    Times are POSIX seconds from the registry's clock; the lease is live while
    ``now < expires_at``.
    """

    service: str
    id: str
    host: str
    port: int
    status: str
    metadata: Mapping[str, str]
    tags: tuple[str, ...]
    ttl: int
    registered_at: float
    last_heartbeat_at: float
    expires_at: float

    def is_live(self, now: float) -> bool:
        """Whether the lease still holds at ``now``."""
        return now < self.expires_at

    def renewed(self, now: float) -> Instance:
        """This instance with its lease renewed for a full TTL from ``now``."""
        # Spelled out: it runs on every heartbeat, and attrs.evolve costs 2.5 times as much.
        return Instance(
            self.service, self.id, self.host, self.port, self.status, self.metadata, self.tags,
            self.ttl, self.registered_at, now, now + self.ttl,
        )

    def matches(
        self,
        status: str | None = None,
        tags: tuple[str, ...] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether this instance passes every given discovery filter."""
        if status is not None and self.status != status:
            return False
        if any(tag not in self.tags for tag in tags):
            return False
        if metadata:
            return all(self.metadata.get(k) == v for k, v in metadata.items())
        return True

    def to_json(self) -> dict[str, Any]:
        """The wire form of this instance."""
        return {
            "id": self.id,
            "service": self.service,
            "host": self.host,
            "port": self.port,
            "status": self.status,
            "metadata": dict(self.metadata),
            "tags": list(self.tags),
            "ttl": self.ttl,
            "registered_at": rfc3339(self.registered_at),
            "last_heartbeat_at": rfc3339(self.last_heartbeat_at),
            "expires_at": rfc3339(self.expires_at),
        }

    @classmethod
    def from_json(cls, wire: Mapping[str, Any]) -> Instance:
        """An instance from its wire form; raises KeyError, TypeError or ValueError."""
        return cls(
            service=str(wire["service"]),
            id=str(wire["id"]),
            host=str(wire["host"]),
            port=int(wire["port"]),
            status=str(wire["status"]),
            metadata={str(k): str(v) for k, v in wire["metadata"].items()},
            tags=tuple(str(t) for t in wire["tags"]),
            ttl=int(wire["ttl"]),
            registered_at=from_rfc3339(wire["registered_at"]),
            last_heartbeat_at=from_rfc3339(wire["last_heartbeat_at"]),
            expires_at=from_rfc3339(wire["expires_at"]),
        )


@attrs.frozen(weakref_slot=False)
class Credentials:
    """What proves the right to change an instance; never shown or logged.

    ``registrant`` is the SHA-256 fingerprint of the client certificate that
    registered the instance, when there was one.
    """

    token_hash: bytes = attrs.field(repr=False)
    expires_at: float
    registrant: str | None = None


@attrs.frozen(weakref_slot=False)
class Registration:
    """An instance with its credentials, as a store keeps it.

    ``revision`` is the store's revision of the write that made this record;
    stores compare it to refuse a write based on an outdated read.
    """

    instance: Instance
    credentials: Credentials
    revision: int = 0

    @property
    def key(self) -> tuple[str, str]:
        """The (service, id) pair that names this registration."""
        return (self.instance.service, self.instance.id)


def change_kind(old: Instance, new: Instance) -> str | None:
    """What replacing ``old`` by ``new`` looks like to discovery: ``registered``
    (a new registration of the id), ``updated``, or None (nothing it shows
    changed, as in a token rotation; lease times do not count)."""
    if new.registered_at != old.registered_at:
        return "registered"
    if attrs.evolve(new, last_heartbeat_at=old.last_heartbeat_at, expires_at=old.expires_at) != old:
        return "updated"
    return None


@attrs.frozen(weakref_slot=False)
class Peer:
    """The client at the other end of a connection, as its verified certificate shows it."""

    subject: str
    fingerprint: str
    address: str
