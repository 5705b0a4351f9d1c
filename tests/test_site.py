"""The site under the API: bodies are bounded while they arrive."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from regdisc.api import MAX_BODY, RegistryAPI
from regdisc.resource import APIResource
from regdisc.registry import Registry
from regdisc.site import BoundedRequest, RegistrySite
from regdisc.store import MemoryStore

from .conftest import BOUNDS, TOKEN_TTL


@pytest.fixture
def site(clock: Clock) -> RegistrySite:
    api = RegistryAPI(Registry(MemoryStore(), clock, TOKEN_TTL), BOUNDS, lambda request: None)
    return RegistrySite(APIResource(api), reactor=clock)


def exchange(site: RegistrySite, raw: bytes) -> tuple[int, dict]:
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    if b"Transfer-Encoding: chunked" in head:
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return status, json.loads(body)


def post(length_header: bytes, body: bytes) -> bytes:
    return (
        b"POST /registry/services/web/instances HTTP/1.1\r\nHost: registry\r\n"
        b"Content-Type: application/json\r\n" + length_header + b"\r\n" + body
    )


def test_declared_large_body_is_413(site: RegistrySite) -> None:
    """A body declared and sent over 64 KiB answers 413 payload_too_large."""
    body = b"x" * (MAX_BODY * 4)
    status, answer = exchange(site, post(b"Content-Length: %d\r\n" % len(body), body))
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")


def test_chunked_large_body_is_413(site: RegistrySite) -> None:
    """A chunked body that grows past 64 KiB answers 413 too."""
    chunk = b"x" * 8192
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
    status, answer = exchange(site, post(b"Transfer-Encoding: chunked\r\n", chunks))
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")


def test_small_body_passes(site: RegistrySite) -> None:
    """A body within the limit reaches the API whole."""
    body = json.dumps({"host": "h", "port": 1, "metadata": {"k": "v" * 1000}}).encode()
    status, answer = exchange(site, post(b"Content-Length: %d\r\n" % len(body), body))
    assert status == 201
    assert answer["data"]["instance"]["metadata"]["k"] == "v" * 1000


def test_bounded_request_keeps_one_byte_past_the_limit() -> None:
    """However much arrives, a request keeps at most the limit plus one byte."""
    from twisted.web.test.requesthelper import DummyChannel

    request = BoundedRequest(DummyChannel(), parsePOSTFormSubmission=False)
    request.gotLength(10 * MAX_BODY)
    for _ in range(40):
        request.handleContentChunk(b"y" * 4096)
    request.content.seek(0)
    assert len(request.content.read()) == MAX_BODY + 1


def test_form_bodies_are_not_parsed(site: RegistrySite) -> None:
    """A form body is no JSON: 415, without being parsed into arguments."""
    assert site._parsePOSTFormSubmission is False
    body = b"host=h&port=1"
    raw = (
        b"POST /registry/services/web/instances HTTP/1.1\r\nHost: registry\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    status, answer = exchange(site, raw)
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
