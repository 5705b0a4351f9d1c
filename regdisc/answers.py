"""Discovery answers rendered once and reused while nothing they show has changed."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Hashable

import attrs


@attrs.frozen
class Rendered:
    """A serialized ``{"data": ...}`` body, its strong ETag, and when it stops being true.

    ``version`` is the store's version of the service when the body was made;
    ``valid_until`` is the earliest lease end among the instances it shows.
    """

    body: bytes
    etag: str
    version: int
    valid_until: float


_COMPACT = json.JSONEncoder(separators=(",", ":"))


def json_body(value: Any) -> bytes:
    """``value`` as compact JSON, for a response body."""
    # One encoder for all: json.dumps makes a new one per call when given separators.
    return _COMPACT.encode(value).encode("utf-8")


def render(data: Any, version: int, valid_until: float) -> Rendered:
    """Serialize ``data`` as an answer body and tag it with a hash of itself."""
    body = json_body({"data": data})
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    return Rendered(body, etag, version, valid_until)


class AnswerCache:
    """The last answer per key (a service and its filters), at most ``size`` keys.

    An answer is reused only while the service's version is the one it was
    made at and no lease it shows has ended: so a thousand watchers woken by
    one change share one rendering, and no reader ever sees an expired instance.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._answers: OrderedDict[Hashable, Rendered] = OrderedDict()

    def get(self, key: Hashable, version: int, now: float) -> Rendered | None:
        found = self._answers.get(key)
        if found is None or found.version != version or now >= found.valid_until:
            return None
        self._answers.move_to_end(key)
        return found

    def put(self, key: Hashable, rendered: Rendered) -> None:
        self._answers[key] = rendered
        self._answers.move_to_end(key)
        while len(self._answers) > self._size:
            self._answers.popitem(last=False)
