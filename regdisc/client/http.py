"""`RegistryClient`: every route of the registry's API, over treq and mutual TLS."""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence, TypeVar
from urllib.parse import quote

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web._newclient import RequestTransmissionFailed

from ..model import Instance, from_rfc3339
from ..deferreds import cancellable
from ..httpclient import http_client
from ..openssl import describe_ssl_error
from .errors import (
    RegistryError,
    RegistryUnavailable,
    RequestTimedOut,
    TLSRefused,
    error_from_answer,
)
from .tls import ClientTLS

T = TypeVar("T")

MAX_WAIT = 600.0
"""The longest the registry holds a blocking query, in seconds: longer waits are cut to it."""


@attrs.frozen
class Registered:
    """A registration's answer: the instance and the token that now guards it."""

    instance: Instance
    token: str = attrs.field(repr=False)
    token_expires_at: float


@attrs.frozen
class Lease:
    """A heartbeat's answer."""

    ttl: int
    expires_at: float


@attrs.frozen
class Token:
    """A rotation's answer."""

    token: str = attrs.field(repr=False)
    expires_at: float


@attrs.frozen
class ServiceSummary:
    """A service with its count of live instances."""

    name: str
    instances: int


@attrs.frozen
class InstanceList:
    """A service's instances with the index they were read at (the service's revision)."""

    instances: list[Instance]
    index: int


@attrs.frozen
class _Answer:
    """A successful answer's ``data`` and its headers."""

    data: Any
    headers: Headers


