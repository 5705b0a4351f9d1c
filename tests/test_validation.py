"""The pure checks of what clients send, and the wire form of instances."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from regdisc.errors import InvalidRequest
from regdisc.model import INSTANCE_ID, SERVICE_NAME, STATUSES, Instance, rfc3339, shared_metadata, shared_tags
from regdisc.validation import (
    TTLBounds,
    check_service,
    parse_changes,
    parse_registration,
)

BOUNDS = TTLBounds(default=30, minimum=1, maximum=3600)

ids = st.from_regex(INSTANCE_ID, fullmatch=True)
keys = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{1,5}){0,3}", fullmatch=True),
)
registrations = st.fixed_dictionaries(
    {"host": hosts, "port": st.integers(1, 65535)},
    optional={
        "id": ids,
        "ttl": st.integers(BOUNDS.minimum, BOUNDS.maximum),
        "status": st.sampled_from(STATUSES),
        "metadata": st.dictionaries(keys, st.text(max_size=30), max_size=5),
        "tags": st.lists(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=10), max_size=5),
    },
)


@given(registrations)
def test_valid_registrations_are_accepted_as_sent(body: dict[str, Any]) -> None:
    """Every valid registration parses to exactly what it says, defaults filled in."""
    spec = parse_registration(body, BOUNDS)
    assert spec.port == body["port"]
    assert spec.ttl == body.get("ttl", BOUNDS.default)
    assert spec.status == body.get("status", "up")
    assert dict(spec.metadata) == body.get("metadata", {})
    assert list(spec.tags) == list(dict.fromkeys(body.get("tags", [])))
    assert spec.id == body.get("id")


@given(registrations, st.sampled_from(["host", "port", "ttl", "status", "metadata", "tags", "id"]),
       st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.lists(st.none(), min_size=1, max_size=1)))
def test_a_wrong_type_is_named(body: dict[str, Any], field: str, value: Any) -> None:
    """A field of the wrong type is refused, naming that field."""
    body = {**body, field: value}
    with pytest.raises(InvalidRequest) as raised:
        parse_registration(body, BOUNDS)
    assert field in raised.value.details


@given(st.text(max_size=70))
@example("web\n")
def test_service_names_follow_the_dns_label_rule(name: str) -> None:
    """A service name is accepted exactly when it is a lowercase DNS label."""
    valid = SERVICE_NAME.fullmatch(name) is not None
    if valid:
        assert check_service(name) == name
    else:
        with pytest.raises(InvalidRequest):
            check_service(name)


def test_changes_name_only_what_they_change() -> None:
    """An update returns only the fields it names, checked."""
    assert parse_changes({"status": "down"}, BOUNDS) == {"status": "down"}
    assert parse_changes({"tags": ["a", "a", "b"]}, BOUNDS) == {"tags": ("a", "b")}
    with pytest.raises(InvalidRequest):
        parse_changes({"host": "h", "port": 1, "id": "x"}, BOUNDS)


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_rfc3339_is_utc_with_milliseconds(moment: float) -> None:
    """Timestamps are RFC 3339 in UTC, to the millisecond."""
    text = rfc3339(moment)
    assert len(text) == 24 and text.endswith("Z") and text[10] == "T"


@given(registrations)
def test_instance_json_round_trips(body: dict[str, Any]) -> None:
    """An instance's wire form is plain JSON that carries every field back."""
    spec = parse_registration(body, BOUNDS)
    instance = Instance("web", spec.id or "x", spec.host, spec.port, spec.status,
                        dict(spec.metadata), spec.tags, spec.ttl, 1.0, 2.0, 2.0 + spec.ttl)
    wire = json.loads(json.dumps(instance.to_json()))
    assert set(wire) == {"id", "service", "host", "port", "status", "metadata", "tags",
                         "ttl", "registered_at", "last_heartbeat_at", "expires_at"}
    assert (wire["host"], wire["port"], wire["metadata"], tuple(wire["tags"])) == (
        spec.host, spec.port, dict(spec.metadata), spec.tags)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"host": "h", "port": 1, "id": "web-1\n"}, "id"),
        ({"host": "h.example\n", "port": 1}, "host"),
        ({"host": "h", "port": 1, "metadata": {"k\n": "v"}}, "metadata"),
    ],
)
def test_a_trailing_newline_is_no_loophole(body: dict[str, Any], field: str) -> None:
    """Patterns match whole values: a trailing newline is refused."""
    with pytest.raises(InvalidRequest) as raised:
        parse_registration(body, BOUNDS)
    assert field in raised.value.details


def test_equal_metadata_and_tags_are_shared_and_read_only() -> None:
    """Instances sent the same metadata and tags hold one read-only mapping and one tuple."""
    first = parse_registration({"host": "a", "port": 1, "metadata": {"zone": "a", "v": "1"}, "tags": ["x", "y"]}, BOUNDS)
    second = parse_registration({"host": "b", "port": 2, "metadata": {"zone": "a", "v": "1"}, "tags": ["x", "y"]}, BOUNDS)
    assert first.metadata is second.metadata and first.tags is second.tags
    assert first.metadata == {"zone": "a", "v": "1"}
    with pytest.raises(TypeError):
        first.metadata["zone"] = "b"  # type: ignore[index]


def test_shared_metadata_keeps_the_order_sent() -> None:
    """Mappings that differ only in order stay apart, so each answer shows the order it was sent in."""
    assert list(shared_metadata({"a": "1", "b": "2"})) == ["a", "b"]
    assert list(shared_metadata({"b": "2", "a": "1"})) == ["b", "a"]
    assert shared_tags(("x",)) is shared_tags(tuple(["x"]))
