"""`InstanceRegistration`: a service that keeps one instance registered with the registry."""

from __future__ import annotations

import random as _random
import uuid
from typing import Any, Callable, Mapping, Protocol, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..model import Instance
from .errors import InstanceNotFound, RegistryError, RegistryUnavailable, TokenExpired, Unauthorized
from .http import Lease, Registered, Token

_REJECTED = (InstanceNotFound, Unauthorized, TokenExpired)
"""Answers that mean the instance or its token is gone: register again at once."""

_MIN_TICK = 0.1
"""The shortest wait between successful steps, so a tiny token lifetime cannot spin."""

_EARLY = 1e-6
"""A timer may fire a float rounding error before the moment it was computed for."""

_MAX_EXPONENT = 30
"""Past this many failures the backoff ceiling is the cap anyway; keeps 2**n a small number."""


class Registrar(Protocol):
    """The part of `RegistryClient` that a registration uses."""

    def register(
        self,
        service: str,
        host: str,
        port: int,
        *,
        instance_id: str | None = ...,
        ttl: int | None = ...,
        metadata: Mapping[str, str] | None = ...,
        tags: Sequence[str] | None = ...,
        status: str | None = ...,
        token: str | None = ...,
    ) -> Deferred: ...

    def heartbeat(self, service: str, instance_id: str, token: str) -> Deferred: ...

    def rotate_token(self, service: str, instance_id: str, token: str) -> Deferred: ...

    def deregister(self, service: str, instance_id: str, token: str) -> Deferred: ...


