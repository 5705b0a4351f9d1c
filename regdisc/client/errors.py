"""What can go wrong when talking to the registry, as typed exceptions."""

from __future__ import annotations

from typing import Any, Mapping


class RegistryError(Exception):
    """The registry answered with an error: its HTTP status, code and message."""

    def __init__(
        self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})


class InvalidRequest(RegistryError):
    """400: the request was malformed; ``details`` names each bad field."""


class Unauthorized(RegistryError):
    """401 unauthorized: the token is missing or wrong for this instance."""


class TokenExpired(RegistryError):
    """401 token_expired: the token is past its lifetime."""


class InstanceNotFound(RegistryError):
    """404 instance_not_found: unknown or expired; register again."""


class InstanceExists(RegistryError):
    """409 instance_exists: the id is live and held by another client."""


_BY_CODE: dict[str, type[RegistryError]] = {
    "invalid_request": InvalidRequest,
    "invalid_json": InvalidRequest,
    "unauthorized": Unauthorized,
    "token_expired": TokenExpired,
    "instance_not_found": InstanceNotFound,
    "instance_exists": InstanceExists,
}


def error_from_answer(status: int, body: object) -> RegistryError:
    """The exception for an error answer, whatever its body holds."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return RegistryError(status, "bad_answer", f"HTTP {status} without an error body")
    code = str(error.get("code", "unknown"))
    details = error.get("details")
    return _BY_CODE.get(code, RegistryError)(
        status,
        code,
        str(error.get("message", "")),
        details if isinstance(details, dict) else None,
    )


class RegistryUnavailable(Exception):
    """No answer from the registry: the connection failed or timed out."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class RequestTimedOut(RegistryUnavailable):
    """The registry did not answer in time."""


class TLSRefused(RegistryUnavailable):
    """The TLS handshake failed; ``side`` says who refused whom.

    ``registry`` means the registry refused our certificate; ``client`` means
    we refused the registry's certificate (unknown CA, wrong host name,
    expired).
    """

    def __init__(self, url: str, reason: str, side: str) -> None:
        super().__init__(url, reason)
        self.side = side
