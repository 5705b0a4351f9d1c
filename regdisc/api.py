"""The REST/JSON surface under ``/registry``: a Klein app on a class.

Handlers parse and check what arrives, call the `Registry`, and answer
``{"data": ...}``; every failure is an `ApiError` answered as
``{"error": {"code", "message", "details"}}`` by one error handler.
"""

from __future__ import annotations

import json
import math
import re
from random import Random
from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug import exceptions as http

from .answers import AnswerCache, Rendered, json_body, render
from .errors import (
    ApiError,
    InvalidJSON,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from .feed import SERVICES
from .model import Instance, Peer, rfc3339
from .registry import Registry
from .stream import EventStream, followed_services, start_revision
from .validation import (
    TTLBounds,
    check_instance_id,
    check_service,
    check_status_filter,
    parse_changes,
    parse_registration,
)

MAX_BODY = 64 * 1024
"""The largest request body accepted, in bytes."""

DEFAULT_WAIT = 60.0
MAX_WAIT = 600.0
"""A blocking query waits ``wait`` seconds (60 by default, 600 at most), plus up
to a sixteenth more, at random, so that watchers do not return in lockstep."""

_WAIT = re.compile(r"(\d{1,7})(ms|s|m)?")
_WAIT_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}

_INSTANCES = "/registry/services/<service>/instances"
_INSTANCE = _INSTANCES + "/<instance_id>"

PeerOf = Callable[[IRequest], "Peer | None"]


