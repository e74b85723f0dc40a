"""A request's prompt as an engine sees it: token ids, checked against the model's limits.

Step 3 (prefill and colocated workers): the router sends text or token ids; the worker
that owns the tokenizer turns them into ids and refuses what the engine cannot run, with
the field to fix.
"""

from __future__ import annotations

from typing import Any

from cluster.errors import InvalidRequest
from cluster.messages import PrefillRequest


def prompt_ids(req: PrefillRequest, tokenizer: Any, vocab_size: int) -> list[int]:
    if req.prompt_token_ids is not None:
        ids = list(req.prompt_token_ids)
        if not ids:
            raise InvalidRequest("prompt_token_ids", "the prompt is empty")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise InvalidRequest("prompt_token_ids", f"token id {bad[0]} is outside the "
                                 f"vocabulary [0, {vocab_size})")
        return ids
    if not req.prompt_text:
        raise InvalidRequest("prompt", "the prompt is empty")
    ids = tokenizer.encode(req.prompt_text, add_special_tokens=True)
    if not ids:
        raise InvalidRequest("prompt", "the prompt has no tokens")
    return ids


def check_lengths(n_prompt: int, max_tokens: int, max_len: int) -> None:
    if n_prompt >= max_len:
        raise InvalidRequest("prompt", f"the prompt has {n_prompt} tokens; this model "
                             f"accepts at most {max_len - 1} prompt tokens")
    if n_prompt + max_tokens > max_len:
        raise InvalidRequest("max_tokens", f"prompt ({n_prompt} tokens) + max_tokens "
                             f"({max_tokens}) exceeds max_model_len={max_len}; lower "
                             f"max_tokens to at most {max_len - n_prompt}")
