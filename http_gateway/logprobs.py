"""Logprobs in OpenAI's two shapes, from the SDK's :class:`~preft_client.TokenLogprob` items.

``/v1/completions`` (``logprobs: k``): ``tokens``, ``token_logprobs``, ``top_logprobs``
(``{token text: logprob}``: the top k and the token itself, as vLLM answers) and
``text_offset`` (where each token's text starts in the choice's text). With ``echo`` the
prompt's tokens come first; the prompt's first token has no logprob (``null``: the SDK
marks it with rank 0). ``/v1/chat/completions`` (``logprobs: true``, ``top_logprobs: k``):
``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``.
A stream sends each chunk's tokens in the same shape.
"""

from __future__ import annotations

from preft_client import TokenLogprob


class CompletionLogprobs:
    """The completions shape, one block per response or stream chunk; ``text_offset``
    continues across the blocks of one choice."""

    def __init__(self) -> None:
        self.offset = 0

    def block(self, items: tuple[TokenLogprob, ...]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in items:
            known = t.rank > 0       # rank 0: the prompt's first token, no logprob
            out["tokens"].append(t.token)
            out["token_logprobs"].append(t.logprob if known else None)
            out["top_logprobs"].append(_top_dict(t) if known else None)
            out["text_offset"].append(self.offset)
            self.offset += len(t.token)
        return out


def _top_dict(t: TokenLogprob) -> dict[str, float]:
    top = {text: lp for text, (_, lp) in zip(t.top_tokens, t.top)}
    top.setdefault(t.token, t.logprob)
    return top


def chat_logprobs(items: tuple[TokenLogprob, ...]) -> dict:
    return {"content": [_chat_item(t.token, t.logprob) | {
        "top_logprobs": [_chat_item(text, lp) for text, (_, lp) in zip(t.top_tokens, t.top)]}
        for t in items]}


def _chat_item(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
