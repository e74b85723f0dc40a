"""Grouped multi-adapter LoRA for the prefill worker's in-process vLLM engine (CPU).

Where it sits in the request path
---------------------------------
router -> **prefill worker** (vLLM engine with ``enable_lora``; each request carries its
user's adapter and runs with ``max_tokens=1``) -> KV transfer -> decode engine (base model
only, never loads adapters).  The adapter therefore touches the *prompt tokens only*, and
this module only matters inside the prefill worker's process.  The prefill worker calls
:func:`install_grouped_lora` once, before it constructs its engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``"uni"``, so the engine core and model
runner live in the same process and see the patch).

What it replaces
----------------
vLLM picks the object that applies LoRA deltas ("punica wrapper") per platform:
``vllm.lora.punica_wrapper.get_punica_wrapper`` resolves the qualified name returned by
``current_platform.get_punica_wrapper()``.  On CPU that is ``PunicaWrapperCPU``, whose
prefill ops (``vllm.lora.ops.torch_ops.sgmv_*``) expand the per-segment adapter index to
every token and gather a private copy of the adapter matrices per token
(``lora_b_weights[exploded_indices]``) before a batched einsum -- for 8192 prompt tokens
that is 8192 copies of every A and B per projection per layer.

:func:`install_grouped_lora` makes ``CpuPlatform.get_punica_wrapper`` return
:class:`GroupedPunicaWrapperCPU` instead.  It is a subclass of the stock wrapper that keeps
the stock metadata bookkeeping and overrides the methods the LoRA layers call
(``add_shrink``, ``add_expand``, ``add_lora_linear``, ``add_lora_logits``,
``add_lora_embedding``).  Nothing in vLLM's files is modified.

The formula
-----------
vLLM lays a batch out request by request, so the tokens of one request are contiguous and
share one adapter slot.  ``update_metadata`` turns the token -> slot mapping into runs
``(start, end, slot)`` of equal slot (adjacent requests with the same adapter merge into one
run; slot ``-1`` = no adapter, those runs are skipped).  For every packed projection with
output slices ``n_0, n_1, ...`` (q/k/v for ``qkv_proj``, gate/up for ``gate_up_proj``, one
slice for ``o_proj``/``down_proj``) and every run::

    y[start:end, off_j : off_j + n_j] += ((x[start:end] @ A_j[slot]^T) * scale) @ B_j[slot]^T

i.e. one small GEMM pair per (run, slice), reading the adapter matrices in place from the
stacked slot tensors -- no per-token weight copies.  Decode-phase rows (one token per
request) are just runs of length 1, so any batch vLLM produces is handled.  The
``(x @ A^T)`` intermediate is computed in the adapter weight dtype (oneDNN/MKL accumulate
in fp32 for bf16 inputs); the stock path rounds it to the output dtype before the expand as
well.

Semantics differences from the stock CPU ops (both deliberate, matching vLLM's GPU
Triton kernels): rows whose slot is ``-1`` are never written (the stock torch ops index the
weights with ``-1`` and so apply the *last* slot's adapter to adapter-less rows of a mixed
batch whenever that slot is occupied), and rows beyond the mapped token count (padding)
get no delta.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

import vllm
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.platforms.cpu import CpuPlatform

__all__ = [
    "GroupedPunicaWrapperCPU",
    "SUPPORTED_VLLM_VERSION",
    "install_grouped_lora",
    "is_grouped_lora_installed",
    "uninstall_grouped_lora",
    "lora_segments",
]

logger = logging.getLogger("vllm.preft.grouped_lora")  # under vLLM's handler: shows in server logs

SUPPORTED_VLLM_VERSION = "0.32.0"
_STOCK_QUALNAME = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"

Segment = tuple[int, int, int]  # (start row, end row, adapter slot), slot >= 0


def lora_segments(indices: torch.Tensor) -> list[Segment]:
    """Runs of equal adapter slot in a token->slot (or row->slot) mapping, ``-1`` runs dropped."""
    if indices.numel() == 0:
        return []
    values, counts = torch.unique_consecutive(indices.cpu(), return_counts=True)
    segs: list[Segment] = []
    start = 0
    for v, c in zip(values.tolist(), counts.tolist()):
        if v >= 0:
            segs.append((start, start + c, v))
        start += c
    return segs


def _mat(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """The 2-D matrix of one slot from a stacked ``[slots, 1, rows, cols]`` (or 3-D) tensor."""
    w = stacked[slot]
    while w.dim() > 2:
        w = w[0]
    return w


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """Punica wrapper that applies LoRA with one GEMM pair per contiguous adapter run."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int,
                 device: torch.device | str, **kwargs: Any):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        logger.info("grouped multi-adapter LoRA kernel active (pid %d)", os.getpid())
        self._token_segments: list[Segment] = []
        self._sampler_segments: list[Segment] = []

    # ---------------------------------------------------------------- metadata
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._token_segments = lora_segments(self.token_lora_indices)
        self._sampler_segments = lora_segments(self.sampler_indices)

    @property
    def token_segments(self) -> list[Segment]:
        return self._token_segments

    @property
    def sampler_segments(self) -> list[Segment]:
        return self._sampler_segments

    # ------------------------------------------------------------- primitives
    @staticmethod
    def _clip(segs: list[Segment], n: int):
        for s, e, slot in segs:
            if s >= n:
                break
            yield s, min(e, n), slot

    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked: Sequence[torch.Tensor],
                   scale: float, **kwargs: Any) -> None:
        """``y[i][run] = (x[run] @ A_i[slot]^T) * scale`` for every adapter run; -1 rows untouched."""
        x = x.view(-1, x.shape[-1])
        segs = list(self._clip(self._token_segments, x.shape[0]))
        if not segs:
            return
        for i, a_stacked in enumerate(lora_a_stacked):
            yi = y[i]
            yi = yi.view(-1, yi.shape[-1])
            for s, e, slot in segs:
                a = _mat(a_stacked, slot)
                h = torch.mm(x[s:e].to(a.dtype), a.t())
                if scale != 1.0:
                    h.mul_(scale)
                yi[s:e, : h.shape[1]].copy_(h)

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked: Sequence[torch.Tensor],
                   output_slices: Sequence[int], offset_start: int = 0, add_inputs=True,
                   **kwargs: Any) -> None:
        """``y[run, off_i:off_i+n_i] (+)= x[i][run] @ B_i[slot]^T`` for every adapter run."""
        y = y.view(-1, y.shape[-1])
        segs = list(self._clip(self._token_segments, y.shape[0]))
        if not segs:
            return
        offset = offset_start
        for i, b_stacked in enumerate(lora_b_stacked):
            n_i = output_slices[i]
            xi = x[i]
            xi = xi.view(-1, xi.shape[-1])
            for s, e, slot in segs:
                b = _mat(b_stacked, slot)
                self._expand_into(y[s:e, offset : offset + n_i], xi[s:e], b, add_inputs)
            offset += n_i

    @staticmethod
    def _expand_into(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor,
                     add_inputs: bool) -> None:
        """``out (+)= h @ b^T`` with ``b`` of shape ``[n_out, rank]``; extra columns ignored."""
        n = min(out.shape[1], b.shape[0])
        out = out[:, :n]
        b = b[:n, : h.shape[1]] if b.shape[1] != h.shape[1] else b[:n]
        h = h.to(b.dtype)
        if out.dtype == b.dtype:
            if add_inputs:
                out.addmm_(h, b.t())
            else:
                out.copy_(torch.mm(h, b.t()))
        elif add_inputs:
            out.add_(torch.mm(h, b.t()).to(out.dtype))
        else:
            out.copy_(torch.mm(h, b.t()))

    # ---------------------------------------------------------- layer entries
    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: Sequence[torch.Tensor],
                        lora_b_stacked: Sequence[torch.Tensor], scale: float,
                        output_slices: Sequence[int], *, buffer=None, **kwargs: Any) -> None:
        """``y[run, slice_j] += ((x[run] @ A_j^T) * scale) @ B_j^T`` per adapter run and slice."""
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        add_inputs = kwargs.get("add_inputs", True)
        if buffer is not None:
            # A caller-provided buffer (e.g. for a collective between shrink and expand).
            self.add_shrink(buffer, x, lora_a_stacked, scale)
            self.add_expand(y, buffer, lora_b_stacked, output_slices, add_inputs=add_inputs)
            return
        y2 = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        segs = list(self._clip(self._token_segments, min(x.shape[0], y2.shape[0])))
        if not segs:
            return
        for s, e, slot in segs:
            xs = x[s:e]
            offset = 0
            for a_stacked, b_stacked, n_j in zip(lora_a_stacked, lora_b_stacked,
                                                 output_slices):
                a = _mat(a_stacked, slot)
                h = torch.mm(xs.to(a.dtype), a.t())
                if scale != 1.0:
                    h.mul_(scale)
                self._expand_into(y2[s:e, offset : offset + n_j], h, _mat(b_stacked, slot),
                                  add_inputs)
                offset += n_j

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor,
                           lora_b_stacked: torch.Tensor, add_inputs: bool = True,
                           **kwargs: Any) -> None:
        """``y[run] (+)= x[run] @ B[slot]^T`` (embedding LoRA; only the expand half)."""
        y = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        for s, e, slot in self._clip(self._token_segments, min(x.shape[0], y.shape[0])):
            self._expand_into(y[s:e], x[s:e], _mat(lora_b_stacked, slot), add_inputs)

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None,
                        **kwargs: Any) -> None:
        """``y[run] += ((x[run] @ A[slot]^T) * scale) @ B[slot]^T`` over the sampled rows."""
        y = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        for s, e, slot in self._clip(self._sampler_segments, min(x.shape[0], y.shape[0])):
            a = _mat(lora_a_stacked, slot)
            h = torch.mm(x[s:e].to(a.dtype), a.t())
            if scale != 1.0:
                h.mul_(scale)
            self._expand_into(y[s:e], h, _mat(lora_b_stacked, slot), True)


