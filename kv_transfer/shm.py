"""Same-host KV: one shared-memory segment per prefill-decode pair (step 4, one host).

When the two engines of a pair run on one host, KV needs no network and no serialization:
the prefill side gathers the held blocks of every layer into a shared-memory segment (one
copy out of the source blocks) and the decode side scatters them from the same pages into
its own blocks (one copy in). :class:`~kv_transfer.transport.TorchDistTransport` chooses it
per pair, at join, and keeps its torch.distributed groups (gloo, NCCL) for pairs across
hosts; the control messages are the same on both paths.

"One host" is proven, not assumed: the prefill endpoint writes a random token into a probe
file under ``/dev/shm`` and names the file in its store; a decode peer that can read the
token back (and sits in the same network namespace: containers and network namespaces
count as other hosts) sends it, authenticated, in its join. Segments are files under
``/dev/shm`` (mode 0600) named ``preft-kv-<pid>-<random>``; the owner unlinks them when the
pair or the endpoint closes, and a new endpoint removes those whose owner process is gone.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^preft-kv-(\d+)-[0-9a-f]{16}$")
_ALIGN = 1 << 20   # segments grow in whole MiB, so a pair rarely makes a new one


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def netns() -> str:
    """This process's network namespace (an inode number), "" where it cannot be read."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return ""


def _new_name() -> str:
    return f"preft-kv-{os.getpid()}-{secrets.token_hex(8)}"


def _path(name: str) -> Path:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"not a PreFT shared-memory segment name: {name!r:.80}")
    return SHM_DIR / name


def _create(nbytes: int) -> Path:
    """A new segment file of ``nbytes``, its pages allocated now: on a full ``/dev/shm``
    (a container's default is 64 MiB) this raises ENOSPC here, where a sparse file would
    kill the process with SIGBUS at its first write past the limit."""
    path = SHM_DIR / _new_name()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        if nbytes:
            os.posix_fallocate(fd, 0, nbytes)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def sweep_stale() -> int:
    """Remove segments whose owner process no longer exists; how many were removed."""
    removed = 0
    for path in SHM_DIR.glob("preft-kv-*"):
        m = _NAME.match(path.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Probe:
    """Prefill side: a file only a process sharing this ``/dev/shm`` can read."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.path = _create(len(self.token))
        self.path.write_text(self.token)
        self.name = self.path.name

    def admits(self, token: object, peer_netns: object) -> bool:
        """True when the peer read our token and shares our network namespace."""
        return (isinstance(token, str) and secrets.compare_digest(token, self.token)
                and isinstance(peer_netns, str) and peer_netns != "" and peer_netns == netns())

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def read_probe(name: str) -> str:
    """Decode side: the token in the prefill endpoint's probe; "" when not reachable."""
    try:
        return _path(name).read_text()[:64]
    except (OSError, ValueError, UnicodeDecodeError):
        return ""


class Segment:
    """A shared-memory file mapped as one flat tensor of ``dtype``."""

    def __init__(self, path: Path, numel: int, dtype: torch.dtype, owner: bool) -> None:
        self.path, self.name, self.numel, self.dtype = path, path.name, numel, dtype
        self.owner = owner
        self.flat = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)

    @classmethod
    def create(cls, numel: int, dtype: torch.dtype) -> "Segment":
        nbytes = -(-numel * dtype.itemsize // _ALIGN) * _ALIGN
        return cls(_create(nbytes), nbytes // dtype.itemsize, dtype, owner=True)

    @classmethod
    def attach(cls, name: str, numel: int, dtype: torch.dtype) -> "Segment":
        """Map the peer's segment; refuses a name that is not ours or a file too small."""
        path = _path(name)
        size = path.stat().st_size
        if size < numel * dtype.itemsize:
            raise ValueError(f"segment {name} has {size} bytes, the transfer needs "
                             f"{numel * dtype.itemsize}")
        return cls(path, size // dtype.itemsize, dtype, owner=False)

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.flat[:math.prod(shape)].view(shape)

    def close(self) -> None:
        self.flat = None
        if self.owner:
            self.path.unlink(missing_ok=True)
