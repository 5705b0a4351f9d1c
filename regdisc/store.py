"""Where registrations live: the store interface and its in-memory implementation."""

from __future__ import annotations

import heapq

import attrs

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Attribute, Interface, implementer

from .errors import Conflict, InstanceExists
from .feed import ChangeFeed
from .model import Instance, Registration, change_kind


class IStore(Interface):
    """Registrations keyed by (service, id); every operation returns a Deferred.

    A registration whose lease has ended (``now >= expires_at``) is gone for
    every operation, whether or not it has been evicted yet. Writes name the
    registration they replace and fail with `Conflict` if it has changed since
    it was read, so a backend shared by several nodes can refuse lost updates.
    Every write advances the revision of the store's `ChangeFeed`, and each
    change that discovery can see is recorded there.
    """

    feed = Attribute("The `ChangeFeed` of this store's revisions and visible changes.")
    ready = Attribute("A Deferred that fires once the store can answer (has loaded its state).")

    def mirror_age() -> float | None:
        """Seconds since a mirrored store last heard from its backend; None when not mirrored."""

    def get(service: str, instance_id: str, now: float) -> Deferred:
        """The live `Registration`, or None."""

    def cached(service: str, instance_id: str, now: float) -> Registration | None:
        """The registration as this node holds it, at once, without asking a backend.

        None when the node cannot vouch for it. A store shared by several nodes
        may answer a copy that trails the backend by its replication delay (and
        whose lease may have ended there): it serves to recognise the common
        case cheaply, and a write based on it fails with `Conflict` if it was
        out of date.
        """

    def create(registration: Registration, now: float) -> Deferred:
        """Add a registration and fire with it as stored (with its revision).

        Fails with `InstanceExists` if a live one holds that key.
        """

    def replace(current: Registration, new: Registration) -> Deferred:
        """Put ``new`` in the place of ``current``; fire with ``new`` as stored."""

    def renew(current: Registration, now: float) -> Deferred:
        """Renew the lease of ``current`` for a full TTL; fire with the `Instance`.

        A renewal is not a change: it keeps the revision.
        """

    def delete(current: Registration) -> Deferred:
        """Remove ``current``; fire with None."""

    def services(now: float) -> Deferred:
        """A sorted list of (service name, live instance count), counts above 0."""

    def instances(service: str, now: float) -> Deferred:
        """The live `Instance`s of one service, sorted by id."""

    def version(service: str) -> int:
        """A number that changes whenever anything held for ``service`` changes,
        renewals included; answered from memory, to tell when a cached answer is stale."""


