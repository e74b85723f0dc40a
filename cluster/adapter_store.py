"""Where validated adapter files live, and how they get there (registration, before step 3).

Uploads arrive at the router in chunks (``RegisterAdapter``); :func:`stage_upload` checks
names, file names and sizes without torch and writes them to a staging directory inside the
store. A prefill worker then validates the tensors (safetensors only, shapes against the
base model, rank, finite values); :meth:`AdapterStore.commit` moves the files to a
content address (``<root>/<sha256>/``) and returns the URI recorded in the Redis registry.
Prefill workers fetch from that URI into their local disk cache on first use.

``STORES`` maps a URI scheme to a backend: ``file`` (a directory shared by router and
workers) is the default; ``s3`` (:class:`S3Store`, ``s3://bucket/prefix`` on any
S3-compatible service, boto3 in :mod:`cluster.s3_store`) needs no shared filesystem: the
router stages uploads in a local temp directory and publishes them for the validating
worker (:meth:`AdapterStore.publish_staged`), and workers on any node fetch by URI.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cluster.config import valid_adapter_name
from cluster.errors import AdapterStoreError, InvalidAdapter

log = logging.getLogger(__name__)

ALLOWED_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not valid_adapter_name(name) or "\x00" in name:
        shown = repr(name[:40]) + ("..." if len(name) > 40 else "")
        raise InvalidAdapter(f"adapter name {shown} is invalid: use 1-128 characters of "
                             "[A-Za-z0-9._-], starting with a letter or digit, without '..'")


def check_filename(filename: str) -> None:
    if filename.startswith("intkey_") and filename.endswith(".bin"):
        raise InvalidAdapter(f"file {filename[:64]!r} is a pyreft/pyvene intervention (pickle) "
                             "and is refused; convert the directory first: preft convert-pyreft "
                             "DIR OUT --positions <as trained>, then upload OUT")
    if filename.endswith(PICKLE_SUFFIXES):
        raise InvalidAdapter(f"file {filename!r} is pickle-based and is refused; upload "
                             "adapter_model.safetensors (PEFT save_pretrained(safe_serialization=True))")
    if filename not in ALLOWED_FILES:
        raise InvalidAdapter(f"unexpected file {filename[:64]!r}; an adapter upload holds "
                             f"exactly {list(ALLOWED_FILES)}")


def digest_dir(path: Path) -> tuple[str, int]:
    """sha256 over (name, bytes) of the adapter files, and their total size."""
    h, size = hashlib.sha256(), 0
    for name in ALLOWED_FILES:
        f = path / name
        if not f.is_file():
            continue
        h.update(name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    return h.hexdigest(), size


class AdapterStore(ABC):
    scheme: str

    @abstractmethod
    def staging_dir(self) -> Path:
        """A fresh local directory to stage an upload in."""

    def publish_staged(self, staged: Path) -> str:
        """Where the validating worker reads ``staged``: a path (a shared directory) or a
        URI it fetches with :func:`store_of` (an object store)."""
        return str(staged)

    def discard_staged(self, staged: Path) -> None:
        """Remove a staged upload (and anything :meth:`publish_staged` put elsewhere)."""
        shutil.rmtree(staged, ignore_errors=True)

    @abstractmethod
    def commit(self, staged: Path, sha256: str) -> str:
        """Move validated files to their content address; returns the URI."""

    @abstractmethod
    def fetch(self, uri: str, dst: Path) -> None:
        """Copy the adapter at ``uri`` into directory ``dst`` (a worker's disk tier)."""

    @abstractmethod
    def delete(self, uri: str) -> None: ...


class LocalDirStore(AdapterStore):
    scheme = "file"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def staging_dir(self) -> Path:
        d = self.root / ".staging" / uuid.uuid4().hex
        d.mkdir(parents=True)
        return d

    def commit(self, staged: Path, sha256: str) -> str:
        dst = self.root / sha256
        if dst.exists():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.rename(dst)
        return dst.as_uri()

    def _path(self, uri: str) -> Path:
        p = Path(urlparse(uri).path).resolve()
        if self.root not in p.parents:
            raise InvalidAdapter(f"adapter URI {uri!r} is outside the store {self.root}")
        return p

    def fetch(self, uri: str, dst: Path) -> None:
        src = self._path(uri)
        dst.mkdir(parents=True, exist_ok=True)
        for name in ALLOWED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)

    def delete(self, uri: str) -> None:
        shutil.rmtree(self._path(uri), ignore_errors=True)


