"""`EtcdGateway`: etcd v3 through its HTTP/JSON gateway, over Twisted's HTTP Agent, never blocking the reactor.

Also the values it speaks in (`KeyValue`, `Event`, `Compare`, `Put`, `Delete`,
`TxnResult`), the running `Watch`, and its errors (`EtcdUnavailable`,
`EtcdError`, `Compacted`).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Sequence, TypeVar

import attrs
from attrs.validators import in_, instance_of
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import (
    _HTTP11ClientFactory,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ..deferreds import cancellable
from ..httpclient import BytesProducer
from ..openssl import describe_ssl_error

__all__ = [
    "Compacted",
    "Compare",
    "Delete",
    "EtcdError",
    "EtcdGateway",
    "EtcdUnavailable",
    "Event",
    "KeyValue",
    "Put",
    "TxnResult",
    "Watch",
]

T = TypeVar("T")

log = Logger()

# gRPC codes etcd uses for "try elsewhere or later": DeadlineExceeded and
# Unavailable (no leader, request timed out, leader changed...).
_UNAVAILABLE_CODES = frozenset({4, 14})
_UNAVAILABLE_STATUSES = frozenset({502, 503, 504})
_NOT_FOUND = 5
_UNKNOWN = 2

# grpc-gateway passes Grpc-Metadata-* headers on as gRPC metadata; etcd then
# refuses a call, or ends a stream, on a member that has no leader instead of
# holding it or leaving it silent. Sent with every call and watch.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": ["true"]}
_JSON = {"Content-Type": ["application/json"], "Accept": ["application/json"]}


class EtcdUnavailable(Exception):
    """No etcd endpoint gave an answer in time (connection failure, time-out,
    no leader / no quorum). ``reason`` says which, for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EtcdError(Exception):
    """etcd answered with an error (bad request, lease not found, compacted...).

    ``code`` is the gRPC status code etcd gave (5 not found, 3 invalid argument,
    11 out of range for a compacted revision...).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class KeyValue:
    """A key as etcd holds it. In a delete event only ``key`` and ``mod_revision`` are set."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int  # 0 when none


@attrs.frozen
class Event:
    """One watch event: ``kind`` is ``put`` or ``delete``; ``kv.value`` is empty on delete."""

    kind: str = attrs.field(validator=in_(("put", "delete")))
    kv: KeyValue


_TARGETS = {"create": "CREATE", "mod": "MOD", "version": "VERSION", "value": "VALUE"}
_RESULTS = {"equal": "EQUAL", "greater": "GREATER", "less": "LESS", "not_equal": "NOT_EQUAL"}
_TARGET_FIELDS = {"create": "create_revision", "mod": "mod_revision", "version": "version", "value": "value"}


def _check_compare_value(instance: Compare, attribute: Any, value: int | bytes) -> None:
    wanted = bytes if instance.target == "value" else int
    if not isinstance(value, wanted) or isinstance(value, bool):
        raise TypeError(f"a {instance.target} comparison takes {wanted.__name__}, not {value!r}")


@attrs.frozen
class Compare:
    """A txn comparison on one key: ``target`` is ``create``, ``mod``, ``version``
    or ``value``; ``result`` is ``equal``, ``greater``, ``less``, ``not_equal``.

    ``value`` is bytes for ``value``, else an int; a key that does not exist
    has create revision 0.
    """

    key: bytes = attrs.field(validator=instance_of(bytes))
    target: str = attrs.field(validator=in_(tuple(_TARGETS)))
    result: str = attrs.field(validator=in_(tuple(_RESULTS)))
    value: int | bytes = attrs.field(validator=_check_compare_value)


@attrs.frozen
class Put:
    """A txn operation: set ``key`` to ``value``, attached to ``lease`` unless 0."""

    key: bytes
    value: bytes
    lease: int = 0


@attrs.frozen
class Delete:
    """A txn operation: delete ``key``."""

    key: bytes


@attrs.frozen
class TxnResult:
    """Whether the comparisons held, and the revision after the txn."""

    succeeded: bool
    revision: int


