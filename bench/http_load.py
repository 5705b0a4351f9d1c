"""An HTTP/1.1 load generator over mutual TLS, on the standard library's ssl and selectors.

Twisted would cost the load generator about as much per request as it costs
the registry; this loop does the least Python per request it can (one
``send``, one or two ``recv``, a header search), so that on its own CPU it
drives several times what a Twisted server answers. How much more is measured,
not assumed: the suite runs it against a trivial endpoint first
(`bench.scenarios`).

Two ways to drive a server, both for a fixed time after a warm-up, or until a
finite list of requests is used up:

* `keep_alive`: one connection per *script*, each request sent as soon as the
  previous answer is in (no pipelining). A script is a generator that yields
  request bytes and is sent each answer as ``(status, body)``: so each
  connection can cycle through its own URLs and tokens (heartbeats of
  different instances), or read a token from an answer for the next request
  (rotations).
* `handshakes`: ``concurrency`` slots, each repeatedly connecting, doing a full
  TLS handshake (no session resumption), sending one request with
  ``Connection: close``, reading the answer and closing.

Each gives a `Result`: answers per second within the window, latencies (from
sending, or from connecting, to the last byte of the answer), errors by kind,
and the CPU this process used, to tell when the generator itself was the limit.
"""

from __future__ import annotations

import errno
import gc
import http.client
import json
import math
import resource
import selectors
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

Answer = tuple[int, bytes]
"""A response as a script sees it: the status and the body."""

Script = Generator[bytes, Answer, None]
"""Yields each request's bytes; is sent each answer; returns when the connection is done."""

CONNECT_TIMEOUT = 10.0
"""Seconds a connection may take to connect and shake hands."""

ANSWER_TIMEOUT = 30.0
"""Seconds a run may go without any answer before it gives up."""


class LoadError(Exception):
    """The generator could not do what it was asked: the message says why."""


@attrs.frozen
class Endpoint:
    """Where a server listens and the mutual-TLS material to reach it."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    server_name: str = "localhost"

    def context(self) -> ssl.SSLContext:
        """A client context that presents our certificate and checks the server's against the CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


def request(
    method: str,
    target: str,
    body: object = None,
    token: str | None = None,
    close: bool = False,
    host: str = "localhost",
) -> bytes:
    """The bytes of one HTTP/1.1 request; a body is sent as JSON."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    data = b""
    if body is not None:
        data = json.dumps(body, separators=(",", ":")).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    elif method in ("POST", "PUT"):
        lines.append("Content-Length: 0")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


# Scripts.


def cycle(requests: Sequence[bytes]) -> Script:
    """Send ``requests`` in turn, over and over."""
    if not requests:
        return
    # Not `yield from`: it would hand the answers sent in to a list iterator.
    while True:
        for item in requests:  # noqa: UP028
            yield item


def drain(shared: Iterator[bytes]) -> Script:
    """Send the requests of an iterator that several connections share, until it runs out."""
    for item in shared:  # noqa: UP028 (see cycle)
        yield item


def drain_answers(shared: Iterator[tuple[Any, bytes]], sink: list[tuple[Any, Answer]]) -> Script:
    """Like `drain`, with ``(tag, request)`` pairs; each answer goes to ``sink`` with its tag."""
    for tag, item in shared:
        answer = yield item
        sink.append((tag, answer))


# Parsing answers.


def parse_answer(buffer: bytearray) -> tuple[int, bytes, int] | int | None:
    """The first whole response in ``buffer``: (status, body, bytes used).

    Returns None when more bytes are needed, or, once the headers name a
    Content-Length, the total size the response will have (so that the
    caller need not look again before it has that much).
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    try:
        status = int(head[9:12])
    except ValueError:
        raise LoadError(f"not an HTTP response: {bytes(buffer[:80])!r}") from None
    start = end + 4
    found = head.find(b"\r\ncontent-length:")
    if found >= 0:
        line_end = head.find(b"\r\n", found + 17)
        length = int(head[found + 17:line_end if line_end >= 0 else len(head)])
        if len(buffer) < start + length:
            return start + length
        return status, bytes(buffer[start:start + length]), start + length
    if b"\r\ntransfer-encoding: chunked" in head:
        return parse_chunked(buffer, status, start)
    if status in (204, 304) or 100 <= status < 200:
        return status, b"", start
    raise LoadError(f"a response without length: {bytes(buffer[:200])!r}")


