"""One request's output stream: every generated token's text and stop checks, in one place.

Steps 3 and 5 of the request path share it. The first token comes from the prefill engine
and the rest from the decode engine, which receives the first token as part of its
*prompt*: whatever an engine does with generated tokens (detokenize them incrementally,
check stop strings over their text) it would do wrongly at that seam -- the decode
engine's detokenizer is primed with the prompt and never sees the first token as output.
So neither engine detokenizes or checks stop strings (``detokenize=False``, no ``stop``);
the worker feeds each generated token, the first included, to an :class:`OutputStream`:

- text: vLLM's own incremental detokenizer over the *generated* ids alone (special tokens
  skipped, as vLLM does); a finish that is not a stop string flushes the rest, so a
  completion's text is the tokenizer's decoding of its token ids;
- stop strings: vLLM's own check over the whole generated text, first token included: the
  text is cut before the stop string, tokens after the one that completed it are dropped,
  and while a stop string could still be completing, the last ``len(stop) - 1`` characters
  are held back (exactly what a single vLLM engine streams).

The stream is a pure function of the tokens fed to it, so the prefill worker feeds the
first token and the decode worker replays it (discarding what prefill already sent) before
it feeds the rest: both sides hold the same state without shipping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from cluster.messages import Sampling


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

        params = SamplingParams(max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
                                skip_special_tokens=True)
        # Only the generated ids: no prompt context, so the text decodes the ids alone.
        request = SimpleNamespace(request_id=request_id, sampling_params=params,
                                  prompt_token_ids=[], prompt_embeds=None)
        self._tokenizer = tokenizer
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
        if finish is not None and stop_string is None:
            text = self._flush(text)
        self._sent_text += text
        self.finish_reason = finish
        return StreamStep(new_ids, text, finish)

    def _flush(self, text: str) -> str:
        """At a finish that is not a stop string: the rest of the ids' decoding (incremental
        detokenizers hold back a trailing incomplete UTF-8 character forever)."""
        full = self._tokenizer.decode(list(self._detok.output_token_ids),
                                      skip_special_tokens=True)
        sent = self._sent_text + text
        return full[len(self._sent_text):] if full.startswith(sent) else text
