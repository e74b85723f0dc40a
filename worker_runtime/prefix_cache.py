"""What an engine that decodes may put in its prefix cache: prompt blocks only.

PreFT's rule: KV computed *without* the adapter is never served as adapter-conditioned
prompt KV. An engine that decodes computes the KV of generated tokens with the base model,
and vLLM would cache every full block of a request -- generated tokens included -- under
the request's cache salt (the adapter version). A chat's next turn, whose prompt contains
the previous answer, would then hit those blocks and attend to base-model KV at positions
that PreFT says are prompt positions, computed with the adapter.

:func:`cache_only_prompt_blocks` wraps the engine's KV cache coordinator so a request's
blocks are cached only up to the last full block of its adapter-conditioned prompt. The
decode engine's prompt is ``prompt + [first token]`` (the first token's KV is computed
there, by the base model), so it passes ``generated_in_prompt=1``. Blocks pulled from
prefill stay cacheable: a later request with the same adapter version and prefix reuses
them, and the next turn recomputes the previous answer's positions with the adapter.
"""

from __future__ import annotations

from typing import Any


def cacheable_tokens(num_prompt_tokens: int, num_tokens: int, generated_in_prompt: int) -> int:
    """How many of ``num_tokens`` may be cached: never past the adapter-conditioned prompt."""
    return max(0, min(num_tokens, num_prompt_tokens - generated_in_prompt))


def cache_only_prompt_blocks(engine: Any, generated_in_prompt: int) -> None:
    """Install the rule on an in-process ``LLMEngine`` (``uni`` executor).

    vLLM caches through ``KVCacheCoordinator.cache_blocks(request, num_tokens)`` (after
    allocating slots, and after an external KV load completes); clamping ``num_tokens`` there
    covers both paths.
    """
    manager = engine.engine_core.engine_core.scheduler.kv_cache_manager
    coordinator = getattr(manager, "coordinator", None)
    inner = getattr(coordinator, "cache_blocks", None)
    if inner is None:
        raise RuntimeError("this vLLM has no KVCacheCoordinator.cache_blocks: the prompt-only "
                           "prefix-cache rule cannot be installed; disable prefix caching")

    def cache_blocks(request, num_computed_tokens: int) -> None:
        inner(request, cacheable_tokens(request.num_prompt_tokens, num_computed_tokens,
                                        generated_in_prompt))

    coordinator.cache_blocks = cache_blocks
