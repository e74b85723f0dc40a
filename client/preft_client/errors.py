"""Typed client-side errors, one per gRPC status code the router uses."""

from __future__ import annotations

import grpc


class PreftClientError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``message`` the server's words."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(PreftClientError): ...
class NotFound(PreftClientError): ...
class Unavailable(PreftClientError): ...
class ResourceExhausted(PreftClientError): ...
class DeadlineExceeded(PreftClientError): ...
class Unauthenticated(PreftClientError): ...
class PermissionDenied(PreftClientError): ...
class FailedPrecondition(PreftClientError):
    """The cluster cannot serve this as it stands (e.g. an all-token adapter and no
    colocated worker); retrying will not help until an operator changes the cluster."""


class IncompleteStream(Unavailable):
    """A ``Generate`` stream ended without its final message (finish reason, usage): the
    router broke the protocol. An ``Unavailable``, so callers that retry those still do."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def from_rpc_error(e: grpc.RpcError) -> PreftClientError:
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return _BY_CODE.get(code, PreftClientError)(code, details or "")
