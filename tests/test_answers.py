"""Rendered discovery answers and the cache that shares them."""

from __future__ import annotations

import json
import math

from regdisc.answers import AnswerCache, render


def test_render_tags_the_body_with_its_hash() -> None:
    """The ETag is strong and follows the body: equal bodies, equal tags."""
    one, same, other = render({"a": 1}, 1, math.inf), render({"a": 1}, 2, 5), render({"a": 2}, 1, 5)
    assert json.loads(one.body) == {"data": {"a": 1}}
    assert one.etag == same.etag != other.etag
    assert one.etag.startswith('"') and one.etag.endswith('"')


def test_an_answer_is_reused_while_nothing_changed() -> None:
    """The cache answers while the version holds and no shown lease has ended."""
    cache = AnswerCache()
    answer = render([], version=3, valid_until=10.0)
    cache.put("web", answer)
    assert cache.get("web", 3, 9.999) is answer
    assert cache.get("web", 4, 5.0) is None  # something of the service changed
    assert cache.get("web", 3, 10.0) is None  # a lease it shows has ended
    assert cache.get("api", 3, 5.0) is None


def test_the_cache_keeps_the_most_recent_keys() -> None:
    """Past its size, the least recently used answer goes."""
    cache = AnswerCache(size=2)
    for key in ("a", "b"):
        cache.put(key, render(key, 1, math.inf))
    assert cache.get("a", 1, 0) is not None  # a is now the most recent
    cache.put("c", render("c", 1, math.inf))
    assert cache.get("b", 1, 0) is None
    assert cache.get("a", 1, 0) is not None and cache.get("c", 1, 0) is not None
