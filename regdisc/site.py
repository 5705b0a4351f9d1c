"""The twisted.web site that carries the API: bounded bodies, no access log."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from .api import MAX_BODY

IDLE_TIMEOUT = 300
"""Seconds an idle keep-alive connection is held open."""


class BoundedRequest(Request):
    """A request that keeps at most one byte more of its body than the API accepts.

    twisted.web would otherwise buffer any body whole, to memory or a
    temporary file; the API answers 413 on seeing the extra byte.
    """

    _kept = 0

    def gotLength(self, length: int | None) -> None:
        super().gotLength(None if length is None or length > MAX_BODY else length)

    def handleContentChunk(self, data: bytes) -> None:
        room = MAX_BODY + 1 - self._kept
        if room > 0:
            self._kept += min(room, len(data))
            super().handleContentChunk(data[:room])


class RegistrySite(Site):
    """A `Site` for the API.

    Its access log is off: at thousands of heartbeats a second it would cost
    more than the requests; the API logs every change as a structured event.
    """

    requestFactory = BoundedRequest
    noisy = False
    displayTracebacks = False

    def __init__(self, resource: IResource, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", IDLE_TIMEOUT)
        # The API reads JSON only; parsing form bodies into args is wasted work.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)

    def log(self, request: Request) -> None:
        pass