# ------------------------------------------------------------------ installation
_lock = threading.Lock()
_original_get_punica_wrapper: Any = None  # the classmethod object we replaced

_EXPECTED_PARAMS: dict[str, tuple[str, ...]] = {
    # method -> leading parameter names the LoRA layers of vLLM 0.32.0 pass
    "add_shrink": ("self", "y", "x", "lora_a_stacked", "scale"),
    "add_expand": ("self", "y", "x", "lora_b_stacked", "output_slices", "offset_start",
                   "add_inputs"),
    "add_lora_linear": ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale",
                        "output_slices", "buffer"),
    "add_lora_logits": ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale",
                        "buffer"),
    "add_lora_embedding": ("self", "y", "x", "lora_b_stacked", "add_inputs"),
    "update_metadata": ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size"),
    "__init__": ("self", "max_num_batched_tokens", "max_batches", "device"),
}


def _incompatible(msg: str) -> RuntimeError:
    return RuntimeError(
        f"lora_kernel.grouped_lora was written against vLLM {SUPPORTED_VLLM_VERSION} but "
        f"the installed vLLM is {vllm.__version__}: {msg}. Re-check the punica wrapper "
        "interface (vllm/lora/punica_wrapper/) before updating SUPPORTED_VLLM_VERSION.")


