"""Adapter spans: which positions of a request its adapter applies to (steps 3-5, one engine).

One rule serves every adapter kind a colocated engine runs: a request's adapter applies on
positions ``[start, end)``.

* LoRA-P and ReFT-P (PreFT): ``[0, prompt_len)``, the prompt only;
* all-token LoRA (kind ``lora``): ``[0, OPEN)``, every token;
* activated LoRA (kind ``alora``): ``[invocation_start, OPEN)``, from the last occurrence of
  the adapter's invocation tokens in the prompt on (PEFT's rule,
  ``peft.tuners.lora.variants.calculate_alora_offsets``). A prompt without them is served
  by the base model alone, as PEFT's own forward does (:func:`request_span` returns None).

The worker computes a request's span once, before the request enters the engine, and the
span travels inside the request's ``SamplingParams.extra_args`` (:data:`SPAN_ARG`), so the
scheduler (adapter slots, ``prompt_slots.py``), the model runner of every rank (the
per-token LoRA mapping, ``prompt_lora.py``) and the prefix-cache keys
(:func:`install_span_block_keys`) all read the same two numbers. A request without the
argument has no adapter span: it is a base request.

Prefix-cache keys by span: a KV block wholly before ``start`` was computed without the
adapter, so it is keyed as the base model's (vLLM's LoRA key dropped; the request's cache
salt is the base namespace): shared with base requests and with every other aLoRA over the
same context. A block that reaches ``start`` keeps vLLM's key, which carries the adapter's
versioned name, so no block from the invocation on is shared between adapters or versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SPAN_ARG = "preft_adapter_span"
OPEN = 1 << 62          # an open end: the adapter applies to every later position
PROMPT_ONLY_KINDS = ("lora_p", "reft_p")
ALL_TOKEN_KIND = "lora"
ACTIVATED_KIND = "alora"


def invocation_start(prompt: Sequence[int], invocation: Sequence[int]) -> int | None:
    """Start of the last occurrence of ``invocation`` in ``prompt`` (None: absent)."""
    m = len(invocation)
    if m == 0:
        return None
    inv = list(invocation)
    first = inv[0]
    for i in range(len(prompt) - m, -1, -1):
        if prompt[i] == first and list(prompt[i:i + m]) == inv:
            return i
    return None


def request_span(kind: str, prompt: Sequence[int],
                 invocation: Sequence[int] = ()) -> tuple[int, int] | None:
    """A request's adapter span, or None when no position takes the adapter (an aLoRA
    prompt without its invocation tokens: the base model serves it)."""
    if kind in PROMPT_ONLY_KINDS:
        return 0, len(prompt)
    if kind == ALL_TOKEN_KIND:
        return 0, OPEN
    if kind == ACTIVATED_KIND:
        start = invocation_start(prompt, invocation)
        return None if start is None else (start, OPEN)
    raise ValueError(f"adapter kind {kind!r} has no span rule")


def span_of(sampling_params: Any) -> tuple[int, int] | None:
    """The span a request carries (``SamplingParams`` of a scheduler request or a runner's
    cached request state), or None for a base request."""
    extra = getattr(sampling_params, "extra_args", None)
    span = extra.get(SPAN_ARG) if extra else None
    if span is None:
        return None
    return int(span[0]), int(span[1])


def cache_parts(span: tuple[int, int] | None, num_prompt: int,
                num_cached: int) -> tuple[int, int, int, int]:
    """(base queried, base hit, adapter queried, adapter hit) prompt tokens of a request's
    prefix-cache lookup: positions before the span's start are the base model's."""
    start = num_prompt if span is None else min(span[0], num_prompt)
    return (start, min(num_cached, start), num_prompt - start, max(0, num_cached - start))


class SpanTable:
    """A model runner's spans by request id, filled from each request's state on first
    sight (one dictionary read per adapter row and step after that)."""

    def __init__(self) -> None:
        self._spans: dict[str, tuple[int, int]] = {}

    def arrays(self, req_ids: Sequence[str], lora_ids, requests: dict):
        """(start, end) arrays for the batch's rows; rows without an adapter get (0, 0)."""
        import numpy as np

        n = len(lora_ids)
        starts, ends = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for i in np.flatnonzero(lora_ids):
            rid = req_ids[i]
            span = self._spans.get(rid)
            if span is None:
                span = self._learn(rid, requests)
            starts[i], ends[i] = span
        return starts, ends

    def _learn(self, rid: str, requests: dict) -> tuple[int, int]:
        if len(self._spans) > 2 * len(requests) + 64:   # requests that left the engine
            self._spans = {k: v for k, v in self._spans.items() if k in requests}
        state = requests.get(rid)
        # A LoRA request without a span was not submitted by a worker: its adapter applies
        # nowhere (never the adapter where the worker did not ask for it).
        span = span_of(getattr(state, "sampling_params", None)) or (0, 0)
        self._spans[rid] = span
        return span


def block_keys_without_adapter(keys: tuple | None) -> tuple | None:
    """vLLM's extra keys of a block less its LoRA key (a block computed without the
    adapter)."""
    if keys is None:
        return None
    kept = tuple(k for k in keys if not (isinstance(k, tuple) and k and k[0] == "lora"))
    return kept or None


def install_span_block_keys() -> None:
    """Key prefix-cache blocks by span (this process's vLLM, once). Checked against the
    function it wraps: vLLM's ``generate_block_hash_extra_keys(request, start, end,
    start_mm_idx)`` with its LoRA key ``("lora", name, path)``."""
    import inspect

    from vllm.v1.core import kv_cache_utils as kcu

    orig = kcu.generate_block_hash_extra_keys
    if getattr(orig, "preft_span_keys", False):
        return
    params = list(inspect.signature(orig).parameters)
    lora_src = inspect.getsource(kcu._gen_lora_extra_hash_keys)
    if params != ["request", "start_token_idx", "end_token_idx", "start_mm_idx"] or \
            '("lora", lora_request.lora_name, lora_request.lora_path)' not in lora_src:
        raise RuntimeError("this vLLM's block-hash keys are not the ones adapter spans were "
                           "written for; colocated workers cannot key the prefix cache by span")

    def keys(request, start_token_idx: int, end_token_idx: int, start_mm_idx: int):
        extra, mm_idx = orig(request, start_token_idx, end_token_idx, start_mm_idx)
        span = span_of(request.sampling_params) if request.lora_request else None
        if span is not None and end_token_idx <= span[0]:
            extra = block_keys_without_adapter(extra)
        return extra, mm_idx

    keys.preft_span_keys = True
    kcu.generate_block_hash_extra_keys = keys
