"""One request's tokens on an engine, by PreFT's rules: the prompt that goes in, what the
engine may cache of it, and the output stream that comes out.

Steps 3-5 of the request path (prefill, decode and colocated workers) all use it.

**Prompt** (:func:`prompt_ids`, :func:`check_lengths`). The router sends text or token ids;
the worker that owns the tokenizer turns them into ids and refuses what the engine cannot
run, with the field to fix.

**Prefix cache: prompt blocks only** (:func:`cache_only_prompt_blocks`). KV computed
*without* the adapter is never served as adapter-conditioned prompt KV. An engine that
decodes computes the KV of generated tokens with the base model, and vLLM would cache every
full block of a request -- generated tokens included -- under the request's cache salt (the
adapter version). A chat's next turn, whose prompt contains the previous answer, would then
hit those blocks and attend to base-model KV at positions that PreFT says are prompt
positions, computed with the adapter. So a request's blocks are cached only up to the last
full block of its adapter-conditioned prompt. The decode engine's prompt is ``prompt +
[first token]`` (the first token's KV is computed there, by the base model), so it passes
``generated_in_prompt=1``. Blocks pulled from prefill stay cacheable: a later request with
the same adapter version and prefix reuses them, and the next turn recomputes the previous
answer's positions with the adapter.

**Output stream** (:class:`OutputStream`). The first token comes from the prefill engine
and the rest from the decode engine, which receives the first token as part of its
*prompt*: whatever an engine does with generated tokens (detokenize them incrementally,
check stop strings over their text) it would do wrongly at that seam -- the decode
engine's detokenizer is primed with the prompt and never sees the first token as output.
So neither engine detokenizes or checks stop strings (``detokenize=False``, no ``stop``);
the worker feeds each generated token, the first included, to an :class:`OutputStream`:

- text: vLLM's own incremental detokenizer over the *generated* ids alone (special tokens
  skipped, as vLLM does), so a completion's text is exactly a single vLLM engine's: the
  tokenizer's decoding of its token ids, less a trailing incomplete UTF-8 character (vLLM
  holds back text that ends in U+FFFD, and never flushes it);
- stop strings: vLLM's own check over the whole generated text, first token included: the
  text is cut before the stop string, tokens after the one that completed it are dropped,
  and while a stop string could still be completing, the last ``len(stop) - 1`` characters
  are held back (exactly what a single vLLM engine streams). With ``min_tokens``, vLLM's
  rule: nothing is checked until the completion has more than ``min_tokens`` tokens, and
  then only text after the ``min_tokens``-th token's text (a stop string that ended
  earlier never stops it). The stream counts every generated token, the first (prefill's)
  included, so the split counts as one engine does; the engines' own ``min_tokens`` (EOS
  and stop token ids) are split as 1 for prefill and ``min_tokens - 1`` for decode.

The stream is a pure function of the tokens fed to it, so the prefill worker feeds the
first token and the decode worker replays it (discarding what prefill already sent) before
it feeds the rest: both sides hold the same state without shipping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from cluster.errors import InvalidRequest
from cluster.messages import PrefillRequest, Sampling, TokenLogprob


# ------------------------------------------------------------------ prompt
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


def check_sampling_ids(s: Sampling, vocab_size: int) -> None:
    """Token ids in ``logit_bias`` and ``stop_token_ids`` must be in the vocabulary."""
    for field, ids in (("sampling.logit_bias", [t for t, _ in s.logit_bias]),
                       ("sampling.stop_token_ids", s.stop_token_ids)):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise InvalidRequest(field, f"token id {bad[0]} is outside the vocabulary "
                                 f"[0, {vocab_size})")


def check_lengths(n_prompt: int, max_tokens: int, max_len: int) -> None:
    if n_prompt >= max_len:
        raise InvalidRequest("prompt", f"the prompt has {n_prompt} tokens; this model "
                             f"accepts at most {max_len - 1} prompt tokens")
    if n_prompt + max_tokens > max_len:
        raise InvalidRequest("max_tokens", f"prompt ({n_prompt} tokens) + max_tokens "
                             f"({max_tokens}) exceeds max_model_len={max_len}; lower "
                             f"max_tokens to at most {max_len - n_prompt}")


# ------------------------------------------------------------------ engine sampling
def engine_params(s: Sampling, *, max_tokens: int, min_tokens: int, seed: int | None,
                  delta: bool, prompt_logprobs: bool = False, extra: dict | None = None):
    """vLLM ``SamplingParams`` for the part of a request one engine produces (``max_tokens``
    and ``min_tokens`` of its own share). Every knob is the request's, so the first token
    (prefill) and the rest (decode) are sampled by the same rules. No detokenization and no
    stop strings in the engine: the request's :class:`OutputStream` owns both."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=max_tokens, min_tokens=min_tokens, temperature=s.temperature,
        top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, seed=seed,
        repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, logit_bias=dict(s.logit_bias) or None,
        stop_token_ids=list(s.stop_token_ids) or None, ignore_eos=s.ignore_eos,
        logprobs=s.logprobs, prompt_logprobs=s.prompt_logprobs if prompt_logprobs else None,
        detokenize=False, extra_args=extra or None, structured_outputs=structured_output(s),
        output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)


