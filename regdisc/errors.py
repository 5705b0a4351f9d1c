"""The errors the registry answers with, each with its HTTP status and code."""

from __future__ import annotations

from typing import Any, Mapping


class ApiError(Exception):
    """A failure with a place in the API: an HTTP status, a code, a message.

    Messages and details are shown to clients: never put a secret in them.
    """

    status = 500
    code = "internal_error"
    headers: Mapping[str, str] = {}

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details) if details else None

    def to_json(self) -> dict[str, Any]:
        """The ``{"error": ...}`` body of this failure."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class InvalidJSON(ApiError):
    status, code = 400, "invalid_json"


class InvalidRequest(ApiError):
    """A field is missing, of the wrong type or out of range; details name each."""

    status, code = 400, "invalid_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class TokenExpired(ApiError):
    status, code = 401, "token_expired"
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class NotFound(ApiError):
    status, code = 404, "not_found"


class InstanceNotFound(ApiError):
    status, code = 404, "instance_not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class InstanceExists(ApiError):
    status, code = 409, "instance_exists"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class BackendUnavailable(ApiError):
    """The shared backend (etcd) cannot take writes now: no quorum, or out of reach."""

    status, code = 503, "backend_unavailable"
    headers = {"Retry-After": "1"}


class Conflict(Exception):
    """A store refused a write because the record changed since it was read."""
