"""Objects in an S3-compatible bucket: what the ``s3://bucket/prefix`` adapter store is built on.

The store itself is :class:`cluster.adapter_store.S3Store`; this module is its boto3 half.
On registration (before step 3) the router puts a staged upload under
``<prefix>/.staging/<id>/`` for the validating worker, then the validated files under
``<prefix>/<sha256>/``; at step 3 a prefill or colocated worker on any node gets them into
its disk cache (``prefill_worker/adapter_host.py``), which checks their sha256 against the
registry. No shared filesystem is assumed.

boto3 is imported on first use only (the router's light packages never pay for it at import).
Credentials come from boto3's own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, an instance or pod role); the
endpoint of an S3-compatible service (MinIO, moto, Ceph) from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the profile), which boto3 reads itself. Every
failure becomes an :class:`~cluster.errors.AdapterStoreError` naming the URI and what to
fix; no message, log line or error ever carries a credential.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cluster.errors import AdapterStoreError, StoreUnreachable

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_RE = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9!_.*'()=+,;:@$&-]+")
_AUTH_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
               "InvalidToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed",
               "InvalidClientTokenId", "UnrecognizedClientException", "403")
_CHUNK = 1 << 20


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name (None: it is)."""
    if not _BUCKET_RE.fullmatch(bucket):
        return (f"bucket name {bucket!r} is invalid: 3-63 characters of lowercase letters, "
                "digits, '.' and '-', starting and ending with a letter or digit")
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return f"bucket name {bucket!r} is invalid: no '..', '.-' or '-.'"
    if _IPV4_RE.fullmatch(bucket):
        return f"bucket name {bucket!r} is invalid: it must not look like an IP address"
    if bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        return f"bucket name {bucket!r} is invalid: reserved prefix or suffix"
    return None


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix``: ``prefix`` has no leading or trailing '/' ('' = the root)."""

    bucket: str
    prefix: str = ""

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}".rstrip("/")


def shown(uri: str) -> str:
    """``uri`` fit for a message: any ``user:secret@`` in it hidden."""
    return re.sub(r"//[^/@]*@", "//<hidden>@", uri)


def parse_s3_uri(uri: str) -> S3Location:
    """``s3://bucket[/prefix...]`` -> its location; ValueError saying what is wrong."""
    parsed = urlparse(uri)
    uri = shown(uri)
    if parsed.scheme != "s3":
        raise ValueError(f"{uri!r} is not an s3:// URL")
    if parsed.query or parsed.fragment or parsed.params or "@" in parsed.netloc:
        raise ValueError(f"{uri!r}: write s3://bucket/prefix, without credentials, "
                         "query or fragment (credentials come from the environment)")
    problem = bucket_problem(parsed.netloc)
    if problem:
        raise ValueError(problem)
    prefix = parsed.path.strip("/")
    for seg in prefix.split("/") if prefix else ():
        if seg in (".", "..") or not _SEGMENT_RE.fullmatch(seg):
            raise ValueError(f"{uri!r}: prefix segment {seg[:64]!r} is invalid: use "
                             "[A-Za-z0-9!_.*'()=+,;:@$&-], no empty, '.' or '..' segments")
    return S3Location(parsed.netloc, prefix)


_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


def _client():
    """One boto3 S3 client per process (thread-safe once built), from the standard chain."""
    with _clients_lock:
        c = _clients.get("s3")
        if c is None:
            import boto3
            from botocore.config import Config

            cfg = Config(connect_timeout=5, read_timeout=60,
                         retries={"max_attempts": 3, "mode": "standard"})
            try:
                c = boto3.session.Session().client("s3", config=cfg)
            except ValueError as e:  # a malformed AWS_ENDPOINT_URL(_S3)
                raise AdapterStoreError(f"adapter store: {e}; fix AWS_ENDPOINT_URL_S3 / "
                                        "AWS_ENDPOINT_URL") from None
            _clients["s3"] = c
        return c


def reset_clients() -> None:
    """Forget the cached client (the environment's endpoint or credentials changed)."""
    with _clients_lock:
        _clients.clear()


def _endpoint() -> str:
    try:
        return _client().meta.endpoint_url
    except Exception:
        return "the configured endpoint"


def store_error(e: Exception, uri: str, action: str, bucket: str) -> AdapterStoreError:
    """A boto3/botocore failure as a clear error naming ``uri``; never a credential."""
    from botocore import exceptions as bx

    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                      bx.ConnectionClosedError, bx.ReadTimeoutError)):
        return StoreUnreachable(f"cannot reach the adapter store at {_endpoint()} to {action} "
                                f"{uri}: {type(e).__name__}; check AWS_ENDPOINT_URL_S3 / "
                                "AWS_ENDPOINT_URL and the network")
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return AdapterStoreError(f"no credentials for the adapter store {uri} ({action}): set "
                                 "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                                 "~/.aws/credentials on this node")
    if not isinstance(e, bx.ClientError):
        return AdapterStoreError(f"adapter store {uri}: {action} failed: {type(e).__name__}")
    err = e.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket":
        return AdapterStoreError(f"adapter store {uri}: bucket {bucket!r} does not exist at "
                                 f"{_endpoint()}; create it or fix the store URL")
    if code in ("NoSuchKey", "404") or status == 404:
        return AdapterStoreError(f"adapter store {uri}: no such object ({action}); it was "
                                 "deleted from the store: register the adapter again")
    if code in _AUTH_CODES or status in (401, 403):
        return AdapterStoreError(f"the adapter store refused the credentials for {uri} "
                                 f"({action}: {code or status}); check AWS_ACCESS_KEY_ID / "
                                 "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws) and that the "
                                 "key may read, write and list the bucket")
    return AdapterStoreError(f"adapter store {uri}: {action} failed: {code or 'HTTP'} "
                             f"(HTTP {status})")


@contextmanager
def _mapped(uri: str, action: str, bucket: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as e:
        raise store_error(e, uri, action, bucket) from None


class S3Objects:
    """The objects of one bucket: put, get, list and delete, each failure mapped."""

    def __init__(self, loc: S3Location) -> None:
        self.loc = loc

    def put(self, key: str, src: Path) -> None:
        uri = f"s3://{self.loc.bucket}/{key}"
        with _mapped(uri, "upload", self.loc.bucket), src.open("rb") as fh:
            _client().put_object(Bucket=self.loc.bucket, Key=key, Body=fh)

    def get(self, key: str, dst: Path) -> bool:
        """Download ``key`` to ``dst``; False when there is no such object."""
        from botocore.exceptions import ClientError

        uri = f"s3://{self.loc.bucket}/{key}"
        with _mapped(uri, "download", self.loc.bucket):
            try:
                obj = _client().get_object(Bucket=self.loc.bucket, Key=key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return False
                raise
            with dst.open("wb") as fh:
                for chunk in obj["Body"].iter_chunks(_CHUNK):
                    fh.write(chunk)
        return True

    def keys(self, prefix: str) -> list[str]:
        uri = f"s3://{self.loc.bucket}/{prefix}"
        out: list[str] = []
        with _mapped(uri, "list", self.loc.bucket):
            pages = _client().get_paginator("list_objects_v2").paginate(
                Bucket=self.loc.bucket, Prefix=prefix.rstrip("/") + "/")
            for page in pages:
                out += [o["Key"] for o in page.get("Contents", ())]
        return out

    def delete(self, keys: list[str], uri: str) -> None:
        with _mapped(uri, "delete", self.loc.bucket):
            for i in range(0, len(keys), 1000):
                _client().delete_objects(Bucket=self.loc.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
