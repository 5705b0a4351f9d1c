"""Checking what clients send: request bodies, path segments and filters.

Every check collects its complaints per field, so one answer names them all.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from typing import Any, Mapping

import attrs

from .errors import InvalidRequest
from .model import (
    INSTANCE_ID,
    MAX_HOST_LENGTH,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_VALUE,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    METADATA_KEY,
    SERVICE_NAME,
    STATUSES,
    shared_metadata,
    shared_tags,
)

_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@attrs.frozen
class TTLBounds:
    """The lease durations a registry accepts, in whole seconds."""

    default: int
    minimum: int
    maximum: int


@attrs.frozen
class InstanceSpec:
    """What a registration asks for; ``id`` is None when the registry picks it."""

    host: str
    port: int
    ttl: int
    status: str = "up"
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    tags: tuple[str, ...] = ()
    id: str | None = None


_FIELDS = ("id", "host", "port", "ttl", "status", "metadata", "tags")
_CHANGEABLE = ("host", "port", "ttl", "status", "metadata", "tags")


def check_service(service: str) -> str:
    """Return ``service`` (interned: one copy for all its instances) if it is a
    lowercase DNS label, or raise."""
    if not SERVICE_NAME.fullmatch(service):
        raise InvalidRequest(
            "invalid service name",
            {"service": "must be a lowercase DNS label: a-z, 0-9 and '-', 1 to 63 characters"},
        )
    return sys.intern(service)


def check_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it is a valid instance id, or raise."""
    if not INSTANCE_ID.fullmatch(instance_id):
        raise InvalidRequest("invalid instance id", {"id": _ID_RULE})
    return instance_id


_ID_RULE = "must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit"


def parse_registration(body: object, bounds: TTLBounds) -> InstanceSpec:
    """Check a registration body and return what it asks for, or raise."""
    fields = _object_fields(body, _FIELDS)
    problems: dict[str, str] = {}
    for required in ("host", "port"):
        if required not in fields:
            problems[required] = "is required"
    values = _check_fields(fields, bounds, problems)
    if "id" in fields:
        value = fields["id"]
        if not isinstance(value, str) or not INSTANCE_ID.fullmatch(value):
            problems["id"] = _ID_RULE
        else:
            values["id"] = value
    if problems:
        raise InvalidRequest("invalid registration", problems)
    values.setdefault("ttl", bounds.default)
    return InstanceSpec(**values)


def parse_changes(body: object, bounds: TTLBounds) -> dict[str, Any]:
    """Check an update body and return the fields it changes, or raise.

    An update changes only the fields it names, and must name at least one.
    """
    fields = _object_fields(body, _CHANGEABLE)
    if not fields:
        raise InvalidRequest(
            "an update must name at least one field",
            {"body": "expected one or more of " + ", ".join(_CHANGEABLE)},
        )
    problems: dict[str, str] = {}
    values = _check_fields(fields, bounds, problems)
    if problems:
        raise InvalidRequest("invalid update", problems)
    return values


def _object_fields(body: object, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", {"body": "expected an object"})
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidRequest(
            "unknown fields", {name: "is not a known field" for name in unknown}
        )
    return body


def _check_fields(
    fields: Mapping[str, Any], bounds: TTLBounds, problems: dict[str, str]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    checks = {
        "host": _check_host,
        "port": _check_port,
        "ttl": lambda v: _check_ttl(v, bounds),
        "status": _check_status,
        "metadata": _check_metadata,
        "tags": _check_tags,
    }
    for name, check in checks.items():
        if name in fields:
            try:
                values[name] = check(fields[name])
            except ValueError as e:
                problems[name] = str(e)
    return values


def _check_host(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    labels = name.split(".")
    if (
        not name
        or len(value) > MAX_HOST_LENGTH
        or not all(_HOST_LABEL.fullmatch(label) for label in labels)
    ):
        raise ValueError("must be a host name or an IP address")
    return value.lower()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_port(value: object) -> int:
    if not _is_int(value) or not 1 <= value <= 65535:  # type: ignore[operator]
        raise ValueError("must be an integer from 1 to 65535")
    return value  # type: ignore[return-value]


def _check_ttl(value: object, bounds: TTLBounds) -> int:
    if not _is_int(value) or not bounds.minimum <= value <= bounds.maximum:  # type: ignore[operator]
        raise ValueError(
            f"must be an integer number of seconds from {bounds.minimum} to {bounds.maximum}"
        )
    return value  # type: ignore[return-value]


def _check_status(value: object) -> str:
    if value not in STATUSES:
        raise ValueError("must be one of " + ", ".join(STATUSES))
    return STATUSES[STATUSES.index(value)]  # the one shared copy


def check_status_filter(value: str) -> str:
    """Return a status filter value if it names a status, or raise."""
    try:
        return _check_status(value)
    except ValueError as e:
        raise InvalidRequest("invalid status filter", {"status": str(e)}) from None


def _check_metadata(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ValueError("must be an object of strings")
    if len(value) > MAX_METADATA_ENTRIES:
        raise ValueError(f"must have at most {MAX_METADATA_ENTRIES} entries")
    for key, item in value.items():
        if not METADATA_KEY.fullmatch(key):
            raise ValueError(
                f"key {key[:40]!r}: keys are 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
            )
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise ValueError(
                f"value of {key!r}: must be a string of at most {MAX_METADATA_VALUE} characters"
            )
    # Interned, and shared when equal: the same keys and values recur across
    # instances, and each copy would otherwise cost its own 50-odd bytes.
    return shared_metadata({sys.intern(k): sys.intern(v) for k, v in value.items()})


def _check_tags(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of strings")
    if len(value) > MAX_TAGS:
        raise ValueError(f"must have at most {MAX_TAGS} tags")
    for tag in value:
        if (
            not isinstance(tag, str)
            or not 1 <= len(tag) <= MAX_TAG_LENGTH
            or not tag.isprintable()
        ):
            raise ValueError(
                f"each tag must be a printable string of 1 to {MAX_TAG_LENGTH} characters"
            )
    return shared_tags(tuple(sys.intern(tag) for tag in dict.fromkeys(value)))
