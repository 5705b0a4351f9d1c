"""A Deferred helper shared by the registry client and the etcd gateway."""

from __future__ import annotations

from typing import Any, Callable, Coroutine

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def cancellable(start: Callable[[list[bool]], Coroutine[Any, Any, Any]]) -> Deferred:
    """Run ``start(cancelled)`` as a Deferred that fails at once when cancelled.

    Cancelling the Deferred appends to ``cancelled`` (so the coroutine knows to
    stop, say, trying further endpoints), cancels what the coroutine awaits,
    and fails with CancelledError at once; the coroutine's late outcome is dropped.
    """
    cancelled: list[bool] = []
    inner = Deferred.fromCoroutine(start(cancelled))

    def cancel(outer: Deferred) -> None:
        cancelled.append(True)
        inner.cancel()

    outer: Deferred = Deferred(cancel)

    def forward(result: Any) -> None:
        if outer.called:  # cancelled already; the late outcome has no taker
            return
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    inner.addBoth(forward)
    return outer
