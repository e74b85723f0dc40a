"""Per-token adapter mapping by span: the colocated engine's adapters (steps 3-5 in one).

A colocated engine runs prompt chunks and decode tokens of many users in one batch. vLLM
maps every scheduled token of a request to the request's LoRA slot
(``InputBatch.make_lora_inputs``). Here a token at position ``p`` gets the request's adapter
iff ``p`` lies in the request's adapter span ``[start, end)``
(``colocated_worker/adapter_span.py``): LoRA-P ``[0, prompt_len)``, all-token LoRA every
position, activated LoRA from its invocation on. Every other token gets none (slot id 0), so
its rows cost what the base model's cost, and the grouped kernel
(``lora_kernel/grouped_lora.py``) skips them. A sampled token comes from the request's last
scheduled position and takes that position's adapter: PreFT's first generated token is
sampled with the adapter, exactly as on the prefill/decode path. Only the adapters the
mapping uses are activated in a slot (:func:`active_requests`): a request decoding past its
span holds none.

Positions are what vLLM's model runner computes in ``_prepare_inputs``:
``num_computed_tokens_cpu[i] + 0..num_scheduled_tokens[i]-1``. The spans come from each
request's own state on the runner (``SamplingParams.extra_args``), so every rank of a
tensor-parallel engine reads the same ones. The hook replaces ``make_lora_inputs`` on the
runner's ``InputBatch`` instance (no vLLM file is changed); it is installed only on a vLLM
whose method has the signature it was written against.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from colocated_worker.adapter_span import SpanTable

_EXPECTED_PARAMS = ["num_scheduled_tokens", "num_sampled_tokens"]


class StepMix:
    """Engine steps seen, and those that held both a prompt chunk of one request and a
    generated token of another (the shape colocation exists for)."""

    def __init__(self) -> None:
        self.steps = 0
        self.mixed = 0

    def record(self, num_computed: np.ndarray, num_prompt: np.ndarray) -> None:
        self.steps += 1
        decoding = num_computed >= num_prompt
        if decoding.any() and (~decoding).any():
            self.mixed += 1


def span_mapping(lora_ids: np.ndarray, span_start: np.ndarray, span_end: np.ndarray,
                 num_computed: np.ndarray, num_scheduled: np.ndarray,
                 num_sampled: np.ndarray):
    """(per sampled token, per scheduled token) LoRA ids: the request's id at positions in
    its span ``[span_start, span_end)``, 0 elsewhere."""
    req = np.repeat(np.arange(len(lora_ids)), num_scheduled)
    starts = np.cumsum(num_scheduled) - num_scheduled
    pos = num_computed[req] + (np.arange(int(num_scheduled.sum())) - starts[req])
    on = (pos >= span_start[req]) & (pos < span_end[req])
    tokens = np.where(on, lora_ids[req], 0)
    # a sampled token comes from the request's last scheduled position
    last = num_computed + num_scheduled - 1
    sample_on = (last >= span_start) & (last < span_end)
    sampled = np.repeat(np.where(sample_on, lora_ids, 0), num_sampled)
    return tuple(int(x) for x in sampled), tuple(int(x) for x in tokens)


def active_requests(requests, sampled: tuple[int, ...], tokens: tuple[int, ...]) -> set:
    """The LoRA requests a step's mapping uses: those with a token (or a sampled token) on
    them. A request whose scheduled tokens are all generated needs no slot, so its adapter
    leaves the active set (``colocated_worker/prompt_slots.py`` stops counting it in the
    scheduler) and vLLM's slot LRU may give the slot to the next prompt's adapter."""
    used = set(sampled) | set(tokens)
    return {r for r in requests if r is not None and r.lora_int_id in used}


def install_span_lora(engine: Any, mix: StepMix | None = None) -> None:
    """Install on every model runner of an ``LLMEngine`` with LoRA enabled: in-process
    (``uni`` executor), where ``mix`` is the caller's own object, or on each rank of a
    tensor-parallel engine, which gets a copy (:func:`step_mix` reaches it)."""
    engine.collective_rpc(_install_on_runner, args=(mix,))


def _runner(worker: Any):
    return getattr(worker, "worker", worker).model_runner


def _install_on_runner(worker: Any, mix: StepMix | None) -> None:
    runner = _runner(worker)
    batch = runner.input_batch
    orig = getattr(batch, "make_lora_inputs", None)
    if orig is None or list(inspect.signature(orig).parameters) != _EXPECTED_PARAMS:
        raise RuntimeError("this vLLM's InputBatch.make_lora_inputs is not the one the "
                           "adapter-span mapping was written for; colocated workers cannot "
                           "apply adapters by span")
    spans = SpanTable()

    def make_lora_inputs(num_scheduled_tokens, num_sampled_tokens):
        _, _, requests = orig(num_scheduled_tokens, num_sampled_tokens)
        n = batch.num_reqs
        if mix is not None:
            mix.record(batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n])
        lora_ids = batch.request_lora_mapping[:n]
        span_start, span_end = spans.arrays(batch.req_ids, lora_ids, runner.requests)
        sampled, tokens = span_mapping(
            lora_ids, span_start, span_end, batch.num_computed_tokens_cpu[:n],
            np.asarray(num_scheduled_tokens), np.asarray(num_sampled_tokens))
        return sampled, tokens, active_requests(requests, sampled, tokens)

    batch.make_lora_inputs = make_lora_inputs
    runner.preft_span_lora = mix


def _mix_of_runner(worker: Any) -> StepMix | None:
    return _runner(worker).preft_span_lora


def step_mix(engine: Any) -> StepMix | None:
    """Engine thread, tensor-parallel engines: rank 0's step counts (every rank sees the
    same batches)."""
    return engine.collective_rpc(_mix_of_runner)[0]
