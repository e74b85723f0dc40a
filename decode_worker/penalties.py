"""Presence and frequency penalties across the prefill/decode split (step 5, decode engine).

vLLM counts a request's *generated* tokens for presence and frequency penalties. The decode
engine's prompt is ``prompt + [first token]`` (the first token came from the prefill
engine), so left alone it would not count the first token, and a penalized request would
sample differently from one engine producing every token. Every request on a decode engine
has its first generated token as the last token of its engine prompt, so
:func:`count_first_token_as_generated` wraps the engine's sampler to add that token to
each row's generated tokens before vLLM applies its penalties. The repetition penalty needs
nothing: vLLM applies it to prompt and generated tokens alike, and the first token is in
the decode engine's prompt.
"""

from __future__ import annotations

import inspect
from typing import Any

_EXPECTED = ["logits", "sampling_metadata", "output_token_ids"]


def count_first_token_as_generated(engine: Any) -> None:
    """Install on an in-process decode ``LLMEngine`` (``uni`` executor)."""
    runner = engine.model_executor.driver_worker.worker.model_runner
    sampler, batch = runner.sampler, runner.input_batch
    inner = getattr(sampler, "apply_penalties", None)
    if inner is None or list(inspect.signature(inner).parameters) != _EXPECTED:
        raise RuntimeError("this vLLM's Sampler.apply_penalties is not the one the decode "
                           "engine's first-token penalty rule was written for")

    def apply_penalties(logits, sampling_metadata, output_token_ids):
        if sampling_metadata.no_penalties:
            return logits
        return inner(logits, sampling_metadata, with_first_tokens(batch, output_token_ids))

    sampler.apply_penalties = apply_penalties


def with_first_tokens(batch: Any, output_token_ids: list[list[int]]) -> list[list[int]]:
    """Each row's generated tokens with its first token (the last prompt token) in front.
    Row ``i`` of the sampling metadata is row ``i`` of the engine's input batch."""
    rows = []
    for i, out in enumerate(output_token_ids):
        first = int(batch.token_ids_cpu[i, int(batch.num_prompt_tokens[i]) - 1])
        rows.append([first, *out])
    return rows
