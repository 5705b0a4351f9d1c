"""`EtcdGateway`: etcd v3 through its HTTP/JSON gateway, over treq, never blocking the reactor.

INTERFACE DRAFT: signatures and semantics are fixed; the bodies are being written.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
from twisted.internet.defer import Deferred


class EtcdUnavailable(Exception):
    """No etcd endpoint gave an answer in time (connection failure, time-out,
    no leader / no quorum). ``reason`` says which, for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EtcdError(Exception):
    """etcd answered with an error (bad request, lease not found, compacted...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int  # 0 when none


@attrs.frozen
class Event:
    """One watch event: ``kind`` is ``put`` or ``delete``; ``kv.value`` is empty on delete."""

    kind: str
    kv: KeyValue


@attrs.frozen
class Compare:
    """A txn comparison on one key: ``target`` is ``create``, ``mod``, ``version``
    or ``value``; ``result`` is ``equal``, ``greater``, ``less``, ``not_equal``."""

    key: bytes
    target: str
    result: str
    value: int | bytes


@attrs.frozen
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@attrs.frozen
class Delete:
    key: bytes


@attrs.frozen
class TxnResult:
    succeeded: bool
    revision: int


class Watch:
    """A running watch; ``stop()`` ends it. ``done`` fires when the stream ends:
    with None after stop(), or fails with `EtcdUnavailable` (stream lost) or
    `Compacted` (start revision compacted: list again)."""

    done: Deferred

    def stop(self) -> None: ...


class Compacted(Exception):
    """The watch's start revision is older than etcd's compaction."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"compacted at {compact_revision}")
        self.compact_revision = compact_revision


class EtcdGateway:
    """A client of one etcd cluster at several endpoints (URLs), failing over between them.

    Every call returns a Deferred and is bounded by ``timeout`` seconds per
    endpoint tried. Keys and values are bytes (base64 on the wire).
    """

    def __init__(self, endpoints: Sequence[str], reactor: Any, *, tls: Any = None,
                 timeout: float = 2.0) -> None: ...

    def range(self, key: bytes, range_end: bytes | None = None, *,
              serializable: bool = False) -> Deferred:
        """Fires with (revision, [KeyValue, ...]) for ``key`` or ``[key, range_end)``."""

    def txn(self, compare: Sequence[Compare], success: Sequence[Put | Delete],
            failure: Sequence[Put | Delete] = ()) -> Deferred:
        """Fires with `TxnResult`."""

    def lease_grant(self, ttl: int) -> Deferred:
        """Fires with (lease id, granted ttl)."""

    def lease_keepalive(self, lease: int) -> Deferred:
        """Renews once; fires with the new TTL, or 0 if the lease no longer exists."""

    def lease_revoke(self, lease: int) -> Deferred:
        """Fires with None; a missing lease is not an error."""

    def lease_ttl(self, lease: int) -> Deferred:
        """Fires with the remaining TTL in seconds (-1 if the lease is gone)."""

    def watch(self, key: bytes, range_end: bytes | None, start_revision: int,
              on_events: Callable[[int, list[Event]], None]) -> Watch:
        """Stream changes from ``start_revision``; calls on_events(revision, events)."""

    def close(self) -> Deferred:
        """Close pooled connections and stop watches."""
