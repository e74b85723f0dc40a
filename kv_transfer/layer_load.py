"""Layer-wise KV loading on the decode engine: a prompt's KV enters decode's blocks layer
by layer inside the forward that first reads it, not in a wait before it (step 4 ends
inside step 5).

Used by the decode side of :mod:`kv_transfer.connector` for a prompt whose KV prefill
staged (:mod:`kv_transfer.staging`) and whose pair is same-host. Before the request is
scheduled, its staged blocks are *claimed*
(:meth:`~kv_transfer.transport.TorchDistTransport.claim`: one control round trip, the
segment mapped, nothing copied) off the engine thread, while the engine keeps stepping.
vLLM then schedules it with a synchronous load: in the step's ``start_load_kv`` (before the
forward) the connector copies the **tail block** of every layer -- the block the forward
writes the first token's KV into, which a whole-block copy landing later would undo -- and
each attention layer's ``wait_for_layer_load`` copies that layer's other blocks just
before the attention reads them.

The copies run on the engine thread, not beside the forward: on CPU a copy thread competes
with the forward's own threads, and measured on the 2-core machine that made the first
decode step slower by more than the copy took (docs/benchmarks.md, TTFT). A copy that
fails, or a layer the forward never asked for, marks the request's blocks invalid: vLLM
(``kv_load_failure_policy=fail``) fails the request rather than serve a half-loaded prompt.
"""

from __future__ import annotations

import time

import torch

from kv_transfer.offers import TransferRecord
from kv_transfer.transport import Claim


class LayerLoad:
    """One request's layer-wise load: its claim, where its blocks go, what is in."""

    def __init__(self, req_id: str, claim: Claim, start_block: int, dst_block_ids: list[int],
                 layers: list[torch.Tensor], peer: str, bytes_per_block: int) -> None:
        self.req_id, self.claim, self.layers = req_id, claim, layers
        self.src = claim.blocks[:, start_block:start_block + len(dst_block_ids)]
        self.dst_block_ids = dst_block_ids
        self._body = torch.tensor(dst_block_ids[:-1], dtype=torch.long)
        self.peer, self.bytes = peer, bytes_per_block * len(dst_block_ids)
        self.failed: str = ""
        self.copy_s = 0.0                    # engine-thread time spent copying
        self.layers_in: set[int] = set()

    def copy_tail(self) -> None:
        """The last block of every layer, before the forward writes the first token's KV
        into it (a whole-block copy landing after that write would undo it)."""
        t = time.perf_counter()
        try:
            dst = torch.tensor(self.dst_block_ids[-1:], dtype=torch.long)
            for i, layer in enumerate(self.layers):
                layer.index_copy_(0, dst, self.src[i, -1:])
        except Exception as e:
            self.fail(f"{type(e).__name__}: {e}")
        self.copy_s += time.perf_counter() - t

    def load_layer(self, i: int) -> None:
        """Layer ``i``'s other blocks, just before its attention reads them."""
        if self.failed or i in self.layers_in:
            return
        t = time.perf_counter()
        try:
            if len(self._body):
                self.layers[i].index_copy_(0, self._body, self.src[i, :-1])
            self.layers_in.add(i)
        except Exception as e:
            self.fail(f"{type(e).__name__}: {e}")
        self.copy_s += time.perf_counter() - t

    def settle(self) -> None:
        """After the forward: every layer must be in, else the forward may have read a
        layer before it was (an attention path without vLLM's per-layer hook) and the load
        fails. Either way the prefill side may now reuse its segment."""
        if not self.failed and len(self.layers_in) != len(self.layers):
            self.failed = (f"the forward loaded {len(self.layers_in)} of {len(self.layers)} "
                           "layers; the rest may have been read before they were in")
        self.claim.release()

    def fail(self, why: str) -> None:
        self.failed = self.failed or why

    def record(self) -> TransferRecord:
        """The whole transfer was waited for: the claim's round trip (before the request
        could be scheduled) and the copies on the engine thread."""
        ok = not self.failed
        seconds = self.claim.claimed_s + self.copy_s
        return TransferRecord(self.claim.transfer_id, self.peer, len(self.dst_block_ids),
                              self.bytes if ok else 0, seconds, ok=ok, error=self.failed,
                              transport="shm", pipelined=True, exposed_s=seconds)
