"""Errors the gateway answers with: an OpenAI-style body and an HTTP status.

The SDK raises typed errors carrying the router's gRPC status code; :func:`gateway_error`
maps them (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 500) with a
body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from preft_client import IncompleteStream, PreftClientError

# gRPC status code name -> (HTTP status, OpenAI error type)
_HTTP_BY_CODE: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "CANCELLED": (499, "cancelled_error"),
}
_TYPE_BY_HTTP = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                 500: "internal_error", 503: "service_unavailable_error", 504: "timeout_error"}


class GatewayError(Exception):
    """An error answered with an OpenAI-style error body and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or _TYPE_BY_HTTP.get(status, "internal_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _param_from_message(message: str) -> str | None:
    """The router's messages start with the field ("sampling.max_tokens: must be ...")."""
    head, sep, _ = message.partition(": ")
    if not sep or not head.replace(".", "").replace("_", "").isalnum():
        return None
    return head.removeprefix("sampling.")


def gateway_error(e: PreftClientError) -> GatewayError:
    """Map a typed SDK error (``preft_client.errors``) to its HTTP status and body."""
    if isinstance(e, IncompleteStream):
        return GatewayError(502, "the router's stream ended without a final message",
                            type_="upstream_error")
    status, type_ = _HTTP_BY_CODE.get(e.code.name, (500, "internal_error"))
    param = _param_from_message(e.message) if status == 400 else None
    if status == 404:
        param = "model"
    return GatewayError(status, e.message or e.code.name, param, type_)