class Compacted(Exception):
    """The watch's start revision is older than etcd's compaction."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"compacted at {compact_revision}")
        self.compact_revision = compact_revision


class Watch:
    """A running watch; ``stop()`` ends it. ``done`` fires when the stream ends:
    with None after stop(), or fails with `EtcdUnavailable` (stream lost) or
    `Compacted` (start revision compacted: list again).

    ``next_revision`` is where a new watch resumes without a gap or a repeat:
    one past the last event delivered (0, "from now", only while a watch
    started from now has not been created yet). Made by `EtcdGateway.watch`.
    """

    done: Deferred

    def __init__(self, start_revision: int, on_events: Callable[[int, list[Event]], None]) -> None:
        self.done = Deferred()
        self.created: Deferred = Deferred()
        """Fires when etcd confirms the watch: from then on the stream is current."""
        self.next_revision = start_revision
        self._on_events = on_events
        self._stopped = False
        self._connecting: Deferred | None = None
        self._stream: _Body | None = None
        self._endpoint = ""

    def stop(self) -> None:
        """End the watch and its connection; ``done`` fires with None unless it already fired."""
        if self._stopped:
            return
        self._finish(None)
        self._drop()

    @property
    def stopped(self) -> bool:
        """Whether the watch has ended, by stop() or otherwise."""
        return self._stopped

    def _finish(self, outcome: Any) -> None:
        self._stopped = True
        if self.done.called:
            return
        if isinstance(outcome, BaseException):
            self.done.errback(Failure(outcome))
        else:
            self.done.callback(None)

    def _fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (unless stopped first)."""
        self._finish(error)
        self._drop()

    def _drop(self) -> None:
        # After _finish: dropping the connection calls _lost, which must
        # find the watch ended already.
        if self._connecting is not None:
            self._connecting.cancel()
        if self._stream is not None:
            self._stream.abort()

    def _line(self, line: bytes) -> None:
        if self._stopped:
            return
        try:
            message = json.loads(line)
        except ValueError:
            self._fail(EtcdUnavailable(f"{self._endpoint}: watch stream is not JSON"))
            return
        problem = _error_in(self._endpoint, message)
        if problem is not None:
            self._fail(problem)
            return
        result = message.get("result") if isinstance(message, dict) else None
        if not isinstance(result, dict):
            self._fail(EtcdUnavailable(f"{self._endpoint}: watch message without result"))
            return
        compact_revision = _int(result, "compact_revision")
        if compact_revision:
            self._fail(Compacted(compact_revision))
            return
        if result.get("canceled"):
            reason = result.get("cancel_reason") or "watch canceled"
            self._fail(EtcdError(_UNKNOWN, str(reason)))
            return
        revision = _int(result.get("header", {}), "revision")
        if result.get("created"):
            if self.next_revision == 0:
                self.next_revision = revision + 1
            if not self.created.called:
                self.created.callback(None)
        raw = result.get("events") or []
        if not raw:
            return
        events = [
            Event("delete" if e.get("type") == "DELETE" else "put", _key_value(e["kv"]))
            for e in raw
        ]
        self.next_revision = events[-1].kv.mod_revision + 1
        try:
            self._on_events(revision, events)
        except Exception:
            log.failure(
                "watch callback failed on revision {revision}",
                event="etcd.watch_callback_failed",
                revision=revision,
            )

    def _lost(self, result: Failure | None) -> None:
        if self._stopped:
            return
        why = "closed by etcd" if result is None else _describe(result.value)
        self._finish(EtcdUnavailable(f"{self._endpoint}: watch stream lost ({why})"))


