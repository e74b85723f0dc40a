"""Typed errors that cross process boundaries (Ray calls) and map to gRPC status codes.

A :class:`RequestError` is about one request (bad input, unknown adapter, a failed KV
transfer): the worker stays healthy. :class:`WorkerUnavailable` means the worker itself is
gone or broken; the router stops using it. The router maps ``grpc_code`` to a status.
"""

from __future__ import annotations


class PreftError(Exception):
    grpc_code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # survive pickling across Ray with subclass-specific args
        return (_rebuild, (type(self), self.__dict__))


def _rebuild(cls, state):
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message", ""))
    err.__dict__.update(state)
    return err


class RequestError(PreftError):
    """One request cannot be served as asked; the worker is fine."""


class InvalidRequest(RequestError):
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class AdapterNotFound(RequestError):
    grpc_code = "NOT_FOUND"

    def __init__(self, name: str) -> None:
        # The name is the caller's input: shown truncated, or a long one would push the
        # status message past gRPC's 8 KiB metadata limit (RESOURCE_EXHAUSTED, not NOT_FOUND).
        shown = repr(name[:64]) + ("..." if len(name) > 64 else "")
        super().__init__(f"adapter {shown} is not registered; list adapters or register "
                         "it before generating with it")
        self.name = name


class InvalidAdapter(RequestError):
    grpc_code = "INVALID_ARGUMENT"


class AdapterMismatch(InvalidAdapter):
    """A registered adapter does not fit the model of the worker that would load it (the
    registry was made on another base model): its requests fail, never generate."""
    grpc_code = "FAILED_PRECONDITION"


class AdapterStoreError(RequestError):
    """The adapter store refused a call (missing bucket, refused credentials, a missing
    object): the adapter's requests fail, the worker and its other adapters are fine."""
    grpc_code = "FAILED_PRECONDITION"


class StoreUnreachable(AdapterStoreError):
    """The adapter store did not answer (endpoint down, DNS, network): may pass; retry."""
    grpc_code = "UNAVAILABLE"


class KVTransferFailed(RequestError):
    grpc_code = "UNAVAILABLE"


class WorkerUnavailable(PreftError):
    grpc_code = "UNAVAILABLE"


class Unauthenticated(RequestError):
    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(RequestError):
    grpc_code = "PERMISSION_DENIED"


class Overloaded(RequestError):
    grpc_code = "RESOURCE_EXHAUSTED"


class MessageTooLarge(RequestError):
    """A call or an answer over the worker plane's size limit: that call fails, no other."""
    grpc_code = "RESOURCE_EXHAUSTED"


class ShuttingDown(RequestError):
    """The router is draining or stopping (SIGINT/SIGTERM): new requests are refused, and
    streams still running when the drain's grace period ends are ended with this."""
    grpc_code = "UNAVAILABLE"
