"""`EtcdStore`: registrations in etcd, one lease per instance, read from a watch-fed mirror.

Each instance is the key ``PREFIX instances/SERVICE/ID``, whose value is the
record as JSON, attached to an etcd lease of the instance's TTL. A heartbeat
is a keep-alive of that lease, not a write; eviction is etcd's lease expiry,
so no node runs a lease manager. Writes that must not race are transactions
on the key's revision. Every node keeps a mirror of the prefix (a listing,
then a watch from the next revision; a listing again after a compaction or a
lost watch), serves discovery from it, and records its changes in the
`ChangeFeed` at etcd's revisions, so every node agrees on them.

A deregistration first marks the record ``gone`` and then revokes its lease,
so that watchers can tell it from an eviction (a delete nobody announced).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import BackendUnavailable, Conflict, InstanceExists
from ..feed import ChangeFeed
from ..model import Credentials, Instance, Registration, change_kind, shared_metadata, shared_tags
from ..store import IStore
from .gateway import (
    Compacted,
    Compare,
    EtcdGateway,
    EtcdUnavailable,
    Event,
    KeyValue,
    Put,
    TxnResult,
)

RESYNC_DELAY = 1.0
"""Seconds between attempts to list again after the mirror lost etcd."""

CATCH_UP = 1.0
"""How long a write waits for the mirror to show it, so that the node that
made a change shows it at once; past this the write answers anyway."""


@attrs.frozen
class LeasedRegistration(Registration):
    """A registration as etcd holds it: with its key's revision and its lease."""

    lease: int = 0