def _check_compatibility() -> None:
    if vllm.__version__ != SUPPORTED_VLLM_VERSION:
        raise _incompatible("version mismatch")
    raw = CpuPlatform.__dict__.get("get_punica_wrapper")
    if not isinstance(raw, classmethod):
        raise _incompatible("CpuPlatform.get_punica_wrapper is no longer a classmethod")
    current = CpuPlatform.get_punica_wrapper()
    if current not in (_STOCK_QUALNAME, _our_qualname()):
        raise _incompatible(f"CpuPlatform.get_punica_wrapper() returns {current!r}, "
                            f"expected {_STOCK_QUALNAME!r}")
    for name, expected in _EXPECTED_PARAMS.items():
        fn = getattr(PunicaWrapperCPU, name, None)
        if fn is None:
            raise _incompatible(f"PunicaWrapperCPU.{name} is missing")
        params = tuple(inspect.signature(fn).parameters)
        if params[: len(expected)] != expected:
            raise _incompatible(f"PunicaWrapperCPU.{name}{inspect.signature(fn)} changed "
                                f"(expected parameters {expected})")
    for prop in ("token_lora_indices", "sampler_indices"):
        if not isinstance(inspect.getattr_static(PunicaWrapperBase, prop, None), property):
            raise _incompatible(f"PunicaWrapperBase.{prop} is no longer a property")
    from vllm.lora.punica_wrapper import punica_selector
    src = inspect.getsource(punica_selector.get_punica_wrapper)
    if "current_platform.get_punica_wrapper()" not in src:
        raise _incompatible("get_punica_wrapper no longer asks current_platform")


def _our_qualname() -> str:
    return f"{GroupedPunicaWrapperCPU.__module__}.{GroupedPunicaWrapperCPU.__qualname__}"


def install_grouped_lora(*, every_process: bool = False) -> None:
    """Make vLLM engines built afterwards in this process use :class:`GroupedPunicaWrapperCPU`.

    Call in the prefill worker's process before constructing the engine (the wrapper is
    created when the engine loads the model).  Idempotent.  Raises ``RuntimeError`` if the
    installed vLLM is not 0.32.0 or the replaced interface changed, or if the current
    platform is not vLLM's CPU platform.  ``every_process=True`` (the vLLM plugin, which
    runs in each process vLLM starts) drops the warning about multiprocessing engines.
    """
    global _original_get_punica_wrapper
    with _lock:
        _check_compatibility()
        from vllm.platforms import current_platform
        if not isinstance(current_platform, CpuPlatform):
            raise RuntimeError(
                f"install_grouped_lora: vLLM {vllm.__version__} platform is "
                f"{type(current_platform).__name__}, not CpuPlatform; the grouped LoRA path "
                "is only for the CPU backend")
        if _original_get_punica_wrapper is not None:
            return  # already installed
        if not every_process and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
            logger.warning(
                "install_grouped_lora: VLLM_ENABLE_V1_MULTIPROCESSING is not 0; the patch "
                "only reaches an engine core process that is forked from this one")
        _original_get_punica_wrapper = CpuPlatform.__dict__["get_punica_wrapper"]
        qualname = _our_qualname()

        def get_punica_wrapper(cls) -> str:
            return qualname

        get_punica_wrapper.__doc__ = "Grouped multi-adapter LoRA (lora_kernel.grouped_lora)."
        CpuPlatform.get_punica_wrapper = classmethod(get_punica_wrapper)


def uninstall_grouped_lora() -> None:
    """Restore the stock CPU punica wrapper for engines built afterwards (idempotent).

    Engines that already exist keep the wrapper they were built with.
    """
    global _original_get_punica_wrapper
    with _lock:
        if _original_get_punica_wrapper is None:
            return
        CpuPlatform.get_punica_wrapper = _original_get_punica_wrapper
        _original_get_punica_wrapper = None


def is_grouped_lora_installed() -> bool:
    return _original_get_punica_wrapper is not None
