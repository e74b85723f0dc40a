"""Layer-wise KV loading on the decode engine: the copy into decode's blocks overlaps the
forward that first reads them (step 5 begins while step 4 still runs).

Used by the decode side of :mod:`kv_transfer.connector` for a prompt whose KV prefill
staged (:mod:`kv_transfer.staging`) and whose pair is same-host. Before the request is
scheduled, its staged blocks are *claimed* (:meth:`~kv_transfer.transport.TorchDistTransport.claim`:
one control round trip, the segment mapped, nothing copied) off the engine thread. vLLM then
schedules it with a synchronous load; in the step's ``start_load_kv`` (before the forward)
the connector copies the **tail block** of every layer on the engine thread -- the block
the forward writes the first token's KV into, which a whole-block copy landing later would
overwrite -- and hands the other blocks to a copy thread, layer by layer. The forward's
attention layer i waits (``wait_for_layer_load``) only until layer i is in. A copy that
fails marks the request's blocks invalid: vLLM (``kv_load_failure_policy=fail``) fails the
request, never computes on a half-loaded prompt.
"""

from __future__ import annotations

import threading
import time

import torch

from kv_transfer.transport import Claim, TransferRecord


class LayerLoad:
    """One request's layer-wise load: its claim, where its blocks go, and its progress."""

    def __init__(self, req_id: str, claim: Claim, start_block: int, dst_block_ids: list[int],
                 peer: str, bytes_per_block: int) -> None:
        self.req_id, self.claim = req_id, claim
        self.src = claim.blocks[:, start_block:start_block + len(dst_block_ids)]
        self.dst_block_ids = dst_block_ids
        self.peer, self.bytes = peer, bytes_per_block * len(dst_block_ids)
        self._cv = threading.Condition()
        self._layers_in = 0
        self.failed: str = ""
        self.waited_s = 0.0          # the engine thread's time on this load (tail + waits)
        self.t0 = time.perf_counter()
        self.done_s = 0.0            # from the tail copy to the last layer in
        self.layers_waited: set[int] = set()
        self.copying = None          # the copy thread's future

    # ------------------------------------------------------------- engine thread
    def copy_tail(self, layers: list[torch.Tensor]) -> None:
        """The last block of every layer, now (before the forward writes into it)."""
        t = time.perf_counter()
        dst = torch.tensor(self.dst_block_ids[-1:], dtype=torch.long)
        for i, layer in enumerate(layers):
            layer.index_copy_(0, dst, self.src[i, -1:])
        self.waited_s += time.perf_counter() - t

    def wait_layer(self, i: int, timeout: float) -> None:
        """Block the forward until layer ``i`` is in (or the load failed)."""
        t = time.perf_counter()
        self.layers_waited.add(i)
        with self._cv:
            if not self._cv.wait_for(lambda: self._layers_in > i or self.failed, timeout):
                self.failed = f"layer {i} not loaded within {timeout:g} s"
        self.waited_s += time.perf_counter() - t

    def settle(self, n_layers: int, timeout: float) -> None:
        """After the forward: the copy thread is done with our blocks (before any of them
        can be freed), and the load failed if the forward read a layer it never waited
        for (an attention path without vLLM's per-layer hook)."""
        if self.copying is not None:
            try:
                self.copying.result(timeout)
            except Exception as e:
                self.failed = self.failed or f"copy did not finish: {type(e).__name__}: {e}"
        if not self.failed and len(self.layers_waited) != n_layers:
            self.failed = (f"the forward waited for {len(self.layers_waited)} of {n_layers} "
                           "layers; the rest may have been read before they were loaded")

    # ------------------------------------------------------------- copy thread
    def copy_body(self, layers: list[torch.Tensor]) -> None:
        """Every block but the tail, layer by layer, each signalled as it lands; then the
        claim is released (prefill may reuse its segment)."""
        try:
            dst = torch.tensor(self.dst_block_ids[:-1], dtype=torch.long)
            for i, layer in enumerate(layers):
                if len(dst):
                    layer.index_copy_(0, dst, self.src[i, :-1])
                with self._cv:
                    self._layers_in = i + 1
                    self._cv.notify_all()
            self.claim.release()
            self.done_s = time.perf_counter() - self.t0
        except Exception as e:
            self.fail(f"{type(e).__name__}: {e}")

    def fail(self, why: str) -> None:
        self.claim.release()
        with self._cv:
            self.failed = self.failed or why
            self._cv.notify_all()

    def record(self) -> TransferRecord:
        """Once the forward is over. ``seconds``: the claim round trip and the copies;
        ``exposed_s``: what the request waited for -- the claim round trip (before it
        could be scheduled), the tail copy and the forward's waits."""
        ok = not self.failed
        return TransferRecord(self.claim.transfer_id, self.peer, len(self.dst_block_ids),
                              self.bytes if ok else 0, self.claim.claimed_s + self.done_s,
                              ok=ok, error=self.failed, transport="shm", pipelined=True,
                              exposed_s=self.claim.claimed_s + self.waited_s)
