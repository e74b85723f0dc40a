"""The first token is generated, though it reaches the decode engine in its prompt (step 5).

The decode engine's prompt is ``prompt + [first token]``: the first token came from the
prefill engine, which sampled it under the adapter. Every rule of the request that depends
on the tokens generated so far must count it, or a split request would sample differently
from one engine producing every token. Every request on a decode engine has its first
generated token as the last token of its engine prompt, which is all the two hooks here
need:

- **presence and frequency penalties** (:func:`count_first_token_as_generated`): vLLM counts
  a request's generated tokens; the hook adds the first token to each row's generated
  tokens before vLLM applies its penalties. (The repetition penalty needs nothing: vLLM
  applies it to prompt and generated tokens alike.)
- **structured output** (:func:`start_grammar_after_first_token`): the prefill engine's
  grammar chose the first token; the decode engine's grammar for the request is advanced
  by that token as soon as it is compiled, so the rest continues the same JSON value (or
  regex match, or choice) instead of starting a new one.
"""

from __future__ import annotations

import inspect
from typing import Any

_EXPECTED = ["logits", "sampling_metadata", "output_token_ids"]


def install(engine: Any) -> None:
    """Both hooks, on a decode ``LLMEngine`` (in-process engine core): the penalty rule
    in every model runner (each rank of a tensor-parallel engine samples), the grammar in
    the engine core."""
    engine.collective_rpc(count_first_token_as_generated)
    start_grammar_after_first_token(engine)


def count_first_token_as_generated(worker: Any) -> None:
    """Install on one model runner; ``worker``: what ``engine.collective_rpc`` hands a
    function (vLLM's worker wrapper)."""
    runner = getattr(worker, "worker", worker).model_runner
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


def start_grammar_after_first_token(engine: Any) -> None:
    """Wrap the engine's structured-output manager: each grammar it compiles has accepted
    the request's first token (the last prompt token) before the request runs."""
    manager = engine.engine_core.engine_core.structured_output_manager
    inner = getattr(manager, "_create_grammar", None)
    if inner is None:
        raise RuntimeError("this vLLM has no StructuredOutputManager._create_grammar: the "
                           "decode engine cannot continue a grammar from the first token")

    def create_grammar(request):
        grammar = inner(request)
        first = request.prompt_token_ids[-1]
        if not grammar.accept_tokens(request.request_id, [first]):
            raise ValueError(f"structured output: the first token {first} does not fit the "
                             "request's grammar (was it sampled under a different one?)")
        return grammar

    manager._create_grammar = create_grammar
