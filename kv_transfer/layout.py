"""KV cache layout of one engine, and the check that two engines can exchange blocks.

Used by both connector sides when they pair: a prefill and a decode engine exchange whole
blocks, so they must agree on layer count, block size, per-block shape and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class LayoutMismatch(ValueError):
    """Two engines whose KV blocks are not interchangeable."""


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    block_shape: tuple[int, ...]   # one block of one layer, e.g. (kv_heads, block_size, 2*head)
    dtype: str                     # torch dtype name, e.g. "float32"
    itemsize: int

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers (what one block costs to move)."""
        return self.num_layers * math.prod(self.block_shape) * self.itemsize

    def fingerprint(self) -> str:
        shape = "x".join(map(str, self.block_shape))
        return f"L{self.num_layers}/B{self.block_size}/{shape}/{self.dtype}"

    def check_compatible(self, other_fingerprint: str, *, local: str, remote: str) -> None:
        if other_fingerprint != self.fingerprint():
            raise LayoutMismatch(
                f"refusing to pair {local} with {remote}: KV layouts differ "
                f"({local}: {self.fingerprint()}, {remote}: {other_fingerprint}); both "
                "engines need the same model, block size and KV cache dtype")

    @classmethod
    def from_tensors(cls, tensors: list, block_size: int) -> "KVLayout":
        """From the per-layer cache tensors vLLM registers ([num_blocks, *block_shape])."""
        if not tensors:
            raise ValueError("no KV cache tensors registered")
        first = tensors[0]
        for t in tensors:
            if tuple(t.shape[1:]) != tuple(first.shape[1:]) or t.dtype != first.dtype:
                raise ValueError("KV cache layers differ in shape or dtype; "
                                 "hybrid KV layouts are not supported")
        return cls(num_layers=len(tensors), block_size=block_size,
                   block_shape=tuple(int(s) for s in first.shape[1:]),
                   dtype=str(first.dtype).removeprefix("torch."),
                   itemsize=first.element_size())