class RegistryAPI:
    """The HTTP API of one registry, given the registry and how to know a peer."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        registry: Registry,
        bounds: TTLBounds,
        peer_of: PeerOf,
        random: Random | None = None,
    ) -> None:
        self._registry = registry
        self._bounds = bounds
        self._peer_of = peer_of
        self._random = random if random is not None else Random()
        self._answers = AnswerCache()

    # The instance surface.

    @app.route(_INSTANCES, methods=["POST"])
    async def register(self, request: IRequest, service: str) -> bytes:
        check_service(service)
        spec = parse_registration(_read_json(request), self._bounds)
        issued = await self._registry.register(
            service, spec, _bearer_token(request), self._peer_of(request)
        )
        request.setHeader("Cache-Control", "no-store")
        body = {
            "instance": issued.instance.to_json(),
            "token": issued.token,
            "token_expires_at": rfc3339(issued.token_expires_at),
        }
        return _data(request, body, 201 if issued.outcome == "created" else 200)

    @app.route(_INSTANCE, methods=["PUT"])
    async def update(self, request: IRequest, service: str, instance_id: str) -> bytes:
        _check_path(service, instance_id)
        changes = parse_changes(_read_json(request), self._bounds)
        instance = await self._registry.update(
            service, instance_id, changes, _bearer_token(request), self._peer_of(request)
        )
        return _instance(request, instance)

    @app.route(_INSTANCE + "/heartbeat", methods=["PUT"])
    def heartbeat(self, request: IRequest, service: str, instance_id: str) -> Deferred[bytes]:
        # Not a coroutine: this is the most frequent request (see `regdisc.resource`).
        _check_path(service, instance_id)
        renewing = self._registry.heartbeat(
            service, instance_id, _bearer_token(request), self._peer_of(request)
        )
        return renewing.addCallback(_renewed, request)

    @app.route(_INSTANCE + "/token", methods=["POST"])
    async def rotate(self, request: IRequest, service: str, instance_id: str) -> bytes:
        _check_path(service, instance_id)
        token, expires_at = await self._registry.rotate(
            service, instance_id, _bearer_token(request), self._peer_of(request)
        )
        request.setHeader("Cache-Control", "no-store")
        return _data(request, {"token": token, "token_expires_at": rfc3339(expires_at)})

    @app.route(_INSTANCE, methods=["DELETE"])
    async def deregister(self, request: IRequest, service: str, instance_id: str) -> bytes:
        _check_path(service, instance_id)
        instance = await self._registry.deregister(
            service, instance_id, _bearer_token(request), self._peer_of(request)
        )
        return _instance(request, instance)

    # The discovery surface.

    @app.route("/registry/services", methods=["GET"])
    async def services(self, request: IRequest) -> bytes:
        self._discovering(request)
        await self._block(request, SERVICES)
        revision = self._registry.revision(SERVICES)
        counts = await self._registry.services()
        listed = [{"name": name, "instances": count} for name, count in counts]
        return _discovery(request, {"services": listed}, revision, self._registry.mirror_age())

    @app.route(_INSTANCES, methods=["GET"])
    def instances(self, request: IRequest, service: str) -> Deferred[bytes]:
        # Not a coroutine: reads are the most frequent request with heartbeats.
        check_service(service)
        filters = _filters(request)
        self._discovering(request)
        blocking = self._block(request, service)
        return blocking.addCallback(lambda _: self._listing(request, service, filters))

    def _listing(
        self, request: IRequest, service: str, filters: tuple[str | None, tuple[str, ...], dict[str, str]]
    ) -> bytes | Deferred[bytes]:
        """The live instances of ``service`` that pass ``filters``, rendered once per change."""
        revision = self._registry.revision(service)
        status, tags, metadata = filters
        key = (service, status, tags, tuple(sorted(metadata.items())))
        version = self._registry.version(service)
        answer = self._answers.get(key, version, self._registry.clock.seconds())
        if answer is not None:
            return _answer(request, answer, revision, self._registry.mirror_age())

        def rendered(found: list[Instance]) -> bytes:
            body = {"service": service, "instances": [i.to_json() for i in found]}
            ends = min((i.expires_at for i in found), default=math.inf)
            answer = render(body, version, ends)
            self._answers.put(key, answer)
            return _answer(request, answer, revision, self._registry.mirror_age())

        return self._registry.instances(service, status, tags, metadata).addCallback(rendered)

    @app.route(_INSTANCE, methods=["GET"])
    async def instance(self, request: IRequest, service: str, instance_id: str) -> bytes:
        _check_path(service, instance_id)
        self._discovering(request)
        revision = self._registry.revision(service)
        found = await self._registry.instance(service, instance_id)
        return _discovery(request, {"instance": found.to_json()}, revision, self._registry.mirror_age())

    @app.route("/registry/events", methods=["GET"])
    def events(self, request: IRequest) -> Deferred:
        """Changes as Server-Sent Events (`regdisc.stream`), from ``since`` or ``Last-Event-ID``."""
        services = followed_services(request)
        since = start_revision(request)  # both raise InvalidRequest before the stream starts
        self._discovering(request)
        stream = EventStream.of_registry(request, self._registry, services, self._peer_of(request))
        return stream.start(since)

    def _discovering(self, request: IRequest) -> None:
        """Refuse discovery before the registry has loaded its state."""
        self._registry.check_ready()

    def _block(self, request: IRequest, service: str | None) -> Deferred[None]:
        """Hold a blocking query (``?index=N&wait=30s``) until a change or its time is up."""
        index = _index(request)
        if index is None:
            return succeed(None)
        wait = _wait(request)
        return Deferred.fromCoroutine(
            self._registry.wait_for_change(service, index, wait + self._random.uniform(0, wait / 16))
        )

    def failed(self, request: IRequest, failure: Failure) -> bytes:
        """The answer to a request whose handler failed with ``failure``."""
        if failure.check(ApiError):
            return _error(request, failure.value)
        self.log.failure(
            "unexpected error answering {method} {path}",
            failure,
            event="http.internal_error",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
        )
        return _error(request, ApiError("internal error"))

    # Failures, in the order Klein tries them.

    @app.handle_errors(http.NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _error(request, NotFound("no such resource", {"path": request.path.decode("utf-8", "replace")}))

    @app.handle_errors(http.MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(failure.value.valid_methods or ())
        request.setHeader("Allow", ", ".join(allowed))
        method = request.method.decode("ascii", "replace")
        return _error(request, MethodNotAllowed(f"{method} is not allowed here", {"allowed": allowed}))

    @app.handle_errors(Exception)
    def _failed(self, request: IRequest, failure: Failure) -> bytes:
        return self.failed(request, failure)


def _check_path(service: str, instance_id: str) -> None:
    check_service(service)
    check_instance_id(instance_id)


def _data(request: IRequest, data: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader("Content-Type", "application/json")
    return json_body({"data": data})


def _discovery(request: IRequest, data: Any, revision: int, age: float | None) -> bytes:
    """A discovery answer made for this request alone."""
    return _answer(request, render(data, 0, math.inf), revision, age)


def _answer(request: IRequest, answer: Rendered, revision: int, age: float | None) -> bytes:
    """A discovery answer: with its index, a strong ETag, and 304 when the client has it.

    ``age`` says how old a mirrored store's view is (``X-Regdisc-Mirror-Age``).
    """
    request.setHeader("X-Regdisc-Index", str(revision))
    if age is not None:
        request.setHeader("X-Regdisc-Mirror-Age", f"{age:.3f}")
    request.setHeader("ETag", answer.etag)
    request.setHeader("Content-Type", "application/json")
    matches = request.getHeader("If-None-Match")
    if matches is not None and answer.etag in (tag.strip() for tag in matches.split(",")):
        request.setResponseCode(304)
        return b""
    return answer.body


def _index(request: IRequest) -> int | None:
    values = request.args.get(b"index")
    if not values:
        return None
    text = values[-1].decode("ascii", "replace")
    if not text.isdigit() or len(text) > 19:
        raise InvalidRequest("invalid index", {"index": "must be a whole number from 0"})
    return int(text)


def _wait(request: IRequest) -> float:
    values = request.args.get(b"wait")
    if not values:
        return DEFAULT_WAIT
    match = _WAIT.fullmatch(values[-1].decode("ascii", "replace"))
    if match is None:
        raise InvalidRequest(
            "invalid wait", {"wait": "a duration such as 30s, 500ms or 5m, at most 10m"}
        )
    return min(MAX_WAIT, int(match[1]) * _WAIT_UNITS[match[2]])


def _renewed(instance: Instance, request: IRequest) -> bytes:
    return _data(request, {"ttl": instance.ttl, "expires_at": rfc3339(instance.expires_at)})


def _instance(request: IRequest, instance: Instance) -> bytes:
    return _data(request, {"instance": instance.to_json()})


def _error(request: IRequest, error: ApiError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader("Content-Type", "application/json")
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return json_body(error.to_json())


def _read_json(request: IRequest) -> object:
    """The request's JSON body, after its media type and size are checked."""
    media_type = (request.getHeader("Content-Type") or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            "the body must be JSON, sent with Content-Type: application/json",
            {"content_type": media_type or None},
        )
    declared = request.getHeader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge(f"the body must be at most {MAX_BODY} bytes")
    raw = request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise PayloadTooLarge(f"the body must be at most {MAX_BODY} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidJSON("the body is not valid JSON", {"reason": str(e)[:200]}) from None


def _bearer_token(request: IRequest) -> str | None:
    header = request.getHeader("Authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _filters(request: IRequest) -> tuple[str | None, tuple[str, ...], dict[str, str]]:
    """The discovery filters of a query: ``status``, ``tag`` (all must match), ``meta.KEY``."""
    args = request.args
    status = None
    if b"status" in args:
        status = check_status_filter(args[b"status"][-1].decode("utf-8", "replace"))
    tags = tuple(t.decode("utf-8", "replace") for t in args.get(b"tag", ()))
    metadata = {}
    for name, values in args.items():
        if name.startswith(b"meta."):
            key = name[len(b"meta."):].decode("utf-8", "replace")
            if not key:
                raise InvalidRequest("invalid metadata filter", {"meta.": "needs a key: meta.KEY=VALUE"})
            metadata[key] = values[-1].decode("utf-8", "replace")
    return status, tags, metadata
