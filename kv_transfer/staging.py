"""Layer-wise KV staging on the prefill engine: step 4 begins while step 3 still runs.

As the prefill engine's forward finishes each attention layer, vLLM calls the connector's
``save_kv_layer``; for every prompt that will be handed to decode, the connector copies
that layer's blocks written this step out of the engine's cache into the prompt's
:class:`Staged` buffer (``[layers, blocks, *block_shape]``), on a copy thread, so the copy
of layer i overlaps the compute of layer i+1. By the time the prompt's last forward ends
(``wait_for_save``) its KV is already laid out as the transport sends it, so:

- the pull does no gather: a same-host peer scatters straight out of the staged buffer (a
  memfd segment whose descriptor it was sent once), a peer on another host receives it as sent;
- the engine frees the prompt's blocks when the request finishes instead of holding them
  until decode pulls (the offer holds the staged copy, not cache blocks).

Buffers come from a :class:`StagingPool` with a byte cap; a prompt that does not fit is not
staged and takes the unpipelined path (blocks held, gathered at pull). Buffers are reused
(a fresh multi-MiB buffer costs a page fault per 4 KiB on first touch); one is reused only
after the peer said it finished reading it, never while a pull may still read it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kv_transfer import shm
from kv_transfer.layout import KVLayout

log = logging.getLogger(__name__)


@dataclass
class Staged:
    """One prompt's KV, copied out of its blocks layer by layer as its forward ran."""

    req_id: str
    num_blocks: int
    buf: torch.Tensor                     # [layers, num_blocks, *block_shape]
    flat: torch.Tensor                    # the whole reusable buffer ``buf`` is a view of
    segment: shm.Segment | None           # the buffer's shared-memory file (CPU caches)
    pool: "StagingPool | None" = field(default=None, repr=False)
    started: float = field(default_factory=time.monotonic)
    blocks_ready: int = 0                 # leading blocks whose every layer is copied

    def recycle(self) -> None:
        """The peer finished reading it (or nobody will): its pool may reuse it."""
        if self.pool is not None:
            self.pool.recycle(self)

    def discard(self) -> None:
        """A peer may still be reading it: never reuse it."""
        if self.pool is not None:
            self.pool.discard(self)

    @property
    def capacity_bytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def complete(self, num_blocks: int) -> bool:
        return self.num_blocks == num_blocks and self.blocks_ready >= num_blocks


@dataclass
class _Copy:
    staged: Staged
    src: torch.Tensor      # engine block ids written this step
    lo: int                # their position in the staged buffer
    hi: int


