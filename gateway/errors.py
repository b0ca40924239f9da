"""The gateway's exception tree.

GatewayError                 every error a caller or operator can be told about
├── ConfigError              config file or environment is unusable (startup)
├── StorageError             the database failed (translated where sqlite raises)
└── ApiError                 maps to an HTTP answer: status + stable snake_case code
    ├── BadRequest           400, the caller's request is malformed
    ├── Unauthorized         401, no, a wrong or a used credential (WWW-Authenticate: Bearer)
    ├── NotFound             404
    ├── Conflict             409
    ├── RequestTimeout       408, the request body did not arrive within limits.body_timeout
    ├── PayloadTooLarge      413
    ├── UnsupportedMedia     415
    ├── TooManyRequests      429, an abuse limit (gateway/limits.py); Retry-After says when to retry
    ├── Unavailable          503, stopping or the database is full; the caller may retry
    └── ProviderFailure      502, the provider refused or is unreachable
"""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration cannot be used; the message is one line for the operator."""


class StorageError(GatewayError):
    """The database could not complete an operation."""


class ApiError(GatewayError):
    status_code = 400

    def __init__(self, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})  # sent with the answer, e.g. Retry-After

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    """401: the request carries no credential where one is required, or a wrong or used one."""

    status_code = 401

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, {"www-authenticate": "Bearer"})


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class RequestTimeout(ApiError):
    status_code = 408


class PayloadTooLarge(ApiError):
    status_code = 413


class UnsupportedMedia(ApiError):
    status_code = 415


class TooManyRequests(ApiError):
    status_code = 429


class Unavailable(ApiError):
    """The gateway is stopping (or cannot finish the request now); the caller may retry."""

    status_code = 503


class ProviderFailure(ApiError):
    """The provider answered with an error (provider_rejected) or not at all (provider_unavailable)."""

    status_code = 502
