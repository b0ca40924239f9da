"""The OpenAPI 3.1 document of the public routes, served at `GET /openapi.json`.

Written by hand from the contract and kept honest by tests/test_openapi.py: every route of the
app is here, every error code a route can raise is listed on it, the document validates, and a
schemathesis run against a live gateway finds no 5xx and no answer outside the schema.
"""

from __future__ import annotations

import json
from typing import Any

_SESSION_ID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
_NO_BODY_CODES = ["invalid_json", "invalid_body"]
_TICKET = (
    "A start ticket from the site's backend: v1.<exp>.<base64url HMAC-SHA256 of"
    ' "v1\\n<exp>\\n<user_ref>\\n<phone>" with a GATEWAY_TICKET_SECRET>, for one start before <exp>.'
)

# Error codes each route can answer, by status; the test checks them against the source.
ERRORS: dict[tuple[str, str], dict[int, list[str]]] = {
    ("post", "/v1/sessions"): {
        400: [
            *_NO_BODY_CODES,
            "unknown_field",
            "invalid_provider",
            "invalid_phone",
            "invalid_user_ref",
            "invalid_idempotency_key",
        ],
        401: ["unauthorized"],
        409: ["provider_disabled", "idempotency_key_reused"],
        413: ["body_too_large"],
        415: ["unsupported_media_type"],
        502: ["provider_rejected", "provider_unavailable"],
        503: ["database_unavailable", "storage_full"],
    },
    ("get", "/v1/sessions/{session_id}"): {
        400: ["invalid_wait"],
        404: ["session_not_found"],
        503: ["database_unavailable"],
    },
    ("get", "/v1/sessions/{session_id}/events"): {
        404: ["session_not_found"],
        503: ["database_unavailable"],
    },
    ("post", "/v1/callbacks/truecaller"): {
        400: [
            *_NO_BODY_CODES,
            "invalid_callback",
            "missing_request_id",
            "invalid_request_id",
            "missing_endpoint",
            "invalid_endpoint",
            "invalid_access_token",
            "invalid_status",
            "token_already_used",
        ],
        404: ["session_not_found"],
        413: ["body_too_large"],
        415: ["unsupported_media_type"],
        503: ["shutting_down", "database_unavailable"],
    },
    ("post", "/v1/callbacks/veriphone"): {
        400: [*_NO_BODY_CODES, "unknown_field", "invalid_session_uuid", "invalid_phone"],
        404: ["session_not_found"],
        413: ["body_too_large"],
        415: ["unsupported_media_type"],
        502: ["provider_rejected", "provider_unavailable"],
        503: ["database_unavailable"],
    },
}

# What the abuse limits ([limits], gateway/limits.py) add, by route: a body too slow (408), a
# rate or a per-address cap (429, with Retry-After), a full gateway (503, with Retry-After).
LIMIT_ERRORS: dict[tuple[str, str], dict[int, list[str]]] = {
    ("post", "/v1/sessions"): {408: ["body_timeout"], 429: ["rate_limited"], 503: ["too_many_pending"]},
    ("get", "/v1/sessions/{session_id}"): {429: ["rate_limited"], 503: ["server_busy"]},
    ("get", "/v1/sessions/{session_id}/events"): {429: ["rate_limited"], 503: ["server_busy"]},
    ("post", "/v1/callbacks/truecaller"): {408: ["body_timeout"], 429: ["rate_limited"]},
    ("post", "/v1/callbacks/veriphone"): {408: ["body_timeout"], 429: ["rate_limited"]},
}
for _route, _statuses in LIMIT_ERRORS.items():
    for _status, _codes in _statuses.items():
        ERRORS[_route][_status] = [*ERRORS[_route].get(_status, []), *_codes]
# Any request, before it reaches a route: a request line and headers over limits.max_header_bytes,
# a query string over limits.max_query_bytes.
HEAD_ERRORS = {414: ["query_too_long"], 431: ["headers_too_large"]}


def _error(codes: list[str]) -> dict[str, Any]:
    return {
        "description": ", ".join(codes),
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string", "enum": codes}, "message": {"type": "string"}},
                        }
                    },
                }
            }
        },
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _redirect(description: str) -> dict[str, Any]:
    return {"description": description, "headers": {"Location": {"schema": {"type": "string"}}}}


_NULLABLE_STRING = {"type": ["string", "null"]}
OUTCOME = {
    "type": "object",
    "required": ["status", "reason", "provider", "completed_at"],
    "properties": {
        "status": {"enum": ["verified", "rejected", "failed", "expired"]},
        "reason": _NULLABLE_STRING,
        "provider": {"enum": ["truecaller", "veriphone"]},
        "phone": _NULLABLE_STRING,
        "user_ref": _NULLABLE_STRING,
        "profile": {"type": ["object", "null"]},
        "veriphone": {"type": ["object", "null"]},
        "completed_at": {"type": "string"},
    },
}
SNAPSHOT = {
    "type": "object",
    "required": ["id", "provider", "status", "expires_at", "updated_at", "outcome"],
    "properties": {
        "id": {"type": "string"},
        "provider": {"enum": ["truecaller", "veriphone"]},
        "status": {"enum": ["pending", "verified", "rejected", "failed", "expired"]},
        "expires_at": {"type": "string"},
        "updated_at": {"type": "string"},
        "outcome": {"oneOf": [{"type": "null"}, OUTCOME]},
    },
}
CREATED = {
    "type": "object",
    "required": ["id", "provider", "status", "expires_at", "stream_url", "status_url"],
    "properties": {
        "id": {"type": "string"},
        "provider": {"enum": ["truecaller", "veriphone"]},
        "status": {"const": "pending"},
        "expires_at": {"type": "string"},
        "stream_url": {"type": "string"},
        "status_url": {"type": "string"},
        "truecaller": {
            "type": "object",
            "properties": {"request_nonce": {"type": "string"}, "deeplink": {"type": "string"}},
        },
        "veriphone": {
            "type": "object",
            "properties": {"session_uuid": {"type": "string"}, "redirect_url": {"type": "string"}},
        },
    },
}


