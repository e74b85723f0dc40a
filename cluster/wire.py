"""The direct channel's wire format: frames, the handshake, and typed messages as JSON.

Shared ground for the hop the first token waits on (step 2 → 3 → 2 of the request path):
the router calls a prefill worker over one persistent TCP connection
(:mod:`router.channel` → :mod:`worker_runtime.channel`) instead of a Ray actor call. This
module holds what both ends agree on, and imports nothing above ``cluster``:

- **frames**: a 4-byte big-endian length, then a UTF-8 JSON object; at most
  :data:`MAX_FRAME` bytes;
- **handshake**: the server sends ``{"nonce"}``, the client answers ``{"mac"}``, an
  HMAC-SHA256 of the nonce under the worker's channel token (which only a caller of the
  worker's Ray actor learns), and the server answers ``{"ok": true}`` or an error;
- **messages**: ``{"id", "op", "body"}`` calls, ``{"id", "cancel": true}``, and
  ``{"id", "result"}`` / ``{"id", "error": {"type", "grpc_code", "message"}}`` answers.
  Bodies are the typed dataclasses of :mod:`cluster.messages` as plain JSON, rebuilt by
  :func:`from_wire`, which checks every field's type (no pickle: a frame is data).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import types
import typing
from typing import Any

from cluster.errors import PreftError

MAX_FRAME = 64 << 20      # bytes: a prompt of a few hundred thousand token ids fits
GRPC_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
              "UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION",
              "DEADLINE_EXCEEDED", "INTERNAL")


class WireError(ValueError):
    """A frame or message that failed its checks (the peer is answered, never trusted)."""


class RemoteError(PreftError):
    """An error the worker answered with: its status code and message, as the Ray path
    would have carried the exception itself."""

    def __init__(self, message: str, grpc_code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.grpc_code = grpc_code if grpc_code in GRPC_CODES else "INTERNAL"


# ---------------------------------------------------------------------- frames
async def read_frame(reader: asyncio.StreamReader) -> dict:
    """One frame's JSON object; ``IncompleteReadError`` when the peer closed."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes; at most {MAX_FRAME}")
    raw = await reader.readexactly(size)
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise WireError(f"frame is not JSON ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise WireError(f"frame holds {type(msg).__name__}, not a JSON object")
    return msg


def frame(msg: dict) -> bytes:
    raw = json.dumps(msg, separators=(",", ":")).encode()
    return len(raw).to_bytes(4, "big") + raw


def handshake_mac(token: str, nonce: str) -> str:
    return hmac.new(token.encode(), f"preft-channel\n{nonce}".encode(),
                    hashlib.sha256).hexdigest()


def mac_ok(token: str, nonce: str, mac: object) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(
        mac.encode(), handshake_mac(token, nonce).encode())


# ---------------------------------------------------------------------- messages
def to_wire(obj: Any) -> Any:
    """A dataclass (nested ones too) as JSON-ready data; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_wire(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_wire(v) for k, v in obj.items()}
    return obj


def from_wire(cls: type, data: Any, path: str = "") -> Any:
    """Rebuild dataclass ``cls`` from :func:`to_wire`'s output, checking each field against
    its annotation (str, int, float, bool, None, ``X | None``, ``tuple[T, ...]``, nested
    dataclasses). Unknown or missing-without-default fields are refused; the dataclass's
    own checks (``__post_init__``) run as usual."""
    if not isinstance(data, dict):
        raise WireError(f"{path or cls.__name__}: expected an object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - names
    if extra:
        raise WireError(f"{path or cls.__name__}: unknown fields {sorted(extra)[:5]}")
    kw = {k: _value(hints[k], v, f"{path}{k}") for k, v in data.items()}
    try:
        return cls(**kw)
    except TypeError as e:   # a required field missing
        raise WireError(f"{path or cls.__name__}: {e}") from None


def _value(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if v is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        if len(inner) != 1:
            raise WireError(f"{path}: unsupported type {tp}")
        return _value(inner[0], v, path)
    if origin is tuple:
        return _tuple(typing.get_args(tp), v, path)
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise WireError(f"{path}: expected an object")
        return v
    if dataclasses.is_dataclass(tp):
        return from_wire(tp, v, f"{path}.")
    if tp is float and type(v) in (int, float):
        return float(v)
    if tp in (str, int, bool) and type(v) is tp:
        return v
    if tp is Any:
        return v
    raise WireError(f"{path}={v!r:.40}: expected {getattr(tp, '__name__', tp)}")


def _tuple(args: tuple, v: Any, path: str) -> tuple:
    """``tuple[T, ...]`` (any length) or ``tuple[A, B]`` (exactly those items)."""
    if not isinstance(v, list):
        raise WireError(f"{path}: expected a list")
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(v)
    elif len(v) != len(args):
        raise WireError(f"{path}: expected {len(args)} items, got {len(v)}")
    return tuple(_value(t, x, f"{path}[{i}]") for i, (t, x) in enumerate(zip(args, v)))


def error_body(e: BaseException) -> dict:
    """How the worker reports a failed call: a typed error keeps its status code."""
    if isinstance(e, PreftError):
        return {"type": type(e).__name__, "grpc_code": e.grpc_code, "message": e.message}
    return {"type": type(e).__name__, "grpc_code": "INTERNAL",
            "message": f"{type(e).__name__}: {e}"}


def error_from(body: object) -> RemoteError:
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        return RemoteError("the worker answered with a malformed error")
    code = body.get("grpc_code")
    return RemoteError(body["message"], code if isinstance(code, str) else "INTERNAL")