@implementer(IStore)
class MemoryStore:
    """Registrations in a dictionary, with lease deadlines in a heap.

    All operations complete at once, so their Deferreds have already fired.
    """

    def __init__(self, feed: ChangeFeed | None = None) -> None:
        self.feed = feed if feed is not None else ChangeFeed()
        self.ready: Deferred = succeed(None)
        self._services: dict[str, dict[str, Registration]] = {}
        self._count = 0
        self._versions: dict[str, int] = {}
        # (deadline, service, id, revision): each write adds an entry for the
        # registration it stores, which is live while the revision is still
        # the registration's; a renewal keeps the revision, and adds nothing.
        self._deadlines: list[tuple[float, str, str, int]] = []

    def version(self, service: str) -> int:
        return self._versions.get(service, 0)

    def mirror_age(self) -> None:
        return None

    def __len__(self) -> int:
        """How many registrations are held, evicted or not yet."""
        return self._count

    def _lookup(self, service: str, instance_id: str) -> Registration | None:
        return self._services.get(service, {}).get(instance_id)

    def _live(self, service: str, instance_id: str, now: float) -> Registration | None:
        found = self._lookup(service, instance_id)
        return found if found is not None and found.instance.is_live(now) else None

    def get(self, service: str, instance_id: str, now: float) -> Deferred:
        return succeed(self._live(service, instance_id, now))

    def cached(self, service: str, instance_id: str, now: float) -> Registration | None:
        # This node holds the whole registry: its copy is the registration.
        return self._live(service, instance_id, now)

    def create(self, registration: Registration, now: float) -> Deferred:
        service, instance_id = registration.key
        existing = self._lookup(service, instance_id)
        if existing is not None and existing.instance.is_live(now):
            return fail(InstanceExists(f"instance {instance_id!r} of {service!r} is already registered"))
        stored = self._put(registration)
        self.feed.record("registered", stored.instance, stored.revision)
        return succeed(stored)

    def replace(self, current: Registration, new: Registration) -> Deferred:
        if current.key != new.key or not self._holds(current):
            return fail(Conflict(current.key))
        stored = self._put(new)
        kind = change_kind(current.instance, stored.instance)
        if kind is not None:
            self.feed.record(kind, stored.instance, stored.revision)
        return succeed(stored)

    def renew(self, current: Registration, now: float) -> Deferred:
        if not self._holds(current):
            return fail(Conflict(current.key))
        renewed = current.instance.renewed(now)
        # Same revision: the heap entry stays, and is put back at the new end
        # when it comes due.
        self._store(Registration(renewed, current.credentials, current.revision))
        return succeed(renewed)

    def delete(self, current: Registration) -> Deferred:
        if not self._holds(current):
            return fail(Conflict(current.key))
        self._remove(*current.key)
        self.feed.record("deregistered", current.instance)
        return succeed(None)

    def services(self, now: float) -> Deferred:
        counts = []
        for name in sorted(self._services):
            live = sum(1 for r in self._services[name].values() if r.instance.is_live(now))
            if live:
                counts.append((name, live))
        return succeed(counts)

    def instances(self, service: str, now: float) -> Deferred:
        held = self._services.get(service, {})
        live = [r.instance for r in held.values() if r.instance.is_live(now)]
        live.sort(key=lambda instance: instance.id)
        return succeed(live)

    def evict_expired(self, now: float, limit: int) -> list[Instance]:
        """Remove the registrations whose lease ended by ``now``, looking at ``limit``
        deadlines at most; `due` then says whether more are waiting.

        Each registration has one live deadline in the heap. A renewal leaves it
        be; when it comes due, a lease that was renewed meanwhile is simply put
        back at its new end. So the work follows the deadlines that pass (about one
        per registration per TTL), not the renewals nor the registrations held.
        Returns the evicted instances, earliest deadline first.
        """
        evicted: list[Instance] = []
        deadlines = self._deadlines
        for _ in range(limit):
            if not deadlines or deadlines[0][0] > now:
                break
            _, service, instance_id, revision = heapq.heappop(deadlines)
            found = self._lookup(service, instance_id)
            if found is None or found.revision != revision:
                continue  # left behind by a deregistration or a later write
            if found.instance.is_live(now):
                self._schedule(found)  # renewed since: due again at its new end
                continue
            self._remove(service, instance_id)
            self.feed.record("evicted", found.instance)
            evicted.append(found.instance)
        return evicted

    def due(self, now: float) -> bool:
        """Whether a deadline has passed that `evict_expired` has not looked at yet."""
        return bool(self._deadlines) and self._deadlines[0][0] <= now

    def _holds(self, registration: Registration) -> bool:
        # Revisions name writes; a renewal keeps its revision, as it changes
        # nothing but the lease.
        found = self._lookup(*registration.key)
        return found is not None and found.revision == registration.revision

    def _put(self, registration: Registration) -> Registration:
        """Store a write: a new revision, and its deadline in the heap."""
        stored = attrs.evolve(registration, revision=self.feed.advance())
        self._store(stored)
        self._schedule(stored)
        self._compact()
        return stored

    def _store(self, registration: Registration) -> None:
        instance = registration.instance
        held = self._services.setdefault(instance.service, {})
        if instance.id not in held:
            self._count += 1
        held[instance.id] = registration
        self._versions[instance.service] = self._versions.get(instance.service, 0) + 1

    def _schedule(self, registration: Registration) -> None:
        heapq.heappush(self._deadlines, _deadline(registration))

    def _remove(self, service: str, instance_id: str) -> None:
        held = self._services[service]
        del held[instance_id]  # its heap entry is dropped when it comes due
        self._versions[service] = self._versions.get(service, 0) + 1
        self._count -= 1
        if not held:
            del self._services[service]

    def _compact(self) -> None:
        # Each write leaves the entry of the one before it in the heap until it
        # comes due; rebuilding once they outnumber the live ones keeps memory
        # bounded at an amortised O(1) cost.
        if len(self._deadlines) > 2 * self._count + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        """Make the heap anew from the live entries alone."""
        self._deadlines = [
            _deadline(registration)
            for held in self._services.values()
            for registration in held.values()
        ]
        heapq.heapify(self._deadlines)


def _deadline(registration: Registration) -> tuple[float, str, str, int]:
    """The heap entry of a registration: when its lease ends, its key, its revision."""
    instance = registration.instance
    return (instance.expires_at, instance.service, instance.id, registration.revision)