class EtcdGateway:
    """A client of one etcd cluster at several endpoints (URLs), failing over between them.

    Every call returns a Deferred and is bounded by ``timeout`` seconds per
    endpoint tried. Keys and values are bytes (base64 on the wire).

    A call starts with the endpoint that answered last and tries each endpoint
    once, moving on after a connection failure, a time-out or an answer that
    says etcd is unavailable there (no leader, request timed out); it then
    fails with `EtcdUnavailable`. Error answers fail with `EtcdError` at once.
    ``tls`` is a `ClientTLS` for https endpoints that require client
    certificates (anything with a ``policy()`` giving an ``IPolicyForHTTPS``
    will do), or None.
    """

    def __init__(self, endpoints: Sequence[str], reactor: Any, *, tls: Any = None,
                 timeout: float = 2.0) -> None:
        self._endpoints = [e.rstrip("/") for e in ([endpoints] if isinstance(endpoints, str) else endpoints)]
        if not self._endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._reactor = reactor
        self._timeout = timeout
        policy = tls.policy() if tls is not None else BrowserLikePolicyForHTTPS()
        self._pool = _quiet(HTTPConnectionPool(reactor, persistent=True))
        # A busy node has many calls in flight; fewer idle connections than that
        # would be closed and opened again (a TLS handshake each) under load.
        self._pool.maxPersistentPerHost = 64
        self._agent = Agent(reactor, contextFactory=policy, pool=self._pool)
        # Watches last; on their own non-persistent pool, they never hold a
        # connection the calls would want back.
        self._watch_pool = _quiet(HTTPConnectionPool(reactor, persistent=False))
        self._watch_agent = Agent(reactor, contextFactory=policy, pool=self._watch_pool)
        self._current = 0
        self._watches: set[Watch] = set()

    @property
    def endpoints(self) -> list[str]:
        """The endpoints, in the order given."""
        return list(self._endpoints)

    @property
    def current_endpoint(self) -> str:
        """The endpoint that answered last (the first given, before any answer)."""
        return self._endpoints[self._current]

    # Keys.

    def range(self, key: bytes, range_end: bytes | None = None, *,
              serializable: bool = False) -> Deferred:
        """Fires with (revision, [KeyValue, ...]) for ``key`` or ``[key, range_end)``.

        ``serializable`` reads the answering member's copy without asking the
        leader: faster, possibly stale, and served without a quorum.
        """
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if serializable:
            body["serializable"] = True

        def parse(answer: Any) -> tuple[int, list[KeyValue]]:
            return _revision(answer), [_key_value(kv) for kv in answer.get("kvs", [])]

        return self._call("/v3/kv/range", body, parse)

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> Deferred:
        """Set ``key``; fires with the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return self._call("/v3/kv/put", body, _revision)

    def delete(self, key: bytes, range_end: bytes | None = None) -> Deferred:
        """Delete ``key`` or ``[key, range_end)``; fires with (revision, number deleted)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        return self._call(
            "/v3/kv/deleterange", body, lambda answer: (_revision(answer), _int(answer, "deleted"))
        )

    def txn(self, compare: Sequence[Compare], success: Sequence[Put | Delete],
            failure: Sequence[Put | Delete] = ()) -> Deferred:
        """Fires with `TxnResult`."""
        body = {
            "compare": [_compare_json(c) for c in compare],
            "success": [_op_json(op) for op in success],
            "failure": [_op_json(op) for op in failure],
        }
        return self._call(
            "/v3/kv/txn",
            body,
            lambda answer: TxnResult(bool(answer.get("succeeded", False)), _revision(answer)),
        )

    def compact(self, revision: int, *, physical: bool = True) -> Deferred:
        """Drop history before ``revision``; fires with None once done (``physical``: on disk too)."""
        return self._call(
            "/v3/kv/compaction",
            {"revision": str(revision), "physical": physical},
            lambda answer: None,
        )

    # Leases.

    def lease_grant(self, ttl: int) -> Deferred:
        """Fires with (lease id, granted ttl)."""
        return self._call(
            "/v3/lease/grant",
            {"TTL": str(ttl)},
            lambda answer: (_int(answer, "ID"), _int(answer, "TTL")),
        )

    def lease_keepalive(self, lease: int) -> Deferred:
        """Renews once; fires with the new TTL, or 0 if the lease no longer exists."""

        def parse(answer: Any) -> int:
            # A streaming route: one {"result": ...} per line.
            return max(_int(answer.get("result", {}), "TTL"), 0)

        return self._call("/v3/lease/keepalive", {"ID": str(lease)}, parse, stream=True)

    def lease_revoke(self, lease: int) -> Deferred:
        """Fires with None; a missing lease is not an error."""
        d = self._call("/v3/lease/revoke", {"ID": str(lease)}, lambda answer: None)

        def missing(failure: Failure) -> None:
            failure.trap(EtcdError)
            if failure.value.code == _NOT_FOUND and "lease not found" in failure.value.message:
                return None
            return failure  # type: ignore[return-value]

        return d.addErrback(missing)

    def lease_ttl(self, lease: int) -> Deferred:
        """Fires with the remaining TTL in seconds (-1 if the lease is gone)."""
        return self._call(
            "/v3/lease/timetolive", {"ID": str(lease)}, lambda answer: _int(answer, "TTL")
        )

    # Watches.

    def watch(self, key: bytes, range_end: bytes | None, start_revision: int,
              on_events: Callable[[int, list[Event]], None]) -> Watch:
        """Stream changes from ``start_revision``; calls on_events(revision, events).

        ``start_revision`` 0 means from now. ``revision`` is the store's
        revision when etcd sent the batch, which may be past the batch's last
        event. Events of one revision arrive together, in order; callbacks
        that raise are logged and the stream goes on. Opening the stream is
        bounded by the time-out and fails over like a call; the open stream
        is not, and ends with `EtcdUnavailable` if its member loses its
        connection or its leader.
        """
        request: dict[str, Any] = {"key": _b64(key), "start_revision": str(start_revision)}
        if range_end is not None:
            request["range_end"] = _b64(range_end)
        body = json.dumps({"create_request": request}).encode("utf-8")
        watch = Watch(start_revision, on_events)
        self._watches.add(watch)
        watch.done.addBoth(self._forget, watch)
        Deferred.fromCoroutine(self._open_watch(watch, body)).addErrback(_fail_watch, watch)
        return watch

    def close(self) -> Deferred:
        """Close pooled connections and stop watches."""
        for watch in list(self._watches):
            watch.stop()
        return gatherResults(
            [self._pool.closeCachedConnections(), self._watch_pool.closeCachedConnections()]
        ).addCallback(lambda _: None)

    # Plumbing.

    def _forget(self, result: Any, watch: Watch) -> Any:
        self._watches.discard(watch)
        return result

    def _call(
        self, path: str, body: Any, parse: Callable[[Any], T], *, stream: bool = False
    ) -> Deferred:
        # Cancelling the answer stops the request and tries no further endpoint.
        return cancellable(lambda cancelled: self._failover(path, body, parse, stream, cancelled))

    async def _failover(
        self, path: str, body: Any, parse: Callable[[Any], T], stream: bool, cancelled: list[bool]
    ) -> T:
        data = json.dumps(body).encode("utf-8")
        reasons: list[str] = []
        for index in self._order():
            base = self._endpoints[index]
            try:
                answer = await self._once(base, path, data, stream)
            except EtcdUnavailable as e:
                if cancelled:
                    raise CancelledError() from None
                reasons.append(e.reason)
                self._log_failover(base, e.reason)
                continue
            except EtcdError:
                self._current = index
                raise
            self._current = index
            try:
                return parse(answer)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise EtcdError(_UNKNOWN, f"{base}: unexpected answer: {e!r}") from None
        raise EtcdUnavailable("; ".join(reasons))

    def _order(self) -> list[int]:
        """Endpoint indexes from the one that answered last."""
        n = len(self._endpoints)
        return [(self._current + i) % n for i in range(n)]

    def _log_failover(self, endpoint: str, reason: str) -> None:
        if len(self._endpoints) > 1:
            log.info(
                "etcd at {endpoint} unavailable ({reason}); trying the next",
                event="etcd.failover",
                endpoint=endpoint,
                reason=reason,
            )

    async def _once(self, base: str, path: str, data: bytes, stream: bool) -> Any:
        """One request to one endpoint; the answer's JSON, or `EtcdUnavailable`/`EtcdError`."""

        async def exchange() -> tuple[int, bytes]:
            # Asking for a leader makes a member that has lost its own refuse
            # at once ("no leader") instead of holding the call until etcd's
            # own time-out: without quorum, writes fail fast.
            response = await _post(self._agent, base + path, data)
            return response.code, await _read_body(response)

        code, raw = await self._bounded(base, Deferred.fromCoroutine(exchange()))
        if stream:
            # One JSON object per line; a call sends one request, so one answer.
            lines = [line for line in raw.split(b"\n") if line.strip()]
            raw = lines[0] if lines else b"{}"
        return _answer(base, code, raw)

    async def _bounded(self, base: str, attempt: Deferred) -> Any:
        """Await ``attempt``, cancelling it after the time-out; failures become `EtcdUnavailable`."""
        # Not Deferred.addTimeout: the Agent wraps the cancellation in
        # ResponseNeverReceived, which addTimeout does not recognise.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            attempt.cancel()

        timer = self._reactor.callLater(self._timeout, expire)
        try:
            return await attempt
        except CancelledError:
            if expired:
                raise EtcdUnavailable(f"{base}: no answer within {self._timeout:g} s") from None
            raise
        except Exception as e:
            if expired:
                raise EtcdUnavailable(f"{base}: no answer within {self._timeout:g} s") from None
            raise EtcdUnavailable(f"{base}: {_describe(e)}") from None
        finally:
            if timer.active():
                timer.cancel()

    async def _open_watch(self, watch: Watch, body: bytes) -> None:
        reasons: list[str] = []
        for index in self._order():
            base = self._endpoints[index]
            if watch.stopped:
                return
            watch._endpoint = base
            watch._connecting = _post(self._watch_agent, base + "/v3/watch", body)
            try:
                response = await self._bounded(base, watch._connecting)
            except CancelledError:
                return  # stopped
            except EtcdUnavailable as e:
                if watch.stopped:
                    return
                reasons.append(e.reason)
                self._log_failover(base, e.reason)
                continue
            finally:
                watch._connecting = None
            if response.code != 200:
                try:
                    raw = await self._bounded(base, _read_body(response))
                    _answer(base, response.code, raw)  # raises for an error answer
                except EtcdUnavailable as e:
                    reasons.append(e.reason)
                    self._log_failover(base, e.reason)
                    continue
                raise EtcdError(_UNKNOWN, f"{base}: watch answered HTTP {response.code}")
            self._current = index
            stream = _Body(_LineSplitter(watch._line))
            watch._stream = stream
            stream.finished.addBoth(watch._lost)
            response.deliverBody(stream)
            if watch.stopped:  # stopped while connecting
                stream.abort()
            return
        raise EtcdUnavailable("; ".join(reasons))


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def _quiet(pool: HTTPConnectionPool) -> HTTPConnectionPool:
    """A pool whose connections do not log "Starting factory" each time.

    The daemon opens them all day long (watches, failovers); Twisted offers no
    public switch, so the pool's factory class is replaced.
    """
    pool._factory = _QuietClientFactory
    return pool


