"""Instance tokens: made from `secrets`, kept only as hashes, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_BYTES = 32
"""256 bits of randomness per token."""

TOKEN_PREFIX = "rdt_"
"""Marks regdisc tokens, for secret scanners and people; it also keeps a token
from starting with ``-``, which command lines would take for an option."""


def new_token() -> str:
    """A fresh, URL-safe bearer token: the prefix and 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> bytes:
    """The digest a store keeps instead of the token.

    A plain SHA-256 suffices: tokens carry 256 random bits, so there is no
    dictionary to guard against, and a fast hash keeps heartbeats cheap.
    """
    return hashlib.sha256(token.encode("utf-8")).digest()


def token_matches(token: str, token_hash: bytes) -> bool:
    """Whether ``token`` hashes to ``token_hash``, compared in constant time."""
    return hmac.compare_digest(hash_token(token), token_hash)