def _responses(method: str, path: str, ok: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = dict(ok)
    for status, codes in ERRORS.get((method, path), {}).items():
        out[str(status)] = _error(codes)
    return out


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/sessions": {
            "post": {
                "summary": "Start a verification",
                # Anonymous unless [auth] require = true; a credential that is sent is always checked.
                "security": [{}, {"apiKey": []}, {"startTicket": []}],
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}
                ],
                "requestBody": json_body(
                    {
                        "type": "object",
                        "required": ["provider"],
                        "additionalProperties": False,
                        "properties": {
                            "provider": {"enum": ["truecaller", "veriphone"]},
                            "phone": {"type": "string", "description": "E.164"},
                            "user_ref": {"type": "string", "maxLength": 128},
                        },
                    }
                ),
                "responses": _responses("post", "/v1/sessions", {"201": _json("the new session", CREATED)}),
            }
        },
        "/v1/sessions/{session_id}": {
            "get": {
                "summary": "Read a session; with wait, hold until it ends",
                "parameters": [
                    _SESSION_ID,
                    {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0}},
                ],
                "responses": _responses("get", "/v1/sessions/{session_id}", {"200": _json("the snapshot", SNAPSHOT)}),
            }
        },
        "/v1/sessions/{session_id}/events": {
            "get": {
                "summary": "Server-Sent Events: status, progress, outcome, then the end",
                "parameters": [_SESSION_ID, {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
                "responses": _responses(
                    "get",
                    "/v1/sessions/{session_id}/events",
                    {
                        "200": {
                            "description": "the stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "204": {"description": "Last-Event-ID is the outcome's: nothing more to send"},
                    },
                ),
            }
        },
        "/v1/callbacks/truecaller": {
            "post": {
                "summary": "Truecaller's server callback (token or status)",
                "requestBody": json_body({"type": "object"}),
                "responses": _responses(
                    "post",
                    "/v1/callbacks/truecaller",
                    {
                        "200": _json(
                            "taken", {"type": "object", "properties": {"status": {"enum": ["accepted", "ignored"]}}}
                        )
                    },
                ),
            }
        },
        "/v1/callbacks/veriphone": {
            "get": {
                "summary": "Veriph.One's Result Endpoint (the user's browser): always a redirect",
                "parameters": [{"name": "sessionUuid", "in": "query", "schema": {"type": "string"}}],
                "responses": {"307": _redirect("to success_url or failure_url, with status and reason")},
            },
            "post": {
                "summary": "The mobile variant: the outcome as JSON",
                "requestBody": json_body(
                    {"type": "object", "required": ["sessionUuid"], "properties": {"sessionUuid": {"type": "string"}}}
                ),
                "responses": _responses("post", "/v1/callbacks/veriphone", {"200": _json("the outcome", OUTCOME)}),
            },
        },
        "/v1/veriphone/start": {
            "get": {
                "summary": "Start a Veriph.One verification from a link: a redirect to the provider",
                "parameters": [
                    {"name": "phone", "in": "query", "schema": {"type": "string"}},
                    {"name": "user_ref", "in": "query", "schema": {"type": "string"}},
                    {"name": "ticket", "in": "query", "schema": {"type": "string"}, "description": _TICKET},
                ],
                "responses": {"307": _redirect("to Veriph.One, or to failure_url with the reason")},
            }
        },
        "/v1/veriphone/done": {
            "get": {
                "summary": "A plain landing page when success_url / failure_url are not configured",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "reason", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
        "/healthz": {"get": {"summary": "The process is up", "responses": {"200": _json("ok", {"type": "object"})}}},
        "/readyz": {
            "get": {
                "summary": "The database answers and the gateway is not stopping",
                "responses": {"200": _json("ready", {"type": "object"}), "503": _json("not ready", {"type": "object"})},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format",
                "responses": {
                    "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})}}
        },
    }
    for item in paths.values():
        for operation in item.values():
            for status, codes in HEAD_ERRORS.items():
                operation["responses"].setdefault(str(status), _error(codes))
    return {
        "openapi": "3.1.0",
        "info": {"title": "Phone-verification gateway", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <key>, a key of GATEWAY_API_KEYS (a site's backend)",
                },
                "startTicket": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "Authorization: Ticket <ticket>. " + _TICKET,
                },
            }
        },
    }


def encoded() -> bytes:
    return json.dumps(document(), separators=(",", ":")).encode()
