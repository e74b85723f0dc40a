"""Training data: JSONL → (prompt token ids, response token ids).

Each line is either ``{"prompt": str, "response": str}`` or a chat
``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` whose last
message is the assistant's answer. A chat's prompt is every message but the last through
the model's chat template, the one the HTTP gateway renders ``/v1/chat/completions`` with
(``preft_client.chat``: the tokenizer's own ``chat_template``, else one block per message and the
reply opened)::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

and its response is ``messages[-1]["content"]``. Prompts are tokenized as the serving engine does
(the tokenizer's own special tokens, ``add_special_tokens=True``); responses without special
tokens, followed by the tokenizer's EOS token unless ``append_eos=False``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from preft_client import DEFAULT_CHAT, ChatTemplate


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]
    response: tuple[int, ...]


def chat_to_pair(messages: list[dict], template: ChatTemplate = DEFAULT_CHAT) -> tuple[str, str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("messages must be a list of at least two messages (…, assistant)")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m.get("role"):
            raise ValueError(f"message {m!r} needs a 'role' and a string 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message's role is {messages[-1]['role']!r}; it must be "
                         "'assistant' (the response to train on)")
    prompt = template.render([{"role": m["role"], "content": m["content"]} for m in messages[:-1]])
    return prompt, messages[-1]["content"]


def read_pairs(path: str | Path,
               template: ChatTemplate = DEFAULT_CHAT) -> list[tuple[str, str]]:
    """Read a JSONL file into (prompt, response) strings, chats through ``template`` (the
    model's: ``preft_client.chat_template_of``); errors name the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "messages" in rec:
                    out.append(chat_to_pair(rec["messages"], template))
                elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
                    out.append((rec["prompt"], rec["response"]))
                else:
                    raise ValueError('expected {"prompt": str, "response": str} or '
                                     '{"messages": [...]}')
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def tokenize(tokenizer, pairs, append_eos: bool = True) -> list[Example]:
    eos = tokenizer.eos_token_id
    out = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if append_eos and eos is not None:
            r = r + [eos]
        if not p or not r:
            raise ValueError(f"empty prompt or response after tokenization: {prompt!r} -> {response!r}")
        out.append(Example(tuple(p), tuple(r)))
    return out


def write_jsonl(path: str | Path, pairs) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for prompt, response in pairs:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return p
