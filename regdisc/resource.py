"""The API as twisted.web serves it: the Klein app, with the two hottest requests routed by hand.

Heartbeats and plain discovery reads are most of what a registry answers, and
Klein's routing of one request (a werkzeug map bound and matched, an adapter,
four Deferreds) costs about as much as the registry's own work for it. So
`APIResource` recognises exactly those two requests by their path segments and
calls the same `RegistryAPI` handlers directly; every other request, and any
path that is not plain ASCII without percent-escapes, goes to the Klein app,
which stays the definition of every route (tests/test_resource.py asks both
the same requests and compares the answers).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .api import RegistryAPI

Handler = Callable[..., Deferred]


class APIResource(Resource):
    """Serves a `RegistryAPI`: heartbeats and plain reads by hand, the rest through its Klein app."""

    isLeaf = True

    def __init__(self, api: RegistryAPI) -> None:
        super().__init__()
        self._api = api
        self._routed = api.app.resource()

    def render(self, request: IRequest) -> bytes | int:
        hot = self._hot(request)
        if hot is None:
            return self._routed.render(request)
        handler, args = hot
        return self._answer(request, handler, args)

    def _hot(self, request: IRequest) -> tuple[Handler, tuple[str, ...]] | None:
        """The handler and path arguments of a heartbeat or a plain read, else None."""
        path = request.path
        if b"%" in path or not path.isascii():
            return None  # Klein decodes such paths; leave them to it
        # The site found this leaf at the root, so postpath is the whole path.
        segments = request.postpath
        if segments[:2] != [b"registry", b"services"] or not all(segments):
            return None
        method = request.method
        if method == b"PUT" and len(segments) == 6 and segments[3] == b"instances" and segments[5] == b"heartbeat":
            return self._api.heartbeat, (segments[2].decode("ascii"), segments[4].decode("ascii"))
        if method == b"GET" and len(segments) == 4 and segments[3] == b"instances" and not request.args:
            return self._api.instances, (segments[2].decode("ascii"),)
        return None

    def _answer(self, request: IRequest, handler: Handler, args: tuple[str, ...]) -> bytes | int:
        try:
            answering = handler(request, *args)
        except Exception:
            answering = fail()
        outcome: list[Any] = []
        answering.addBoth(outcome.append)
        if outcome:  # answered at once, as over the in-memory store
            return self._body(request, outcome[0])
        ended: list[Any] = []
        request.notifyFinish().addBoth(ended.append)
        request.notifyFinish().addErrback(lambda _: answering.cancel())

        def deliver(_: None) -> None:
            if not ended:  # the client is still there
                request.write(self._body(request, outcome[0]))
                request.finish()

        answering.addCallback(deliver)
        return NOT_DONE_YET

    def _body(self, request: IRequest, outcome: Any) -> bytes:
        if isinstance(outcome, bytes):
            return outcome
        return self._api.failed(request, outcome)