@implementer(IStore)
class EtcdStore(Service):
    """The registry's state in etcd, mirrored in memory on every node.

    Start it (it is a Service) before serving: ``ready`` fires once the
    mirror holds a first listing.
    """

    log = Logger()

    def __init__(self, gateway: EtcdGateway, prefix: str, clock: IReactorTime) -> None:
        self.feed = ChangeFeed(clock=clock)
        self.ready: Deferred = Deferred()
        self._gateway = gateway
        self._root = prefix.encode("utf-8") + b"instances/"
        self._clock = clock
        self._services: dict[str, dict[str, LeasedRegistration]] = {}
        self._versions: dict[str, int] = {}
        self._watch: Any = None
        self._retry: IDelayedCall | None = None
        # When the mirror lost etcd; None while its watch is current.
        self._lost_at: float | None = None
        self._catching_up: list[tuple[int, Deferred]] = []

    # The mirror.

    def startService(self) -> None:
        super().startService()
        self._list()

    def stopService(self) -> Deferred:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._watch is not None:
            self._watch.stop()
        return self._gateway.close()

    def mirror_age(self) -> float | None:
        """0 while the mirror's watch is current; else seconds since it lost etcd.

        None before the first listing.
        """
        if not self.ready.called:
            return None
        if self._lost_at is None:
            return 0.0
        return max(0.0, self._clock.seconds() - self._lost_at)

    def _current(self, _: object = None) -> None:
        self._lost_at = None

    def _list(self) -> None:
        self._retry = None
        listed = self._gateway.range(self._root, _prefix_end(self._root))
        listed.addCallbacks(self._listed, self._mirror_lost)

    def _listed(self, answer: tuple[int, list[KeyValue]]) -> None:
        revision, kvs = answer
        if not self.running:
            return
        fresh: dict[tuple[str, str], LeasedRegistration] = {}
        for kv in kvs:
            record = _decode(kv)
            if record is not None:
                fresh[record.key] = record
        first = not self.ready.called
        self._replace_all(fresh, revision, announce=not first)
        self.feed.observe(revision)
        self._current()
        self._watch = self._gateway.watch(
            self._root, _prefix_end(self._root), revision + 1, self._events
        )
        self._watch.done.addErrback(self._mirror_lost)
        if first:
            self.ready.callback(None)

    def _mirror_lost(self, failure: Failure) -> None:
        if not self.running:
            return None
        if self._lost_at is None:
            self._lost_at = self._clock.seconds()
        watch = self._watch
        if failure.check(EtcdUnavailable) and watch is not None and watch.next_revision > 0:
            # Resume the watch where it stopped: nothing is missed or repeated.
            self._retry = self._clock.callLater(RESYNC_DELAY, self._resume, watch.next_revision)
        else:
            if not failure.check(EtcdUnavailable, Compacted):
                self.log.failure("etcd mirror failed", failure, event="etcd.mirror_failed")
            self._retry = self._clock.callLater(RESYNC_DELAY, self._list)
        self.log.warn(
            "etcd mirror lost its watch ({reason}); discovery serves what it has",
            event="etcd.mirror_lost",
            reason=str(failure.value),
        )
        return None

    def _resume(self, revision: int) -> None:
        self._retry = None
        self._watch = self._gateway.watch(self._root, _prefix_end(self._root), revision, self._events)
        self._watch.created.addCallback(self._current)
        self._watch.done.addErrback(self._mirror_lost)

    def _events(self, revision: int, events: list[Event]) -> None:
        self._current()
        for event in events:
            key = _key_of(self._root, event.kv.key)
            if key is None:
                continue
            old = self._services.get(key[0], {}).get(key[1])
            if event.kind == "delete":
                if old is not None:
                    self._drop(key)
                    self.feed.record("evicted", old.instance, event.kv.mod_revision)
                continue
            new = _decode(event.kv)
            if new is None:  # marked gone: a deregistration
                if old is not None:
                    self._drop(key)
                    self.feed.record("deregistered", old.instance, event.kv.mod_revision)
                continue
            self._keep(new)
            kind = "registered" if old is None else change_kind(old.instance, new.instance)
            if kind is None:
                self.feed.observe(event.kv.mod_revision)
            else:
                self.feed.record(kind, new.instance, event.kv.mod_revision)
        self.feed.observe(revision)
        self._wake_writers()

    def _caught_up(self, revision: int) -> Deferred:
        """Fires once the mirror has applied ``revision``, or after `CATCH_UP` seconds."""
        if self.feed.revision >= revision:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._catching_up.append((revision, waiter))
        self._clock.callLater(CATCH_UP, lambda: waiter.called or waiter.callback(None))
        return waiter

    def _wake_writers(self) -> None:
        waiting, self._catching_up = self._catching_up, []
        for revision, waiter in waiting:
            if waiter.called:
                continue
            if revision <= self.feed.revision:
                waiter.callback(None)
            else:
                self._catching_up.append((revision, waiter))

    def _replace_all(
        self, fresh: dict[tuple[str, str], LeasedRegistration], revision: int, announce: bool
    ) -> None:
        """Take a new listing; after a lost watch, announce what changed meanwhile."""
        old = {r.key: r for held in self._services.values() for r in held.values()}
        for key, record in old.items():
            if key not in fresh:
                self._drop(key)
                if announce:
                    self.feed.record("evicted", record.instance, revision)
        for key, record in fresh.items():
            before = old.get(key)
            self._keep(record)
            if announce and (before is None or before.revision != record.revision):
                kind = "registered" if before is None else change_kind(before.instance, record.instance)
                if kind is not None:
                    self.feed.record(kind, record.instance, revision)

    def _keep(self, record: LeasedRegistration) -> None:
        service, instance_id = record.key
        self._services.setdefault(service, {})[instance_id] = record
        self._versions[service] = self._versions.get(service, 0) + 1

    def _drop(self, key: tuple[str, str]) -> None:
        service, instance_id = key
        held = self._services.get(service, {})
        if held.pop(instance_id, None) is not None:
            self._versions[service] = self._versions.get(service, 0) + 1
            if not held:
                del self._services[service]

    # IStore: reads for writes go to etcd; discovery reads the mirror.

    def get(self, service: str, instance_id: str, now: float) -> Deferred:
        async def get() -> LeasedRegistration | None:
            _, kvs = await self._etcd(self._gateway.range(self._key(service, instance_id)))
            return _decode(kvs[0]) if kvs else None

        return Deferred.fromCoroutine(get())

    def cached(self, service: str, instance_id: str, now: float) -> LeasedRegistration | None:
        # The mirror's copy, while its watch is current (milliseconds behind
        # etcd). Its lease may have ended in etcd: renewing it then fails.
        if self._lost_at is not None or not self.ready.called:
            return None
        return self._services.get(service, {}).get(instance_id)

    def create(self, registration: Registration, now: float) -> Deferred:
        async def create() -> LeasedRegistration:
            key = self._key(*registration.key)
            lease, _ = await self._etcd(self._gateway.lease_grant(registration.instance.ttl))
            result = await self._etcd(
                self._gateway.txn(
                    [Compare(key, "create", "equal", 0)],
                    [Put(key, _encode(registration), lease)],
                )
            )
            if not result.succeeded:
                # The gateway may have sent the txn twice (a time-out, then
                # another endpoint): if the key holds our own record, we won.
                _, kvs = await self._etcd(self._gateway.range(key))
                held = _decode(kvs[0]) if kvs else None
                if held is None or held.credentials.token_hash != registration.credentials.token_hash:
                    self._revoke(lease)
                    service, instance_id = registration.key
                    raise InstanceExists(
                        f"instance {instance_id!r} of {service!r} is already registered",
                        {"id": instance_id},
                    )
                result = TxnResult(True, held.revision)
            await self._caught_up(result.revision)
            return LeasedRegistration(
                registration.instance, registration.credentials, result.revision, lease
            )

        return Deferred.fromCoroutine(create())

    def replace(self, current: Registration, new: Registration) -> Deferred:
        async def replace() -> LeasedRegistration:
            assert isinstance(current, LeasedRegistration)
            key = self._key(*current.key)
            lease = current.lease
            if new.instance.ttl != current.instance.ttl:
                # etcd cannot change a lease's TTL: move the key to a new lease.
                lease, _ = await self._etcd(self._gateway.lease_grant(new.instance.ttl))
            result = await self._etcd(
                self._gateway.txn(
                    [Compare(key, "mod", "equal", current.revision)],
                    [Put(key, _encode(new), lease)],
                )
            )
            if not result.succeeded:
                if lease != current.lease:
                    self._revoke(lease)
                raise Conflict(current.key)
            if lease != current.lease:
                self._revoke(current.lease)
            elif new.instance.expires_at != current.instance.expires_at:
                await self._etcd(self._gateway.lease_keepalive(lease))
            await self._caught_up(result.revision)
            return LeasedRegistration(new.instance, new.credentials, result.revision, lease)

        return Deferred.fromCoroutine(replace())

    def renew(self, current: Registration, now: float) -> Deferred:
        async def renew() -> Instance:
            assert isinstance(current, LeasedRegistration)
            ttl = await self._etcd(self._gateway.lease_keepalive(current.lease))
            if ttl <= 0:
                raise Conflict(current.key)  # the lease ended: so did the key
            renewed = current.instance.renewed(now)
            # What this node shows of the lease; other nodes learn it from writes.
            held = self._services.get(current.key[0], {}).get(current.key[1])
            if held is not None and held.revision == current.revision:
                self._keep(attrs.evolve(held, instance=renewed))
            return renewed

        return Deferred.fromCoroutine(renew())

    def delete(self, current: Registration) -> Deferred:
        async def delete() -> None:
            assert isinstance(current, LeasedRegistration)
            key = self._key(*current.key)
            result = await self._etcd(
                self._gateway.txn(
                    [Compare(key, "mod", "equal", current.revision)],
                    [Put(key, _encode(current, gone=True), current.lease)],
                )
            )
            if not result.succeeded:
                raise Conflict(current.key)
            await self._caught_up(result.revision)
            # Revoking the lease deletes the key; if that fails, the lease ends
            # it anyway, and the record already reads as gone.
            self._revoke(current.lease)

        return Deferred.fromCoroutine(delete())

    def services(self, now: float) -> Deferred:
        return succeed([(name, len(held)) for name, held in sorted(self._services.items())])

    def instances(self, service: str, now: float) -> Deferred:
        held = self._services.get(service, {})
        return succeed([held[i].instance for i in sorted(held)])

    def version(self, service: str) -> int:
        return self._versions.get(service, 0)

    # Helpers.

    def _key(self, service: str, instance_id: str) -> bytes:
        return self._root + f"{service}/{instance_id}".encode("utf-8")

    async def _etcd(self, call: Deferred) -> Any:
        try:
            return await call
        except EtcdUnavailable as e:
            raise BackendUnavailable(
                "the registry's etcd cluster is unavailable; try again", {"reason": e.reason}
            ) from None

    def _revoke(self, lease: int) -> None:
        revoked = self._gateway.lease_revoke(lease)
        revoked.addErrback(
            lambda f: self.log.warn(
                "could not revoke lease {lease}: {reason}; it will expire",
                event="etcd.revoke_failed",
                lease=lease,
                reason=str(f.value),
            )
        )