class RegistryClient:
    """One client for one registry, reachable at one or more base URLs.

    Every method returns a Deferred. Error answers fail with a `RegistryError`
    subclass; a connection failure or time-out fails with `RegistryUnavailable`
    after every URL has been tried once, starting with the last one that
    answered. Connections are pooled and kept alive; ``close`` drops them.
    """

    log = Logger()

    def __init__(
        self,
        urls: str | Sequence[str],
        tls: ClientTLS,
        reactor: Any,
        *,
        timeout: float = 10.0,
        persistent: bool = True,
    ) -> None:
        self._urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self._urls:
            raise ValueError("at least one registry URL is needed")
        self._reactor = reactor
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=persistent)
        # A watcher holds one blocking query per service it follows.
        self._pool.maxPersistentPerHost = 32
        self._http = http_client(Agent(reactor, contextFactory=tls.policy(), pool=self._pool))
        self._current = 0

    @property
    def urls(self) -> list[str]:
        """The base URLs, in the order they are tried from the start."""
        return list(self._urls)

    def close(self) -> Deferred:
        """Close pooled connections."""
        return self._pool.closeCachedConnections()

    # The instance surface.

    def register(
        self,
        service: str,
        host: str,
        port: int,
        *,
        instance_id: str | None = None,
        ttl: int | None = None,
        metadata: Mapping[str, str] | None = None,
        tags: Sequence[str] | None = None,
        status: str | None = None,
        token: str | None = None,
    ) -> Deferred:
        """Register an instance; fires with `Registered`."""
        body: dict[str, Any] = {"host": host, "port": port}
        optional = {"id": instance_id, "ttl": ttl, "status": status}
        body.update({k: v for k, v in optional.items() if v is not None})
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if tags is not None:
            body["tags"] = list(tags)

        def parse(data: Any) -> Registered:
            return Registered(
                Instance.from_json(data["instance"]),
                data["token"],
                from_rfc3339(data["token_expires_at"]),
            )

        return self._call("POST", _instances(service), parse, body=body, token=token)

    def update(self, service: str, instance_id: str, token: str, **changes: Any) -> Deferred:
        """Change the named fields (host, port, ttl, metadata, tags, status); fires with the `Instance`."""
        if "tags" in changes:
            changes["tags"] = list(changes["tags"])
        return self._call(
            "PUT", _instance(service, instance_id), _instance_of, body=changes, token=token
        )

    def heartbeat(self, service: str, instance_id: str, token: str) -> Deferred:
        """Renew the lease; fires with a `Lease`."""
        return self._call(
            "PUT",
            _instance(service, instance_id) + "/heartbeat",
            lambda data: Lease(int(data["ttl"]), from_rfc3339(data["expires_at"])),
            token=token,
        )

    def rotate_token(self, service: str, instance_id: str, token: str) -> Deferred:
        """Replace the token; fires with the new `Token`."""
        return self._call(
            "POST",
            _instance(service, instance_id) + "/token",
            lambda data: Token(data["token"], from_rfc3339(data["token_expires_at"])),
            token=token,
        )

    def deregister(self, service: str, instance_id: str, token: str) -> Deferred:
        """Remove the instance; fires with the `Instance` as it was."""
        return self._call("DELETE", _instance(service, instance_id), _instance_of, token=token)

    # The discovery surface.

    def services(self) -> Deferred:
        """Fires with a list of `ServiceSummary`, sorted by name."""
        return self._call(
            "GET",
            "/registry/services",
            lambda data: [ServiceSummary(s["name"], int(s["instances"])) for s in data["services"]],
        )

    def instances(
        self,
        service: str,
        *,
        status: str | None = None,
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred:
        """Fires with the live `Instance` list of a service, filtered as asked."""
        return self._call(
            "GET",
            _instances(service),
            lambda data: [Instance.from_json(i) for i in data["instances"]],
            params=_filters(status, tags, metadata),
        )

    def watch_instances(
        self,
        service: str,
        *,
        index: int = 0,
        wait: float | None = 60.0,
        status: str | None = None,
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred:
        """A blocking query: fires with an `InstanceList` once ``service`` changed after ``index``.

        The registry answers at once if the service changed after ``index``
        (for ``index=0``: if it ever changed), or if ``index`` is ahead of its
        own revision (a restarted registry counts anew: the answer's lower
        index says so, and is the one to ask with next). Otherwise it holds
        the request until the service changes, or for ``wait`` seconds plus
        up to a sixteenth more, and then answers the same list and index.
        ``wait`` is cut to `MAX_WAIT`; this request's time-out is the wait,
        its sixteenth, and the client's ``timeout`` on top.

        ``wait=None`` does not block: a plain read (``index`` is not sent)
        that answers the list with its index, to start watching from.
        """
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a whole number from 0, not {index!r}")
        params = _filters(status, tags, metadata)
        timeout = self._timeout
        if wait is not None:
            if not wait >= 0:
                raise ValueError(f"wait must be at least 0 seconds, not {wait!r}")
            millis = round(min(float(wait), MAX_WAIT) * 1000)
            params += [("index", str(index)), ("wait", _duration(millis))]
            timeout += millis / 1000 * (1 + 1 / 16)

        def read(answer: _Answer) -> InstanceList:
            raw = (answer.headers.getRawHeaders(b"X-Regdisc-Index") or [b""])[-1]
            if not raw.isdigit():
                raise ValueError(f"X-Regdisc-Index is not an index: {raw[:40]!r}")
            instances = [Instance.from_json(i) for i in answer.data["instances"]]
            return InstanceList(instances, int(raw))

        return self._request("GET", _instances(service), read, params=params, timeout=timeout)

    def instance(self, service: str, instance_id: str) -> Deferred:
        """Fires with one `Instance`, or fails with `InstanceNotFound`."""
        return self._call("GET", _instance(service, instance_id), _instance_of)

    # Plumbing.

    def _call(
        self,
        method: str,
        path: str,
        parse: Callable[[Any], T],
        *,
        body: Any = None,
        token: str | None = None,
        params: Sequence[tuple[str, str]] = (),
    ) -> Deferred:
        """Fires with ``parse`` of the answer's ``data``."""
        return self._request(
            method, path, lambda answer: parse(answer.data), body=body, token=token, params=params
        )

    def _request(
        self,
        method: str,
        path: str,
        read: Callable[[_Answer], T],
        *,
        body: Any = None,
        token: str | None = None,
        params: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> Deferred:
        """Fires with ``read`` of the whole answer; ``timeout`` (per URL) overrides the client's."""
        # Cancelling the answer stops the request and tries no further URL.
        return cancellable(
            lambda cancelled: self._failover(
                method, path, read, body, token, params,
                self._timeout if timeout is None else timeout, cancelled,
            )
        )

    async def _failover(
        self,
        method: str,
        path: str,
        read: Callable[[_Answer], T],
        body: Any,
        token: str | None,
        params: Sequence[tuple[str, str]],
        timeout: float,
        cancelled: list[bool],
    ) -> T:
        last: RegistryUnavailable | None = None
        for attempt in range(len(self._urls)):
            index = (self._current + attempt) % len(self._urls)
            try:
                answer = await self._once(
                    self._urls[index], method, path, body, token, params, timeout
                )
            except RegistryUnavailable as e:
                if cancelled:
                    raise CancelledError() from None
                last = e
                if len(self._urls) > 1:
                    self.log.info(
                        "registry at {url} unavailable ({reason}); trying the next",
                        event="client.failover",
                        url=e.url,
                        reason=e.reason,
                    )
                continue
            self._current = index
            try:
                return read(answer)
            except (KeyError, TypeError, ValueError) as e:
                raise RegistryError(200, "bad_answer", f"unexpected answer: {e!r}") from None
        assert last is not None
        raise last

    async def _once(
        self,
        base: str,
        method: str,
        path: str,
        body: Any,
        token: str | None,
        params: Sequence[tuple[str, str]],
        timeout: float,
    ) -> _Answer:
        headers = {"Accept": ["application/json"]}
        if token is not None:
            headers["Authorization"] = [f"Bearer {token}"]
        data = None
        if body is not None:
            headers["Content-Type"] = ["application/json"]
            data = json.dumps(body).encode("utf-8")
        url = base + path

        async def exchange() -> tuple[int, Headers, bytes]:
            response = await self._http.request(
                method, url, headers=headers, data=data, params=list(params) or None
            )
            return response.code, response.headers, await response.content()

        attempt = Deferred.fromCoroutine(exchange())
        # Not Deferred.addTimeout: treq wraps the cancellation in
        # ResponseNeverReceived, which addTimeout does not recognise.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            attempt.cancel()

        timer = self._reactor.callLater(timeout, expire)
        try:
            code, answer_headers, raw = await attempt
        except Exception as e:
            if expired:
                raise RequestTimedOut(base, f"no answer within {timeout:g} s") from None
            raise _unavailable(base, e) from None
        finally:
            if timer.active():
                timer.cancel()
        try:
            answer = json.loads(raw)
        except ValueError:
            raise RegistryError(code, "bad_answer", f"HTTP {code} with a body that is not JSON") from None
        if code >= 400:
            raise error_from_answer(code, answer)
        if not isinstance(answer, dict) or "data" not in answer:
            raise RegistryError(code, "bad_answer", "an answer without data")
        return _Answer(answer["data"], answer_headers)


def _instances(service: str) -> str:
    return f"/registry/services/{quote(service, safe='')}/instances"


def _instance(service: str, instance_id: str) -> str:
    return f"{_instances(service)}/{quote(instance_id, safe='')}"


def _filters(
    status: str | None, tags: Sequence[str], metadata: Mapping[str, str] | None
) -> list[tuple[str, str]]:
    """The query parameters of the discovery filters."""
    params: list[tuple[str, str]] = []
    if status is not None:
        params.append(("status", status))
    params.extend(("tag", tag) for tag in tags)
    params.extend((f"meta.{k}", v) for k, v in (metadata or {}).items())
    return params


def _duration(millis: int) -> str:
    """A wait as the registry reads it: whole seconds, or else milliseconds."""
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _instance_of(data: Any) -> Instance:
    return Instance.from_json(data["instance"])


def _unavailable(url: str, error: BaseException) -> RegistryUnavailable:
    """Name a transport failure for people, and tell TLS refusals apart."""
    reasons = _nested(error)
    for reason in reasons:
        if isinstance(reason, SSL.Error):
            text = describe_ssl_error(reason)
            # An alert from the registry means it refused us; anything else
            # happened in our own verification of its certificate.
            side = "registry" if "alert" in text else "client"
            return TLSRefused(url, f"TLS handshake failed: {text}", side)
        if isinstance(reason, VerificationError):
            return TLSRefused(url, f"TLS host name check failed: {reason}", "client")
    for reason in reasons:
        if isinstance(reason, (ConnectError, DNSLookupError)):
            return RegistryUnavailable(url, f"cannot connect: {reason.__class__.__name__}")
        if isinstance(reason, ConnectionClosed):
            return RegistryUnavailable(url, "connection lost")
    return RegistryUnavailable(url, f"request failed: {reasons[-1]!r}")


def _nested(error: BaseException) -> list[BaseException]:
    """The error and the failures that ResponseFailed and friends wrap."""
    found = [error]
    if isinstance(error, (ResponseFailed, RequestTransmissionFailed)):
        for failure in error.reasons:
            if isinstance(failure, Failure):
                found.extend(_nested(failure.value))
    return found
