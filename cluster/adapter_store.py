"""Where validated adapter files live, and how they get there (registration, before step 3).

Uploads arrive at the router in chunks (``RegisterAdapter``); :func:`stage_upload` checks
names, file names and sizes without torch and writes them to a staging directory inside the
store. A prefill worker then validates the tensors (safetensors only, shapes against the
base model, rank, finite values); :meth:`AdapterStore.commit` moves the files to a
content address (``<root>/<sha256>/``) and returns the URI recorded in the Redis registry.
Prefill workers fetch from that URI into their local disk cache on first use.

``STORES`` maps a URI scheme to a backend; ``file`` (a directory shared by router and
prefill workers) is the default. An object store is another backend behind the same seam.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

from cluster.config import valid_adapter_name
from cluster.errors import InvalidAdapter

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
        """A fresh directory, readable by prefill workers, to stage an upload in."""

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


STORES: dict[str, type[AdapterStore]] = {LocalDirStore.scheme: LocalDirStore}


def store_for(uri_or_root: str) -> AdapterStore:
    parsed = urlparse(uri_or_root)
    scheme = parsed.scheme or "file"
    if scheme not in STORES:
        raise ValueError(f"no adapter store for scheme {scheme!r}; known: {sorted(STORES)}")
    return STORES[scheme](parsed.path if parsed.scheme else uri_or_root)


def store_of(uri: str) -> AdapterStore:
    """The store an adapter URI (``file:///store/<sha256>``) lives in."""
    parsed = urlparse(uri)
    if parsed.scheme not in STORES:
        raise InvalidAdapter(f"adapter URI {uri!r}: unknown scheme; known: {sorted(STORES)}")
    return STORES[parsed.scheme](Path(parsed.path).parent)


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
        shutil.rmtree(self.dir, ignore_errors=True)


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
