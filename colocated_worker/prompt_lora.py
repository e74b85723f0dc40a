"""Per-token adapter mapping by position: the colocated engine's LoRA-P (steps 3-5 in one).

A colocated engine runs prompt chunks and decode tokens of many users in one batch. vLLM
maps every scheduled token of a request to the request's LoRA slot
(``InputBatch.make_lora_inputs``). PreFT wants the adapter on *prompt* positions only: a
token at position ``p`` of a request with ``n`` prompt tokens gets the request's adapter iff
``p < n``; every generated token gets none (slot id 0), so its rows cost what the base
model's cost, and the grouped kernel (``lora_kernel/grouped_lora.py``) skips them. The
first generated token is sampled from the last prompt position, with the adapter, exactly
as on the prefill/decode path. All-token adapters (kind ``lora``) keep vLLM's mapping:
their ids are in ``all_token_ids``. Only the adapters the mapping uses are activated in a
slot (:func:`active_requests`): a decoding request holds none.

Positions are what vLLM's model runner computes in ``_prepare_inputs``:
``num_computed_tokens_cpu[i] + 0..num_scheduled_tokens[i]-1``. The hook replaces
``make_lora_inputs`` on the runner's ``InputBatch`` instance (no vLLM file is changed); it
is installed only on a vLLM whose method has the signature it was written against.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

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


def prompt_only_mapping(lora_ids: np.ndarray, num_computed: np.ndarray,
                        num_prompt: np.ndarray, num_scheduled: np.ndarray,
                        num_sampled: np.ndarray, all_token: set[int]):
    """(per sampled token, per scheduled token) LoRA ids: the request's id at prompt
    positions (or everywhere for an all-token adapter), 0 at generated positions."""
    keep_all = np.array([int(i) in all_token for i in lora_ids], dtype=bool)
    req = np.repeat(np.arange(len(lora_ids)), num_scheduled)
    starts = np.cumsum(num_scheduled) - num_scheduled
    pos = num_computed[req] + (np.arange(int(num_scheduled.sum())) - starts[req])
    on = keep_all[req] | (pos < num_prompt[req])
    tokens = np.where(on, lora_ids[req], 0)
    # a sampled token comes from the request's last scheduled position
    last = num_computed + num_scheduled - 1
    sample_on = keep_all | (last < num_prompt)
    sampled = np.repeat(np.where(sample_on, lora_ids, 0), num_sampled)
    return tuple(int(x) for x in sampled), tuple(int(x) for x in tokens)


def active_requests(requests, sampled: tuple[int, ...], tokens: tuple[int, ...]) -> set:
    """The LoRA requests a step's mapping uses: those with a token (or a sampled token) on
    them. A request whose scheduled tokens are all generated needs no slot, so its adapter
    leaves the active set (``colocated_worker/prompt_slots.py`` stops counting it in the
    scheduler) and vLLM's slot LRU may give the slot to the next prompt's adapter."""
    used = set(sampled) | set(tokens)
    return {r for r in requests if r is not None and r.lora_int_id in used}


def install_prompt_only_lora(engine: Any, all_token_ids: set[int],
                             mix: StepMix | None = None) -> None:
    """Install on every model runner of an ``LLMEngine`` with LoRA enabled: in-process
    (``uni`` executor), where ``all_token_ids`` and ``mix`` are the caller's own objects
    (LoRA int ids added there later keep the adapter on every token), or on each rank of
    a tensor-parallel engine, which gets copies: :func:`add_all_token` and
    :func:`step_mix` reach those."""
    engine.collective_rpc(_install_on_runner, args=(all_token_ids, mix))


def _runner(worker: Any):
    return getattr(worker, "worker", worker).model_runner


def _install_on_runner(worker: Any, all_token_ids: set[int], mix: StepMix | None) -> None:
    runner = _runner(worker)
    batch = runner.input_batch
    orig = getattr(batch, "make_lora_inputs", None)
    if orig is None or list(inspect.signature(orig).parameters) != _EXPECTED_PARAMS:
        raise RuntimeError("this vLLM's InputBatch.make_lora_inputs is not the one the "
                           "prompt-only LoRA mapping was written for; colocated workers "
                           "cannot apply adapters to prompt positions only")

    def make_lora_inputs(num_scheduled_tokens, num_sampled_tokens):
        _, _, requests = orig(num_scheduled_tokens, num_sampled_tokens)
        n = batch.num_reqs
        if mix is not None:
            mix.record(batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n])
        sampled, tokens = prompt_only_mapping(
            batch.request_lora_mapping[:n], batch.num_computed_tokens_cpu[:n],
            batch.num_prompt_tokens[:n], np.asarray(num_scheduled_tokens),
            np.asarray(num_sampled_tokens), all_token_ids)
        return sampled, tokens, active_requests(requests, sampled, tokens)

    batch.make_lora_inputs = make_lora_inputs
    runner.preft_prompt_lora = (all_token_ids, mix)


def _add_on_runner(worker: Any, lora_id: int) -> None:
    _runner(worker).preft_prompt_lora[0].add(lora_id)


def _mix_of_runner(worker: Any) -> StepMix | None:
    return _runner(worker).preft_prompt_lora[1]


def add_all_token(engine: Any, lora_id: int) -> None:
    """Engine thread, tensor-parallel engines: every rank keeps ``lora_id`` on all tokens
    (before the request that uses it is added)."""
    engine.collective_rpc(_add_on_runner, args=(lora_id,))


def step_mix(engine: Any) -> StepMix | None:
    """Engine thread, tensor-parallel engines: rank 0's step counts (every rank sees the
    same batches)."""
    return engine.collective_rpc(_mix_of_runner)[0]