class S3Store(AdapterStore):
    """``s3://bucket/prefix`` on any S3-compatible service: objects ``<prefix>/<sha256>/``
    and ``<prefix>/.staging/<id>/``; staging is a local temp directory on the router."""

    scheme = "s3"

    def __init__(self, root: str) -> None:
        from cluster.s3_store import S3Objects, parse_s3_uri

        self.loc = parse_s3_uri(root)          # ValueError: what is wrong with it
        self.objects = S3Objects(self.loc)

    def staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="preft-staging-"))

    def _put_dir(self, src: Path, *parts: str) -> str:
        for name in ALLOWED_FILES:
            if (src / name).is_file():
                self.objects.put(self.loc.key(*parts, name), src / name)
        return self.loc.uri(*parts)

    def publish_staged(self, staged: Path) -> str:
        return self._put_dir(staged, ".staging", staged.name)

    def discard_staged(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)
        uri = self.loc.uri(".staging", staged.name)
        try:
            self.delete(uri)
        except AdapterStoreError as e:  # the upload failed anyway; say so and go on
            log.warning("could not remove the staged upload %s: %s", uri, e)

    def commit(self, staged: Path, sha256: str) -> str:
        uri = self._put_dir(staged, sha256)
        self.discard_staged(staged)
        return uri

    def _key(self, uri: str) -> str:
        from cluster.s3_store import parse_s3_uri

        try:
            loc = parse_s3_uri(uri)
        except ValueError as e:
            raise InvalidAdapter(f"adapter URI {uri!r}: {e}") from None
        root = self.loc.prefix + "/" if self.loc.prefix else ""
        if loc.bucket != self.loc.bucket or not loc.prefix.startswith(root) \
                or loc.prefix == self.loc.prefix:
            raise InvalidAdapter(f"adapter URI {uri!r} is outside the store {self.loc.uri()}")
        return loc.prefix

    def fetch(self, uri: str, dst: Path) -> None:
        key = self._key(uri)
        dst.mkdir(parents=True, exist_ok=True)
        got = [n for n in ALLOWED_FILES if self.objects.get(f"{key}/{n}", dst / n)]
        if not got:
            raise AdapterStoreError(f"adapter store {uri}: no adapter files there; they were "
                                    "deleted from the store: register the adapter again")

    def delete(self, uri: str) -> None:
        keys = self.objects.keys(self._key(uri))
        if keys:
            self.objects.delete(keys, uri)


@dataclass(frozen=True)
class RetiredCopy:
    """The store copy of an adapter version that a newer one replaced."""

    name: str
    version: int
    sha256: str
    uri: str
    not_before: float          # time.monotonic() after which it may go


class Retirements:
    """Store copies of replaced adapter versions, deleted once nothing can still want them:
    ``grace_s`` has passed since the replacement (a request routed with the old version
    before it ends within the router's request timeout) and no live worker reports holding
    that version (residency ``tier@vN``). A copy whose content (sha256) a registered
    version uses again -- another adapter with the same files, a re-registration -- is
    never deleted. Kept in the router's memory: a copy pending when the router stops stays
    in the store (a leftover, never a loss)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._pending: dict[tuple[str, int], RetiredCopy] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, name: str, version: int, sha256: str, uri: str,
            now: float | None = None) -> RetiredCopy:
        now = time.monotonic() if now is None else now
        copy = RetiredCopy(name, version, sha256, uri, now + self.grace_s)
        self._pending[(name, version)] = copy
        return copy

    def next_due_in(self, now: float | None = None) -> float:
        """Seconds until the earliest pending copy's grace ends (0: now; inf: none)."""
        now = time.monotonic() if now is None else now
        return min((c.not_before - now for c in self._pending.values()),
                   default=float("inf"))

    def due(self, live_sha256: set[str], held: set[tuple[str, int]],
            now: float | None = None) -> list[RetiredCopy]:
        """The copies to delete now, taken off the list: past their grace, not held by a
        worker (``held``: (name, version) pairs). Copies whose sha256 is in
        ``live_sha256`` (the registry's current versions) leave the list undeleted."""
        now = time.monotonic() if now is None else now
        out = []
        for key, c in list(self._pending.items()):
            if c.sha256 in live_sha256:
                del self._pending[key]
            elif c.not_before <= now and key not in held:
                del self._pending[key]
                out.append(c)
        return out