def _prefix_end(prefix: bytes) -> bytes:
    """The end of etcd's range over every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _key_of(root: bytes, key: bytes) -> tuple[str, str] | None:
    service, sep, instance_id = key[len(root):].decode("utf-8", "replace").partition("/")
    return (service, instance_id) if sep else None


def _encode(registration: Registration, gone: bool = False) -> bytes:
    instance, credentials = registration.instance, registration.credentials
    record: dict[str, Any] = {
        "service": instance.service,
        "id": instance.id,
        "host": instance.host,
        "port": instance.port,
        "status": instance.status,
        "metadata": dict(instance.metadata),
        "tags": list(instance.tags),
        "ttl": instance.ttl,
        "registered_at": instance.registered_at,
        "last_heartbeat_at": instance.last_heartbeat_at,
        "expires_at": instance.expires_at,
        "token_hash": credentials.token_hash.hex(),
        "token_expires_at": credentials.expires_at,
        "registrant": credentials.registrant,
    }
    if gone:
        record["gone"] = True
    return json.dumps(record, separators=(",", ":")).encode("utf-8")


def _decode(kv: KeyValue) -> LeasedRegistration | None:
    """The registration a key holds; None if it is marked gone."""
    record = json.loads(kv.value)
    if record.get("gone"):
        return None
    instance = Instance(
        service=record["service"],
        id=record["id"],
        host=record["host"],
        port=record["port"],
        status=record["status"],
        metadata=shared_metadata(record["metadata"]),
        tags=shared_tags(tuple(record["tags"])),
        ttl=record["ttl"],
        registered_at=record["registered_at"],
        last_heartbeat_at=record["last_heartbeat_at"],
        expires_at=record["expires_at"],
    )
    credentials = Credentials(
        bytes.fromhex(record["token_hash"]), record["token_expires_at"], record["registrant"]
    )
    return LeasedRegistration(instance, credentials, kv.mod_revision, kv.lease)