def _fail_watch(failure: Failure, watch: Watch) -> None:
    if failure.check(EtcdUnavailable, EtcdError):
        watch._finish(failure.value)
        return
    log.failure("watch failed to start", failure, event="etcd.watch_failed")
    watch._finish(EtcdUnavailable(f"watch failed to start: {failure.value!r}"))


class _Body(Protocol):
    """A response body handed to ``on_data`` as it arrives; ``abort`` drops the connection.

    treq's ``collect`` would do, but neither it nor ``content()`` can be
    stopped halfway: a watch must be, and so must a call past its time-out.
    """

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self._aborted = False
        self.finished: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self._aborted:
            self._on_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    def abort(self) -> None:
        if not self._aborted:
            self._aborted = True
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]


class _LineSplitter:
    """Buffers chunks and hands over whole lines: a chunk may hold part of a line, or several."""

    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        self._on_line = on_line
        self._buffer = b""

    def __call__(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._on_line(line)


def _post(agent: Agent, url: str, body: bytes) -> Deferred:
    """POST JSON to the gateway with the Agent itself: treq's conveniences (URL
    parsing, cookies, content decoding) would cost more than the call."""
    headers = Headers({**_JSON, **_REQUIRE_LEADER})
    return agent.request(b"POST", url.encode("ascii"), headers, BytesProducer(body))


def _read_body(response: IResponse) -> Deferred:
    """The whole body; cancelling it drops the connection."""
    chunks: list[bytes] = []
    body = _Body(chunks.append)
    collected: Deferred = Deferred(lambda d: body.abort())

    def done(result: Any) -> None:
        if collected.called:  # cancelled
            return
        if isinstance(result, Failure):
            collected.errback(result)
        else:
            collected.callback(b"".join(chunks))

    body.finished.addBoth(done)
    response.deliverBody(body)
    return collected


def _answer(base: str, code: int, raw: bytes) -> Any:
    """The JSON of an answer, or the exception its error calls for."""
    try:
        answer = json.loads(raw) if raw.strip() else {}
    except ValueError:
        if code in _UNAVAILABLE_STATUSES:
            raise EtcdUnavailable(f"{base}: HTTP {code}") from None
        raise EtcdError(_UNKNOWN, f"{base}: HTTP {code} with a body that is not JSON") from None
    if not isinstance(answer, dict):
        raise EtcdError(_UNKNOWN, f"{base}: HTTP {code} with a body that is not an object")
    problem = _error_in(base, answer) if "error" in answer else None
    if code >= 400 or problem is not None:
        if problem is None:
            problem = EtcdError(_UNKNOWN, f"HTTP {code}")
        if isinstance(problem, EtcdError) and code in _UNAVAILABLE_STATUSES:
            problem = EtcdUnavailable(f"{base}: {problem.message}")
        raise problem
    return answer


def _error_in(base: str, answer: Any) -> EtcdError | EtcdUnavailable | None:
    """The error an answer carries, in either of the gateway's shapes, if any.

    Plain calls answer ``{"error": text, "code": n, "message": text}``;
    streaming routes ``{"error": {"grpc_code": n, "http_code": n, "message": text}}``.
    """
    if not isinstance(answer, dict) or not answer.get("error"):
        return None
    error = answer["error"]
    if isinstance(error, dict):
        code = int(error.get("grpc_code", _UNKNOWN))
        message = str(error.get("message", ""))
    else:
        code = int(answer.get("code", _UNKNOWN))
        message = str(answer.get("message") or error)
    if code in _UNAVAILABLE_CODES:
        return EtcdUnavailable(f"{base}: {message}")
    return EtcdError(code, message)


def _describe(error: BaseException) -> str:
    """Name a transport failure for people, telling TLS refusals apart."""
    reasons = _nested(error)
    for reason in reasons:
        if isinstance(reason, SSL.Error):
            return f"TLS handshake failed: {describe_ssl_error(reason)}"
        if isinstance(reason, VerificationError):
            return f"TLS host name check failed: {reason}"
    for reason in reasons:
        if isinstance(reason, (ConnectError, DNSLookupError)):
            return f"cannot connect: {reason.__class__.__name__}"
        if isinstance(reason, ConnectionClosed):
            return "connection lost"
    return f"request failed: {reasons[-1]!r}"


def _nested(error: BaseException) -> list[BaseException]:
    """The error and the failures that ResponseFailed and friends wrap."""
    found = [error]
    if isinstance(error, (ResponseFailed, RequestTransmissionFailed)):
        for failure in error.reasons:
            if isinstance(failure, Failure):
                found.extend(_nested(failure.value))
    return found


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _int(data: Any, name: str) -> int:
    """An int64 field: a string in JSON, missing when zero."""
    return int(data.get(name, 0))


def _revision(answer: Any) -> int:
    return _int(answer.get("header", {}), "revision")


def _key_value(data: Any) -> KeyValue:
    return KeyValue(
        key=_unb64(data.get("key", "")),
        value=_unb64(data.get("value", "")),
        create_revision=_int(data, "create_revision"),
        mod_revision=_int(data, "mod_revision"),
        version=_int(data, "version"),
        lease=_int(data, "lease"),
    )


def _compare_json(compare: Compare) -> dict[str, Any]:
    value = compare.value
    return {
        "key": _b64(compare.key),
        "target": _TARGETS[compare.target],
        "result": _RESULTS[compare.result],
        _TARGET_FIELDS[compare.target]: _b64(value) if isinstance(value, bytes) else str(value),
    }


def _op_json(op: Put | Delete) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": _b64(op.key)}}
    raise TypeError(f"not a txn operation: {op!r}")