def parse_chunked(buffer: bytearray, status: int, position: int) -> tuple[int, bytes, int] | None:
    """A chunked body that starts at ``position``: (status, body, end), or None until it is all in."""
    body = bytearray()
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", position)
            while trailer_end > position:  # trailer lines up to the empty one
                position = trailer_end + 2
                trailer_end = buffer.find(b"\r\n", position)
            if trailer_end < 0:
                return None
            return status, bytes(body), trailer_end + 2
        if len(buffer) < position + size + 2:
            return None
        body += buffer[position:position + size]
        position += size + 2


# Results.


@attrs.define
class Result:
    """What one run measured."""

    answers: int = 0
    """Successful (2xx) answers completed within the window."""
    window: float = 0.0
    """Seconds of the window."""
    latencies: list[float] = attrs.Factory(list)
    """Seconds from sending (or connecting) to the last byte, one per answer in the window."""
    errors: Counter[str] = attrs.Factory(Counter)
    """Failed requests within the window, by kind (``HTTP 503``, ``connection lost``...)."""
    client_cpu: float = 0.0
    """CPU seconds this process used within the window."""
    probed: list[float] | None = None
    """How much each value of the run's probe grew within the window (servers' CPU seconds)."""

    @property
    def rate(self) -> float:
        """Successful answers per second."""
        return self.answers / self.window if self.window > 0 else 0.0

    @property
    def client_load(self) -> float:
        """The fraction of one CPU this process used within the window."""
        return self.client_cpu / self.window if self.window > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        """The nearest-rank percentile of the latencies, in milliseconds (NaN without any)."""
        return 1000 * percentile(self.latencies, fraction) if self.latencies else math.nan

    @property
    def probed_rate(self) -> float | None:
        """The probe's total growth per second of the window (the servers' CPU load)."""
        if self.probed is None or self.window <= 0:
            return None
        return sum(self.probed) / self.window

    def probed_per_answer(self, index: int | None = None) -> float | None:
        """The probe's growth (total, or of one value) per successful answer: CPU per request."""
        if self.probed is None or self.answers == 0:
            return None
        grown = sum(self.probed) if index is None else self.probed[index]
        return grown / self.answers

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def describe_errors(self) -> str:
        return "; ".join(f"{count} x {kind}" for kind, count in self.errors.most_common(5))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with ``fraction`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Probe = Callable[[], Sequence[float]]
"""Read at the start and the end of a window: e.g. the CPU seconds of each server."""


class _Window:
    """The measurement window: answers completed in it count, those before it are warm-up."""

    def __init__(self, warmup: float, duration: float | None, probe: Probe | None) -> None:
        now = time.perf_counter()
        self.start = now if duration is None else now + warmup
        self.end = math.inf if duration is None else self.start + duration
        self.started = False
        self.result = Result()
        self.cpu_at_start = 0.0
        self.probe = probe
        self.probe_at_start: Sequence[float] = ()
        self.last_answer = now
        if duration is None:
            self.tick(now)

    def tick(self, now: float) -> None:
        if not self.started and now >= self.start:
            self.started = True
            self.cpu_at_start = _cpu()
            if self.probe is not None:
                self.probe_at_start = self.probe()

    def answered(self, now: float, sent: float, status: int) -> None:
        self.last_answer = now
        if now < self.start or now >= self.end:
            return
        result = self.result
        if 200 <= status < 300:
            result.answers += 1
            result.latencies.append(now - sent)
        else:
            result.errors[f"HTTP {status}"] += 1

    def failed(self, now: float, kind: str) -> None:
        if self.start <= now < self.end:
            self.result.errors[kind] += 1

    def close(self, now: float) -> Result:
        result = self.result
        end = min(now, self.end)
        result.window = max(0.0, end - self.start)
        if self.started:
            result.client_cpu = _cpu() - self.cpu_at_start
            if self.probe is not None:
                result.probed = [b - a for a, b in zip(self.probe_at_start, self.probe())]
        return result


# Keep-alive connections.


class _Connection:
    __slots__ = ("sock", "fd", "script", "target", "buffer", "need", "sent_at", "pending", "writing")

    def __init__(self, sock: ssl.SSLSocket, script: Script, target: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.script = script
        self.target = target
        self.buffer = bytearray()
        self.need = 0
        self.sent_at = 0.0
        self.pending = b""
        self.writing = False


def connect(endpoint: Endpoint, context: ssl.SSLContext, timeout: float = CONNECT_TIMEOUT) -> ssl.SSLSocket:
    """A connected, TLS-shaken socket (blocking while it connects), then made non-blocking."""
    raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock = context.wrap_socket(raw, server_hostname=endpoint.server_name)
    except BaseException:
        raw.close()
        raise
    sock.setblocking(False)
    return sock


MAX_RECONNECTS = 100
"""Connections a run may lose (and open anew) before it gives up."""


def keep_alive(
    endpoints: Endpoint | Sequence[Endpoint],
    scripts: Sequence[Script],
    duration: float | None,
    warmup: float = 0.0,
    limit: float = 120.0,
    probe: Probe | None = None,
) -> Result:
    """Drive one keep-alive connection per script; see the module's docstring.

    Given several endpoints, connection ``i`` goes to endpoint ``i`` modulo
    their number. With ``duration`` None the run lasts until every script is
    done and the window is all of it; else the window is ``duration`` seconds
    after ``warmup``. ``limit`` bounds the whole run: past it, `LoadError`. A
    connection that fails counts as an error, and its script goes on over a
    new one (its request in flight is not sent again).
    """
    targets = [endpoints] if isinstance(endpoints, Endpoint) else list(endpoints)
    contexts = [target.context() for target in targets]
    selector = selectors.DefaultSelector()
    connections: dict[int, _Connection] = {}
    deadline = time.perf_counter() + limit
    reconnects = [0]

    def retire(connection: _Connection) -> None:
        selector.unregister(connection.fd)
        del connections[connection.fd]
        connection.sock.close()

    def lost(connection: _Connection, kind: str) -> None:
        window.failed(time.perf_counter(), kind)
        retire(connection)
        reconnects[0] += 1
        if reconnects[0] > MAX_RECONNECTS:
            raise LoadError(f"more than {MAX_RECONNECTS} connections lost; the last: {kind}")
        target = connection.target
        fresh = _Connection(connect(targets[target], contexts[target]), connection.script, target)
        connections[fresh.fd] = fresh
        selector.register(fresh.fd, selectors.EVENT_READ, fresh)
        advance(fresh, None)

    def advance(connection: _Connection, answer: Answer | None) -> None:
        """Send the script's next request, or retire the connection when its script is done."""
        try:
            data = connection.script.send(answer)  # type: ignore[arg-type]
        except StopIteration:
            retire(connection)
            return
        connection.sent_at = time.perf_counter()
        connection.pending = data
        flush(connection)

    def flush(connection: _Connection) -> None:
        data = connection.pending
        try:
            while data:
                data = data[connection.sock.send(data):]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            connection.pending = data
            if not connection.writing:
                connection.writing = True
                selector.modify(connection.fd, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)
            return
        except OSError as e:
            lost(connection, f"send failed: {e.__class__.__name__}")
            return
        connection.pending = b""
        if connection.writing:
            connection.writing = False
            selector.modify(connection.fd, selectors.EVENT_READ, connection)

    def read(connection: _Connection, now: float) -> None:
        sock = connection.sock
        buffer = connection.buffer
        while True:
            try:
                data = sock.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as e:
                lost(connection, f"connection lost: {e.__class__.__name__}")
                return
            if not data:
                lost(connection, "connection closed by the server")
                return
            buffer += data
            if connection.need and len(buffer) < connection.need:
                if not sock.pending():
                    return
                continue
            parsed = parse_answer(buffer)
            if parsed is None or isinstance(parsed, int):
                connection.need = parsed or 0
                if not sock.pending():
                    return
                continue
            status, body, used = parsed
            del buffer[:used]
            connection.need = 0
            window.answered(now, connection.sent_at, status)
            if buffer:
                lost(connection, "an answer nobody asked for")
                return
            advance(connection, (status, body))
            return

    window = _Window(warmup, duration, probe)
    gc_was_enabled = gc.isenabled()
    try:
        for i, script in enumerate(scripts):
            target = i % len(targets)
            connection = _Connection(connect(targets[target], contexts[target]), script, target)
            connections[connection.fd] = connection
            selector.register(connection.fd, selectors.EVENT_READ, connection)
        window = _Window(warmup, duration, probe)
        gc.disable()  # a collection here would be counted as the server's latency
        for connection in list(connections.values()):
            advance(connection, None)
        now = time.perf_counter()
        while connections and now < window.end:
            events = selector.select(0.1)
            now = time.perf_counter()
            window.tick(now)
            for key, mask in events:
                connection = key.data
                if connections.get(connection.fd) is not connection:
                    continue
                if mask & selectors.EVENT_WRITE:
                    flush(connection)
                if mask & selectors.EVENT_READ and connections.get(connection.fd) is connection:
                    read(connection, now)
            if now > deadline:
                raise LoadError(f"the run did not end within {limit:g} s")
            if now - window.last_answer > ANSWER_TIMEOUT:
                raise LoadError(f"no answer for {ANSWER_TIMEOUT:g} s")
        return window.close(now)
    finally:
        if gc_was_enabled:
            gc.enable()
        for connection in connections.values():
            connection.sock.close()
        selector.close()


# New connections.


_CONNECTING, _SHAKING, _SENDING, _READING = range(4)


class _Slot:
    __slots__ = ("raw", "sock", "fd", "state", "started", "buffer", "need", "pending")

    def __init__(self) -> None:
        self.raw: socket.socket | None = None
        self.sock: ssl.SSLSocket | None = None
        self.fd = -1
        self.state = _CONNECTING
        self.started = 0.0
        self.buffer = bytearray()
        self.need = 0
        self.pending = b""


def handshakes(
    endpoint: Endpoint,
    data: bytes,
    concurrency: int,
    duration: float,
    warmup: float = 0.0,
    limit: float = 120.0,
    probe: Probe | None = None,
) -> Result:
    """Repeat connect, full handshake, one request (``data``), answer, close, on ``concurrency`` slots."""
    context = endpoint.context()
    # Without a session given to wrap_socket, every handshake is a full one.
    selector = selectors.DefaultSelector()
    slots: dict[int, _Slot] = {}
    deadline = time.perf_counter() + limit
    window = _Window(warmup, duration, probe)
    gc_was_enabled = gc.isenabled()
    gc.disable()

    def start(slot: _Slot) -> None:
        slot.state = _CONNECTING
        slot.buffer = bytearray()
        slot.need = 0
        slot.sock = None
        slot.started = time.perf_counter()
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot.raw = raw
        slot.fd = raw.fileno()
        code = raw.connect_ex((endpoint.host, endpoint.port))
        if code not in (0, errno.EINPROGRESS):
            raw.close()
            # Retrying at once would spin: the server is gone or ports ran out.
            raise LoadError(f"cannot connect: {errno.errorcode.get(code, code)}")
        slots[slot.fd] = slot
        selector.register(slot.fd, selectors.EVENT_WRITE, slot)

    def finish(slot: _Slot) -> None:
        if slot.fd in slots:
            selector.unregister(slot.fd)
            del slots[slot.fd]
        (slot.sock or slot.raw).close()  # type: ignore[union-attr]

    def fail(slot: _Slot, kind: str) -> None:
        window.failed(time.perf_counter(), kind)
        finish(slot)
        start(slot)

    def shake(slot: _Slot) -> None:
        try:
            slot.sock.do_handshake()  # type: ignore[union-attr]
        except ssl.SSLWantReadError:
            selector.modify(slot.fd, selectors.EVENT_READ, slot)
            return
        except ssl.SSLWantWriteError:
            selector.modify(slot.fd, selectors.EVENT_WRITE, slot)
            return
        except (ssl.SSLError, OSError) as e:
            fail(slot, f"handshake failed: {e.__class__.__name__}: {str(e)[:80]}")
            return
        slot.state = _SENDING
        slot.pending = data
        send(slot)

    def send(slot: _Slot) -> None:
        try:
            while slot.pending:
                sent = slot.sock.send(slot.pending)  # type: ignore[union-attr]
                slot.pending = slot.pending[sent:]
        except ssl.SSLWantWriteError:
            selector.modify(slot.fd, selectors.EVENT_WRITE, slot)
            return
        except ssl.SSLWantReadError:
            selector.modify(slot.fd, selectors.EVENT_READ, slot)
            return
        except OSError as e:
            fail(slot, f"send failed: {e.__class__.__name__}")
            return
        slot.state = _READING
        selector.modify(slot.fd, selectors.EVENT_READ, slot)

    def read(slot: _Slot, now: float) -> None:
        sock = slot.sock
        while True:
            try:
                chunk = sock.recv(262144)  # type: ignore[union-attr]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as e:
                fail(slot, f"connection lost: {e.__class__.__name__}: {str(e)[:80]}")
                return
            if not chunk:
                fail(slot, "connection closed before the answer")
                return
            slot.buffer += chunk
            if slot.need and len(slot.buffer) < slot.need:
                continue
            parsed = parse_answer(slot.buffer)
            if parsed is None or isinstance(parsed, int):
                slot.need = parsed or 0
                continue
            status, _, _ = parsed
            window.answered(now, slot.started, status)
            finish(slot)
            start(slot)
            return

    try:
        for _ in range(concurrency):
            start(_Slot())
        now = time.perf_counter()
        while now < window.end:
            events = selector.select(0.1)
            now = time.perf_counter()
            window.tick(now)
            for key, mask in events:
                slot = key.data
                if slots.get(slot.fd) is not slot:
                    continue
                if slot.state == _CONNECTING:
                    code = slot.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
                    if code:
                        fail(slot, f"connect: {errno.errorcode.get(code, code)}")
                        continue
                    try:
                        slot.sock = context.wrap_socket(
                            slot.raw, server_hostname=endpoint.server_name,  # type: ignore[arg-type]
                            do_handshake_on_connect=False,
                        )
                    except (ssl.SSLError, OSError) as e:
                        fail(slot, f"TLS setup: {e}")
                        continue
                    slot.raw = None
                    slot.state = _SHAKING
                    shake(slot)
                elif slot.state == _SHAKING:
                    shake(slot)
                elif slot.state == _SENDING:
                    send(slot)
                else:
                    read(slot, now)
            if now > deadline:
                raise LoadError(f"the run did not end within {limit:g} s")
            if now - window.last_answer > ANSWER_TIMEOUT:
                raise LoadError(f"no answer for {ANSWER_TIMEOUT:g} s")
        return window.close(now)
    finally:
        if gc_was_enabled:
            gc.enable()
        for slot in list(slots.values()):
            (slot.sock or slot.raw).close()  # type: ignore[union-attr]
        selector.close()


# One request at a time, blocking: setup and readiness checks.


def fetch(
    endpoint: Endpoint,
    method: str,
    target: str,
    body: object = None,
    token: str | None = None,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: (status, headers in lower case, body)."""
    connection = http.client.HTTPSConnection(
        endpoint.host, endpoint.port, timeout=timeout, context=context or endpoint.context()
    )
    headers = {"Host": endpoint.server_name}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload
    finally:
        connection.close()


__all__ = [
    "Answer",
    "Endpoint",
    "LoadError",
    "Result",
    "Script",
    "cycle",
    "drain",
    "drain_answers",
    "fetch",
    "handshakes",
    "keep_alive",
    "parse_answer",
    "percentile",
    "request",
]
