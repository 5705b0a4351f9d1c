"""The registry's operations: who may change what, and what each change does.

`Registry` sits between the HTTP surface and the store. It reads the clock,
checks tokens, applies the rules of `model` and logs each lifecycle event.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Mapping, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .errors import ApiError, BackendUnavailable, Conflict, InstanceExists, InstanceNotFound, TokenExpired, Unauthorized
from .feed import ChangeFeed
from .model import Credentials, Instance, Peer, Registration
from .store import IStore
from .tokens import hash_token, new_token, token_matches
from .validation import InstanceSpec

T = TypeVar("T")

_ATTEMPTS = 5
"""How often a write is retried when the record changes between read and write."""


class BackendBusy(ApiError):
    status, code = 503, "backend_busy"


@attrs.frozen
class Issued:
    """The answer to a registration: the instance and the token that now guards it.

    ``outcome`` is ``created``, ``updated`` (the caller held the token) or
    ``reregistered`` (same client certificate, fresh token).
    """

    instance: Instance
    token: str = attrs.field(repr=False)
    token_expires_at: float
    outcome: str


class Registry:
    """Registration and discovery over a store, with time from an injected clock."""

    log = Logger()

    def __init__(self, store: IStore, clock: IReactorTime, token_ttl: int) -> None:
        self._store = store
        self._clock = clock
        self._token_ttl = token_ttl

    @property
    def feed(self) -> ChangeFeed:
        """The change feed of the store."""
        return self._store.feed

    def check_ready(self) -> None:
        """Raise `BackendUnavailable` while the store is still loading its state.

        A node that has not yet loaded the registry answers 503 rather than an
        empty list, which clients would take for the truth.
        """
        if not self._store.ready.called:
            raise BackendUnavailable("the registry is still loading its state; try again")

    def mirror_age(self) -> float | None:
        """How old the store's mirror of a shared backend is; None when not mirrored."""
        return self._store.mirror_age()

    @property
    def clock(self) -> IReactorTime:
        """Where the registry takes its time from."""
        return self._clock

    # The instance surface.

    async def register(
        self, service: str, spec: InstanceSpec, token: str | None, peer: Peer | None
    ) -> Issued:
        """Register an instance; or update it, or re-register it, when allowed.

        Registering an id that is live is an update for the holder of its
        token, a re-registration with a fresh token for the client certificate
        that registered it, and `InstanceExists` for anyone else.
        """
        now = self._clock.seconds()
        instance_id = spec.id or uuid.uuid4().hex
        existing = None
        if spec.id is not None:
            existing = await self._store.get(service, instance_id, now)
        if existing is None:
            return await self._create(service, instance_id, spec, peer, now)
        held = existing.credentials
        if _refusal(existing, token, now) is None:
            instance = _from_spec(service, instance_id, spec, existing.instance.registered_at, now)
            stored = await self._store.replace(existing, attrs.evolve(existing, instance=instance))
            self._logged(stored.instance, "updated", peer)
            return Issued(stored.instance, token, held.expires_at, "updated")
        if peer is not None and held.registrant == peer.fingerprint:
            fresh, credentials = self._credentials(peer, now)
            instance = _from_spec(service, instance_id, spec, now, now)
            stored = await self._store.replace(existing, Registration(instance, credentials))
            self._logged(stored.instance, "reregistered", peer)
            return Issued(stored.instance, fresh, credentials.expires_at, "reregistered")
        self.log.info(
            "refused to register {service}/{instance_id}: already registered by another client",
            event="instance.register_refused",
            service=service,
            instance_id=instance_id,
            **_peer_fields(peer),
        )
        raise InstanceExists(
            f"instance {instance_id!r} of {service!r} is already registered",
            {"id": instance_id},
        )

    # The writes below return Deferreds rather than being coroutines: they
    # are the most frequent requests, and over the in-memory store their
    # Deferreds have fired by the time they return, at a fraction of a
    # coroutine's cost.

    def update(
        self,
        service: str,
        instance_id: str,
        changes: Mapping[str, Any],
        token: str | None,
        peer: Peer | None,
    ) -> Deferred[Instance]:
        """Change the named fields of an instance; the lease is renewed too."""

        def attempt(current: Registration, now: float) -> Deferred[Instance]:
            instance = attrs.evolve(current.instance, **changes).renewed(now)
            replaced = self._store.replace(current, attrs.evolve(current, instance=instance))
            return replaced.addCallback(lambda stored: stored.instance)

        updating = self._authorized_write(service, instance_id, token, peer, attempt)
        return updating.addCallback(self._logged, "updated", peer)

    def heartbeat(
        self, service: str, instance_id: str, token: str | None, peer: Peer | None
    ) -> Deferred[Instance]:
        """Renew an instance's lease for a full TTL; fire with the renewed instance.

        A holder of the valid token is recognised against the store's own copy
        (`IStore.cached`), which saves a shared backend a read per heartbeat;
        anything else, or a renewal that finds that copy out of date, takes the
        path of every write: read, check, write.
        """
        now = self._clock.seconds()
        held = self._store.cached(service, instance_id, now)
        if held is None or _refusal(held, token, now) is not None:
            return self._authorized_write(service, instance_id, token, peer, self._store.renew)

        def outdated(failure: Failure) -> Deferred[Instance]:
            failure.trap(Conflict)
            return self._authorized_write(service, instance_id, token, peer, self._store.renew)

        return self._store.renew(held, now).addErrback(outdated)

    def rotate(
        self, service: str, instance_id: str, token: str | None, peer: Peer | None
    ) -> Deferred[tuple[str, float]]:
        """Replace an instance's token; the old one stops working at once."""

        def attempt(current: Registration, now: float) -> Deferred[tuple[str, float]]:
            fresh = new_token()
            credentials = attrs.evolve(
                current.credentials,
                token_hash=hash_token(fresh),
                expires_at=now + self._token_ttl,
            )
            replaced = self._store.replace(current, attrs.evolve(current, credentials=credentials))
            return replaced.addCallback(lambda _: (fresh, credentials.expires_at))

        def rotated(result: tuple[str, float]) -> tuple[str, float]:
            self.log.info(
                "rotated the token of {service}/{instance_id}",
                event="instance.token_rotated",
                service=service,
                instance_id=instance_id,
                **_peer_fields(peer),
            )
            return result

        rotating = self._authorized_write(service, instance_id, token, peer, attempt)
        return rotating.addCallback(rotated)

    def deregister(
        self, service: str, instance_id: str, token: str | None, peer: Peer | None
    ) -> Deferred[Instance]:
        """Remove an instance; fire with it as it was."""

        def attempt(current: Registration, now: float) -> Deferred[Instance]:
            return self._store.delete(current).addCallback(lambda _: current.instance)

        removing = self._authorized_write(service, instance_id, token, peer, attempt)
        return removing.addCallback(self._logged, "deregistered", peer)

    # The discovery surface.

    def revision(self, service: str | None) -> int:
        """The revision of the last visible change to ``service`` (None: to the service list)."""
        return self._store.feed.service_revision(service)

    async def wait_for_change(self, service: str | None, index: int, timeout: float) -> None:
        """Return once ``service`` (None: the service list) changed after ``index``,
        or after ``timeout`` seconds, whichever comes first.

        An ``index`` ahead of the service's own revision can only come from an
        earlier life of the registry (it restarted and counts anew): that returns
        at once, so the client sees the reset.
        """
        if index > self._store.feed.service_revision(service):
            return
        waiter = self._store.feed.wait(service, index)
        timer = self._clock.callLater(timeout, waiter.cancel)
        try:
            await waiter
        except CancelledError:
            if timer.active():
                raise  # our caller gave up (the client went away), not the timer
        finally:
            if timer.active():
                timer.cancel()

    async def services(self) -> list[tuple[str, int]]:
        """Each service with a live instance, by name, with its count."""
        return await self._store.services(self._clock.seconds())

    def instances(
        self,
        service: str,
        status: str | None = None,
        tags: tuple[str, ...] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred[list[Instance]]:
        """The live instances of a service that pass every filter."""
        live = self._store.instances(service, self._clock.seconds())
        if status is None and not tags and not metadata:
            return live
        return live.addCallback(lambda found: [i for i in found if i.matches(status, tags, metadata)])

    def version(self, service: str) -> int:
        """Changes whenever anything of ``service`` changes, renewals included."""
        return self._store.version(service)

    async def instance(self, service: str, instance_id: str) -> Instance:
        """One live instance, or `InstanceNotFound`."""
        found = await self._store.get(service, instance_id, self._clock.seconds())
        return _live(found, service, instance_id).instance

    # Helpers.

    async def _create(
        self, service: str, instance_id: str, spec: InstanceSpec, peer: Peer | None, now: float
    ) -> Issued:
        token, credentials = self._credentials(peer, now)
        instance = _from_spec(service, instance_id, spec, now, now)
        stored = await self._store.create(Registration(instance, credentials), now)
        self._logged(stored.instance, "registered", peer)
        return Issued(stored.instance, token, credentials.expires_at, "created")

    def _credentials(self, peer: Peer | None, now: float) -> tuple[str, Credentials]:
        token = new_token()
        registrant = peer.fingerprint if peer is not None else None
        return token, Credentials(hash_token(token), now + self._token_ttl, registrant)

    def _authorized_write(
        self,
        service: str,
        instance_id: str,
        token: str | None,
        peer: Peer | None,
        attempt: Callable[[Registration, float], Deferred[T]],
        attempts: int = _ATTEMPTS,
    ) -> Deferred[T]:
        """Read the instance, check the token, then write; retry on `Conflict`."""
        now = self._clock.seconds()

        def authorized(found: Registration | None) -> Deferred[T]:
            current = _live(found, service, instance_id)
            self._authorize(current, token, peer, now)
            return attempt(current, now)

        def retried(failure: Failure) -> Deferred[T]:
            failure.trap(Conflict)
            if attempts <= 1:
                raise BackendBusy("the instance kept changing; try again")
            return self._authorized_write(service, instance_id, token, peer, attempt, attempts - 1)

        writing = self._store.get(service, instance_id, now)
        return writing.addCallback(authorized).addErrback(retried)

    def _authorize(
        self, current: Registration, token: str | None, peer: Peer | None, now: float
    ) -> None:
        error = _refusal(current, token, now)
        if error is not None:
            self.log.warn(
                "refused {service}/{instance_id}: {code}",
                event="auth.failed",
                code=error.code,
                service=current.instance.service,
                instance_id=current.instance.id,
                **_peer_fields(peer),
            )
            raise error

    def _logged(self, instance: Instance, what: str, peer: Peer | None) -> Instance:
        self.log.info(
            what + " {service}/{instance_id} at {host}:{port}",
            event="instance." + what,
            service=instance.service,
            instance_id=instance.id,
            host=instance.host,
            port=instance.port,
            status=instance.status,
            ttl=instance.ttl,
            **_peer_fields(peer),
        )
        return instance


def _refusal(current: Registration, token: str | None, now: float) -> ApiError | None:
    """Why ``token`` may not change ``current`` at ``now``; None when it may."""
    if token is None:
        return Unauthorized("this operation needs the instance's token: Authorization: Bearer <token>")
    if not token_matches(token, current.credentials.token_hash):
        return Unauthorized("the token is not valid for this instance")
    if now >= current.credentials.expires_at:
        return TokenExpired("the token has expired; register again to get a new one")
    return None


def _live(found: Registration | None, service: str, instance_id: str) -> Registration:
    if found is None:
        raise InstanceNotFound(
            f"no live instance {instance_id!r} of {service!r}; register it again",
            {"service": service, "id": instance_id},
        )
    return found


def _from_spec(
    service: str, instance_id: str, spec: InstanceSpec, registered_at: float, now: float
) -> Instance:
    return Instance(
        service=service,
        id=instance_id,
        host=spec.host,
        port=spec.port,
        status=spec.status,
        metadata=spec.metadata,  # checked and made for this request: no copy needed
        tags=spec.tags,
        ttl=spec.ttl,
        registered_at=registered_at,
        last_heartbeat_at=now,
        expires_at=now + spec.ttl,
    )


def _peer_fields(peer: Peer | None) -> dict[str, str | None]:
    if peer is None:
        return {"peer_subject": None, "peer_fingerprint": None, "peer_address": None}
    return {
        "peer_subject": peer.subject,
        "peer_fingerprint": peer.fingerprint,
        "peer_address": peer.address,
    }