def held_versions(residency: dict[str, dict[str, str]]) -> set[tuple[str, int]]:
    """(name, version) pairs that workers report holding (``{worker: {name: "tier@vN"}}``,
    :meth:`cluster.state.ClusterState.residency`)."""
    held = set()
    for resident in residency.values():
        for name, where in resident.items():
            name = name.decode() if isinstance(name, bytes) else name
            where = where.decode() if isinstance(where, bytes) else where
            _, _, v = where.rpartition("@v")
            if v.isdigit():
                held.add((name, int(v)))
    return held


STORES: dict[str, type[AdapterStore]] = {LocalDirStore.scheme: LocalDirStore,
                                         S3Store.scheme: S3Store}


def store_for(uri_or_root: str) -> AdapterStore:
    """The store at a root (``/dir``, ``file:///dir``, ``s3://bucket/prefix``)."""
    parsed = urlparse(uri_or_root)
    scheme = parsed.scheme or "file"
    if scheme not in STORES:
        raise ValueError(f"no adapter store for scheme {scheme!r}; known: {sorted(STORES)}")
    if scheme == "file":
        return LocalDirStore(parsed.path if parsed.scheme else uri_or_root)
    return STORES[scheme](uri_or_root)


def store_of(uri: str) -> AdapterStore:
    """The store an adapter URI (``file:///store/<sha256>``, ``s3://b/p/<sha256>``) lives in."""
    parsed = urlparse(uri)
    if parsed.scheme not in STORES:
        raise InvalidAdapter(f"adapter URI {uri!r}: unknown scheme; known: {sorted(STORES)}")
    if parsed.scheme == "file":
        return LocalDirStore(Path(parsed.path).parent)
    try:
        return STORES[parsed.scheme](uri.rstrip("/").rsplit("/", 1)[0])
    except ValueError as e:
        raise InvalidAdapter(f"adapter URI {uri!r}: {e}") from None


class UploadWriter:
    """Writes streamed chunks into a staging dir, enforcing names and size limits."""

    def __init__(self, store: AdapterStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.dir = store.staging_dir()
        self.total = 0
        self._files: dict[str, object] = {}
        self._sizes: dict[str, int] = {}

    def write(self, filename: str, data: bytes) -> None:
        check_filename(filename)
        self.total += len(data)
        if self.total > self.max_bytes:
            raise InvalidAdapter(f"upload exceeds the adapter size limit of {self.max_bytes} bytes")
        self._sizes[filename] = self._sizes.get(filename, 0) + len(data)
        if filename == "adapter_config.json" and self._sizes[filename] > MAX_CONFIG_BYTES:
            raise InvalidAdapter("adapter_config.json is larger than 1 MiB")
        fh = self._files.get(filename)
        if fh is None:
            fh = self._files[filename] = open(self.dir / filename, "wb")
        fh.write(data)

    def finish(self) -> Path:
        for fh in self._files.values():
            fh.close()
        missing = [n for n in ALLOWED_FILES if not (self.dir / n).is_file()]
        if missing:
            self.abort()
            raise InvalidAdapter(f"upload is missing {missing}")
        return self.dir

    def abort(self) -> None:
        for fh in self._files.values():
            try:
                fh.close()
            except Exception:
                pass
        self.store.discard_staged(self.dir)


def stage_local_dir(store: AdapterStore, src: Path, max_bytes: int) -> Path:
    """Stage an adapter directory from the local disk (CLI/launcher path, same checks)."""
    src = Path(src)
    if not src.is_dir():
        raise InvalidAdapter(f"adapter directory {str(src)!r} does not exist")
    names = [p.name for p in src.iterdir() if p.is_file()]
    if "adapter_model.safetensors" not in names:
        for n in names:
            if n.endswith(PICKLE_SUFFIXES):
                check_filename(n)
    w = UploadWriter(store, max_bytes)
    try:
        for name in ALLOWED_FILES:
            f = src / name
            if f.is_file():
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        w.write(name, chunk)
        return w.finish()
    except BaseException:
        w.abort()
        raise