def structured_output(s: Sampling):
    """vLLM's ``StructuredOutputsParams`` of the request's guide (None without one). JSON
    comes out compact (every engine is built with ``disable_any_whitespace``), so a
    completion cannot spend its tokens on whitespace."""
    if not s.guide:
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams

    value = {"json": lambda: s.guide_spec, "regex": lambda: s.guide_spec,
             "choice": lambda: json.loads(s.guide_spec), "json_object": lambda: True,
             "grammar": lambda: s.guide_spec}[s.guide]()
    return StructuredOutputsParams(**{s.guide: value})


def token_logprobs(token_ids, positions, k: int | None,
                   tokenizer: Any = None) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position logprob dicts (``{token id: Logprob}``) for ``token_ids`` as
    :class:`TokenLogprob` items; ``k``: how many alternatives were asked for (None: none
    asked, nothing returned). With a ``tokenizer``, each token's text as vLLM writes it."""
    if k is None or positions is None:
        return ()
    out = []
    for tok, pos in zip(token_ids, positions):
        top = sorted(((t, lp) for t, lp in pos.items() if lp.rank <= k), key=lambda x: x[1].rank)
        mine = pos[tok]
        out.append(TokenLogprob(int(tok), float(mine.logprob), int(mine.rank),
                                tuple((int(t), float(lp.logprob)) for t, lp in top)))
    return _with_text(out, tokenizer) if tokenizer is not None else tuple(out)


def _with_text(items: list[TokenLogprob], tokenizer: Any) -> tuple[TokenLogprob, ...]:
    from dataclasses import replace

    from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens

    ids = [t.token_id for t in items] + [i for t in items for i, _ in t.top]
    text = iter(convert_ids_list_to_tokens(tokenizer, ids))
    named = [replace(t, token=next(text)) for t in items]
    return tuple(replace(t, top_tokens=tuple(next(text) for _ in t.top)) for t in named)


def prompt_logprobs(prompt_ids: list[int], out: Any, k: int | None,
                    tokenizer: Any = None) -> tuple[TokenLogprob, ...]:
    """One item per prompt position; the first has no logprob (rank 0, as no model
    predicts it)."""
    positions = getattr(out, "prompt_logprobs", None)
    if k is None or not positions:
        return ()
    items = [TokenLogprob(prompt_ids[0], 0.0, 0),
             *token_logprobs(prompt_ids[1:], positions[1:], k)]
    return _with_text(items, tokenizer) if tokenizer is not None else tuple(items)


def prompt_text(s: Sampling, prompt_ids: list[int], tokenizer: Any) -> str:
    """The prompt's decoding when the request echoes it (special tokens kept, as vLLM's
    OpenAI server echoes a token prompt)."""
    return tokenizer.decode(prompt_ids, skip_special_tokens=False) if s.echo else ""


# ------------------------------------------------------------------ prefix cache
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


# ------------------------------------------------------------------ output stream
@dataclass(frozen=True)
class StreamStep:
    """What one batch of new tokens adds to the client's stream."""

    token_ids: tuple[int, ...]     # the new tokens kept (none after a stop string's token)
    text: str                      # the text delta to send now
    finish_reason: str | None      # "stop" | "length" | None (still generating)


class OutputStream:
    def __init__(self, tokenizer: Any, sampling: Sampling, request_id: str) -> None:
        from vllm import SamplingParams
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        # min_tokens: the request's own (the stream sees every generated token, the first
        # included), so stop strings count from where one vLLM engine counts them.
        params = SamplingParams(max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
                                min_tokens=sampling.min_tokens, skip_special_tokens=True)
        # Only the generated ids: no prompt context, so the text decodes the ids alone.
        request = SimpleNamespace(request_id=request_id, sampling_params=params,
                                  prompt_token_ids=[], prompt_embeds=None)
        self._detok = IncrementalDetokenizer.from_new_request(tokenizer, request)
        self._sent_tokens = 0
        self._sent_text = ""
        self.finish_reason: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return list(self._detok.output_token_ids)

    @property
    def text(self) -> str:
        return self._sent_text

    def append(self, token_ids, engine_finish: str | None) -> StreamStep:
        """Feed the engine's new tokens and its finish reason for them (``"stop"``: the last
        token is EOS, ``"length"``: max_tokens reached, None: still running)."""
        if self.finish_reason is not None:
            raise RuntimeError("append() after the stream finished")
        stop_string = self._detok.update(list(token_ids), engine_finish == "stop")
        finish = "stop" if stop_string is not None else engine_finish
        ids = self._detok.output_token_ids
        new_ids = tuple(ids[self._sent_tokens:])
        self._sent_tokens = len(ids)
        text = self._detok.get_next_output_text(finished=finish is not None, delta=True)
        self._sent_text += text
        self.finish_reason = finish
        return StreamStep(new_ids, text, finish)