class StagingPool:
    """Staged buffers by engine request id, with a byte cap over buffers lent and idle.

    Thread-safe. The connector's worker side begins and fills buffers (engine thread and
    its copy thread), its scheduler side hands a finished prompt's buffer to the offer
    (:meth:`take`) or drops it (:meth:`drop`), and the transport gives it back
    (:meth:`recycle`) once the peer has read it, or discards it (:meth:`discard`) when that
    cannot be known."""

    def __init__(self, layers: list[torch.Tensor], layout: KVLayout, *, cap_bytes: int,
                 shared_memory: bool, stale_after_s: float = 600.0) -> None:
        self.layers, self.layout = layers, layout
        self.cap_bytes = cap_bytes
        self.shared_memory = shared_memory   # the transport's: CPU caches, memfd available
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._live: dict[str, Staged] = {}        # being filled, by request id
        self._lent: set[int] = set()              # ids of buffers held by offers
        self._idle: list[Staged] = []             # reusable
        self._bytes = 0                           # live + lent + idle
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="kv-stage")
        self._step: list[_Copy] = []              # this step's planned copies
        self._pending: list[Future] = []          # their layers' copies, submitted
        self.skipped = 0                          # prompts not staged: over the cap

    # ------------------------------------------------------------- engine thread
    def begin(self, req_id: str, num_blocks: int) -> Staged | None:
        """A buffer for ``req_id``'s ``num_blocks`` blocks; None when it would exceed the
        cap (that prompt then takes the unpipelined path)."""
        shape = (len(self.layers), num_blocks, *self.layout.block_shape)
        numel = math.prod(shape)
        with self._lock:
            self._sweep_locked()
            if req_id in self._live:
                return self._live[req_id]
            reuse = min((s for s in self._idle if s.flat.numel() >= numel),
                        key=lambda s: s.flat.numel(), default=None)
            if reuse is not None:
                self._idle.remove(reuse)
                staged = self._resized(reuse, req_id, num_blocks, shape)
            else:
                need = numel * self.layers[0].element_size()
                while self._idle and self._bytes + need > self.cap_bytes:
                    self._close_locked(self._idle.pop(0))
                if self._bytes + need > self.cap_bytes:
                    self.skipped += 1
                    return None
                try:
                    staged = self._new(req_id, num_blocks, shape)
                except OSError as e:   # no memory for it: this prompt takes the held path
                    self.skipped += 1
                    log.warning("no staging buffer for %s (%s); its KV is held for decode "
                                "instead", req_id, e)
                    return None
                self._bytes += staged.capacity_bytes
            self._live[req_id] = staged
            return staged

    def _new(self, req_id: str, num_blocks: int, shape: tuple[int, ...]) -> Staged:
        dtype, numel = self.layers[0].dtype, math.prod(shape)
        if self.shared_memory:
            seg = shm.Segment.create(numel, dtype)
            return Staged(req_id, num_blocks, seg.view(shape), seg.flat, seg, self)
        flat = torch.empty(numel, dtype=dtype, device=self.layers[0].device)
        return Staged(req_id, num_blocks, flat.view(shape), flat, None, self)

    @staticmethod
    def _resized(old: Staged, req_id: str, num_blocks: int, shape: tuple[int, ...]) -> Staged:
        view = old.flat[:math.prod(shape)].view(shape)
        return Staged(req_id, num_blocks, view, old.flat, old.segment, old.pool)

    def get(self, req_id: str) -> Staged | None:
        with self._lock:
            return self._live.get(req_id)

    def plan(self, staged: Staged, block_ids: list[int], lo: int, hi: int) -> None:
        """This step's forward writes blocks [lo, hi) of ``staged``'s prompt (engine ids
        ``block_ids``): copy each layer of them as it is written."""
        src = torch.tensor(block_ids, dtype=torch.long, device=self.layers[0].device)
        self._step.append(_Copy(staged, src, lo, hi))

    @property
    def planned(self) -> bool:
        """Whether this step's forward writes blocks of a staged prompt."""
        return bool(self._step)

    def save_layer(self, i: int) -> None:
        """Layer ``i`` of this step's forward is written: copy it on the copy thread."""
        if self._step:
            self._pending.append(self._copier.submit(self._copy_layer, i, list(self._step)))

    def _copy_layer(self, i: int, copies: list[_Copy]) -> None:
        layer = self.layers[i]
        # Buffers made during a forward are inference tensors: written in the same mode.
        with torch.inference_mode():
            for c in copies:
                torch.index_select(layer, 0, c.src, out=c.staged.buf[i, c.lo:c.hi])

    def finish_step(self, num_layers: int) -> None:
        """The step's forward ended: wait for its copies and mark the blocks each staged
        prompt now holds. A step that did not save all ``num_layers`` layers (or whose copy
        failed) breaks its prompts' staging: they take the held path."""
        pending, self._pending, step, self._step = self._pending, [], self._step, []
        complete = len(pending) == num_layers
        ready = {c.staged.req_id: c.hi if complete else -1 for c in step}
        error = None
        for f in pending:
            try:
                f.result()
            except Exception as e:   # the prompt is not staged: it takes the held path
                error = e
        if error is not None:
            log.warning("KV staging copy failed (%s: %s); those prompts keep their blocks "
                        "for decode instead", type(error).__name__, error)
        with self._lock:
            for req_id, n in ready.items():
                staged = self._live.get(req_id)
                if staged is not None:   # once broken (n < 0), never complete
                    staged.blocks_ready = (-1 if error or n < 0 or staged.blocks_ready < 0
                                           else max(staged.blocks_ready, n))

    # ------------------------------------------------------------- scheduler side
    def take(self, req_id: str, num_blocks: int) -> Staged | None:
        """A finished prompt's complete buffer, now lent to its offer; None when it was not
        (fully) staged, in which case any partial buffer is dropped."""
        with self._lock:
            staged = self._live.pop(req_id, None)
            if staged is None:
                return None
            if not staged.complete(num_blocks):
                self._idle.append(staged)
                return None
            self._lent.add(id(staged))
            return staged

    def drop(self, req_id: str) -> None:
        """The prompt ended without a hand-over (aborted, failed): its buffer is idle."""
        with self._lock:
            staged = self._live.pop(req_id, None)
            if staged is not None:
                self._idle.append(staged)

    # ------------------------------------------------------------- transport
    def recycle(self, staged: Staged) -> None:
        """The peer finished reading (or nobody will): reusable."""
        with self._lock:
            if id(staged) in self._lent:
                self._lent.discard(id(staged))
                self._idle.append(staged)

    def discard(self, staged: Staged) -> None:
        """A peer may still read it: never reuse it; unlink its file (the peer's mapping
        stays valid until it unmaps) and forget it."""
        with self._lock:
            if id(staged) in self._lent:
                self._lent.discard(id(staged))
                self._close_locked(staged)

    # ------------------------------------------------------------- accounting
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"staging": len(self._live), "lent": len(self._lent),
                    "idle": len(self._idle), "bytes": self._bytes, "skipped": self.skipped}

    def _sweep_locked(self) -> None:
        """Buffers of requests that never finished on this engine (defensive: vLLM reports
        every finish, aborted ones too) go idle after ``stale_after_s``."""
        now = time.monotonic()
        for req_id in [r for r, s in self._live.items() if now - s.started > self.stale_after_s]:
            self._idle.append(self._live.pop(req_id))

    def _close_locked(self, staged: Staged) -> None:
        self._bytes -= staged.capacity_bytes
        if staged.segment is not None:
            staged.segment.close()

    def close(self) -> None:
        self._copier.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for s in [*self._idle, *self._live.values()]:
                if s.segment is not None:
                    s.segment.close()
            self._idle.clear()
            self._live.clear()