class InstanceRegistration(Service):
    """Register an instance on start, keep its lease and token fresh, deregister on stop.

    On start it registers at once. Each success schedules the next heartbeat
    ``ttl * heartbeat_fraction`` seconds later, scaled by ``1 + u`` with ``u``
    uniform in ``[-jitter, jitter]``. Once ``now`` reaches the token's expiry
    minus ``rotate_margin`` of its lifetime, the next step rotates the token
    and then heartbeats; the wait before a step never passes that point.

    ``InstanceNotFound``, ``Unauthorized`` or ``TokenExpired`` from a heartbeat
    or rotation (the registry restarted, the lease lapsed, the token was
    refused) make it register again at once, under the same instance id.
    Any other failure, including a refused registration, is retried after a
    capped exponential backoff with full jitter: the ``k``-th failure in a row
    waits a time uniform in ``[0, min(backoff_cap, backoff_base * 2**(k-1))]``,
    but at least ``backoff_base / 20``. Full jitter spreads the retries of many
    clients over the whole window, so a registry that restarts is not hit by
    all of them at the same moment.

    Stopping cancels the next step, lets a request in flight finish and then
    deregisters (registering once more for a fresh token if the registry
    refuses the current one); the Deferred it returns fires, and never fails,
    within ``stop_timeout`` seconds, whether the registry answered or not.

    At most one request is in flight at a time. Times come from ``clock``;
    the registry's and this host's clocks are assumed close (a token that
    expires early is simply refused, which leads to a new registration).
    The token never appears in ``repr``, in log events or in errors.
    """

    log = Logger()

    def __init__(
        self,
        client: Registrar,
        service: str,
        host: str,
        port: int,
        *,
        clock: IReactorTime,
        instance_id: str | None = None,
        ttl: int = 30,
        metadata: Mapping[str, str] | None = None,
        tags: Sequence[str] | None = None,
        status: str = "up",
        heartbeat_fraction: float = 1 / 3,
        jitter: float = 0.1,
        rotate_margin: float = 0.2,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        stop_timeout: float = 5.0,
        random: _random.Random | None = None,
    ) -> None:
        _check(ttl >= 1, "ttl", ttl, "must be at least 1")
        _check(0 < heartbeat_fraction <= 1, "heartbeat_fraction", heartbeat_fraction, "must be in (0, 1]")
        _check(0 <= jitter < 1, "jitter", jitter, "must be in [0, 1)")
        _check(0 <= rotate_margin < 1, "rotate_margin", rotate_margin, "must be in [0, 1)")
        _check(backoff_base > 0, "backoff_base", backoff_base, "must be positive")
        _check(backoff_cap >= backoff_base, "backoff_cap", backoff_cap, "must be at least backoff_base")
        _check(stop_timeout > 0, "stop_timeout", stop_timeout, "must be positive")
        self._client = client
        self._service = service
        self._host = host
        self._port = port
        self._clock = clock
        # Made once, so that every re-registration claims the same id.
        self._instance_id = instance_id if instance_id is not None else uuid.uuid4().hex
        self._ttl = ttl
        self._metadata = dict(metadata) if metadata is not None else None
        self._tags = list(tags) if tags is not None else None
        self._status = status
        self._heartbeat_fraction = heartbeat_fraction
        self._jitter = jitter
        self._rotate_margin = rotate_margin
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._backoff_floor = 0.05 * backoff_base
        self._stop_timeout = stop_timeout
        self._random = random if random is not None else _random.Random()

        self._token: str | None = None
        self._rotate_at: float | None = None
        self._instance: Instance | None = None
        self._lost = False  # the registry refused us; the next registration is a re-registration
        self._last_success: float | None = None
        self._consecutive_failures = 0
        self._next: IDelayedCall | None = None
        self._in_flight: Deferred | None = None
        self._settle_waiters: list[Deferred] = []
        self._stopping: Deferred | None = None
        self._start_after_stop = False

    def __repr__(self) -> str:
        return (
            f"<InstanceRegistration {self._service}/{self._instance_id} "
            f"at {self._host}:{self._port} registered={self.registered}>"
        )

    # What can be observed.

    @property
    def registered(self) -> bool:
        """Whether the instance holds a registration and a token right now."""
        return self._token is not None

    @property
    def instance_id(self) -> str:
        """The instance's id, the same for every registration of this object."""
        return self._instance_id

    @property
    def instance(self) -> Instance | None:
        """The instance as last seen: from its registration, with the lease of the last heartbeat."""
        return self._instance

    @property
    def last_success(self) -> float | None:
        """When, on ``clock``, the registry last accepted a request; None before the first."""
        return self._last_success

    @property
    def consecutive_failures(self) -> int:
        """Requests that failed since the last one that succeeded."""
        return self._consecutive_failures

    # The service.

    def startService(self) -> None:
        super().startService()
        if self._stopping is not None:
            # Deregistration is still under way: one request at a time.
            self._start_after_stop = True
        else:
            self._step()

    def stopService(self) -> Deferred:
        super().stopService()
        self._start_after_stop = False
        self._cancel_next()
        if self._stopping is not None:
            return self._when_stopped()
        stopping = Deferred.fromCoroutine(self._shutdown())
        stopping.addTimeout(self._stop_timeout, self._clock)
        stopping.addCallbacks(self._deregistered, self._deregister_failed)
        stopping.addBoth(self._stopped)
        if not stopping.called:
            self._stopping = stopping
            return self._when_stopped()
        return stopping

    # The steps.

    @property
    def _active(self) -> bool:
        """Running, and not still finishing an earlier stop."""
        return bool(self.running) and self._stopping is None

    def _step(self) -> None:
        """Register, rotate or heartbeat, whichever is due."""
        self._next = None
        if not self._active or self._in_flight is not None:
            return
        token = self._token
        if token is None:
            self._send("register", self._register)
        elif self._rotate_at is not None and self._clock.seconds() + _EARLY >= self._rotate_at:
            self._send(
                "rotate", lambda: self._client.rotate_token(self._service, self._instance_id, token)
            )
        else:
            self._send(
                "heartbeat", lambda: self._client.heartbeat(self._service, self._instance_id, token)
            )

    def _register(self) -> Deferred:
        return self._client.register(
            self._service,
            self._host,
            self._port,
            instance_id=self._instance_id,
            ttl=self._ttl,
            metadata=self._metadata,
            tags=self._tags,
            status=self._status,
        )

    def _send(self, step: str, request: Callable[[], Deferred]) -> None:
        sent = maybeDeferred(request)
        # Set before adding callbacks: a fake may have fired already.
        self._in_flight = sent
        sent.addBoth(self._answered, step)

    def _answered(self, result: object, step: str) -> None:
        self._in_flight = None
        try:
            if isinstance(result, Failure):
                self._failed(step, result)
            else:
                self._succeeded(step, result)
        except Exception:
            self.log.failure(
                "registration of {service}/{instance_id}: handling the {step} answer failed",
                event="registration.bug",
                service=self._service,
                instance_id=self._instance_id,
                step=step,
            )
            if self._active and self._next is None and self._in_flight is None:
                self._schedule(self._backoff())
        finally:
            waiters, self._settle_waiters = self._settle_waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    def _succeeded(self, step: str, result: Any) -> None:
        now = self._clock.seconds()
        self._last_success = now
        self._consecutive_failures = 0
        if step == "register":
            assert isinstance(result, Registered)
            self._take_token(result.token, result.token_expires_at, now)
            self._instance = result.instance
            again, self._lost = self._lost, False
            self.log.info(
                ("re-registered" if again else "registered")
                + " {service}/{instance_id} at {host}:{port} for {ttl} s",
                event="registration.reregistered" if again else "registration.registered",
                service=self._service,
                instance_id=self._instance_id,
                host=result.instance.host,
                port=result.instance.port,
                ttl=result.instance.ttl,
                expires_at=result.instance.expires_at,
                token_expires_at=result.token_expires_at,
            )
        elif step == "rotate":
            assert isinstance(result, Token)
            self._take_token(result.token, result.expires_at, now)
            self.log.info(
                "rotated the token of {service}/{instance_id}",
                event="registration.token_rotated",
                service=self._service,
                instance_id=self._instance_id,
                token_expires_at=result.expires_at,
            )
            # A rotation does not renew the lease: heartbeat right after it.
            self._step()
            return
        else:
            assert isinstance(result, Lease)
            if self._instance is not None:
                self._instance = attrs.evolve(
                    self._instance,
                    ttl=result.ttl,
                    last_heartbeat_at=result.expires_at - result.ttl,
                    expires_at=result.expires_at,
                )
        if self._active:
            self._schedule(self._heartbeat_delay())

    def _failed(self, step: str, failure: Failure) -> None:
        if not self._active:
            return  # stopping: the shutdown decides what happens next
        error = failure.value
        previous = self._consecutive_failures
        self._consecutive_failures += 1
        if step != "register" and isinstance(error, _REJECTED):
            self._token = None
            self._rotate_at = None
            self._lost = True
            self.log.warn(
                "{step} of {service}/{instance_id} refused ({error}); registering again now",
                event="registration.failed",
                service=self._service,
                instance_id=self._instance_id,
                step=step,
                error=str(error),
                delay=0.0,
                failures=self._consecutive_failures,
            )
            self._step()
            return
        delay = self._backoff(previous)
        fields = dict(
            event="registration.failed",
            service=self._service,
            instance_id=self._instance_id,
            step=step,
            error=_describe(error),
            delay=delay,
            failures=self._consecutive_failures,
        )
        text = "{step} of {service}/{instance_id} failed ({error}); retrying in {delay:.2f} s"
        if step == "register" and isinstance(error, RegistryError) and error.status < 500:
            # The registry refused the registration itself (say, another
            # certificate holds the id): that needs a person, not patience.
            self.log.error(text, **fields)
        elif isinstance(error, (RegistryError, RegistryUnavailable)):
            self.log.warn(text, **fields)
        else:
            self.log.failure(text, failure, **fields)
        self._schedule(delay)

    # Time.

    def _take_token(self, token: str, expires_at: float, now: float) -> None:
        self._token = token
        lifetime = max(0.0, expires_at - now)
        self._rotate_at = expires_at - self._rotate_margin * lifetime

    def _heartbeat_delay(self) -> float:
        ttl = self._instance.ttl if self._instance is not None else self._ttl
        u = self._random.uniform(-self._jitter, self._jitter)
        delay = ttl * self._heartbeat_fraction * (1 + u)
        if self._rotate_at is not None:
            delay = min(delay, self._rotate_at - self._clock.seconds())
        return max(_MIN_TICK, delay)

    def _backoff(self, failures: int | None = None) -> float:
        n = self._consecutive_failures if failures is None else failures
        ceiling = min(self._backoff_cap, self._backoff_base * 2 ** min(n, _MAX_EXPONENT))
        return max(self._backoff_floor, self._random.uniform(0, ceiling))

    def _schedule(self, delay: float) -> None:
        self._cancel_next()
        self._next = self._clock.callLater(delay, self._step)

    def _cancel_next(self) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None

    # Stopping.

    async def _shutdown(self) -> str | None:
        """Deregister, once the request in flight is answered; say how it went."""
        if self._in_flight is not None:
            await self._settled()
        token = self._token
        if token is None:
            return None
        try:
            await self._client.deregister(self._service, self._instance_id, token)
        except InstanceNotFound:
            return "already gone"  # a restarted registry, or a lease that lapsed
        except (Unauthorized, TokenExpired):
            # The token can expire while the request waits in a busy
            # registry; this certificate may register again for a fresh one.
            registered = await self._register()
            self._token = registered.token
            await self._client.deregister(self._service, self._instance_id, registered.token)
        return "deregistered"

    def _settled(self) -> Deferred:
        """Fires once the request in flight has been answered; cancelling it cancels the request."""

        def cancel(waiter: Deferred) -> None:
            # Out of the list first, so that the cancelled request's answer
            # does not fire this waiter: it fails with CancelledError instead.
            self._settle_waiters.remove(waiter)
            if self._in_flight is not None:
                self._in_flight.cancel()

        waiter: Deferred = Deferred(cancel)
        self._settle_waiters.append(waiter)
        return waiter

    def _deregistered(self, outcome: str | None) -> None:
        if outcome is None:
            return  # nothing was registered
        self.log.info(
            "deregistered {service}/{instance_id} ({outcome})",
            event="registration.deregistered",
            service=self._service,
            instance_id=self._instance_id,
            outcome=outcome,
        )

    def _deregister_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, TimeoutError):
            text = f"no answer within {self._stop_timeout:g} s"
        else:
            text = _describe(error)
        self.log.warn(
            "could not deregister {service}/{instance_id} ({error}); its lease will lapse",
            event="registration.deregister_failed",
            service=self._service,
            instance_id=self._instance_id,
            error=text,
        )

    def _stopped(self, _: object) -> None:
        # Whatever the answer, this object no longer keeps the instance alive.
        self._token = None
        self._rotate_at = None
        self._lost = False
        self._stopping = None
        if self._start_after_stop and self._active:
            self._start_after_stop = False
            self._step()

    def _when_stopped(self) -> Deferred:
        """A Deferred of its own for each caller, fired when the stop under way ends."""
        assert self._stopping is not None
        done: Deferred = Deferred()
        self._stopping.addBoth(lambda result: (done.callback(None), result)[1])
        return done


def _describe(error: BaseException) -> str:
    """An error in a few words; never holds a token, since no error message does."""
    return str(error) or error.__class__.__name__


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {rule}, not {value!r}")
