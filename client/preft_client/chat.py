"""One chat format: how a list of messages becomes the prompt text a model is given.

The HTTP gateway's ``/v1/chat/completions``, ``preft train``'s chat data and any SDK user
(``chat_template_of(model_dir).render(messages)``, then ``generate(prompt=...)``) render
through :meth:`ChatTemplate.render`, so a chat is served exactly as it was trained:

* the model's own ``chat_template`` when its tokenizer has one (``chat_template.jinja`` next
  to it, or ``chat_template`` in ``tokenizer_config.json``), rendered as transformers'
  ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)`` renders it
  (jinja2 in a sandbox, ``trim_blocks``, ``lstrip_blocks``, ``bos_token``, ``eos_token``,
  ``raise_exception``, ``tojson``), without importing transformers;
* else :data:`DEFAULT_TEMPLATE`, one block per message, then the reply's opening::

      <|system|>\\n{system text}\\n<|user|>\\n{user text}\\n<|assistant|>\\n

Messages are ``{"role": str, "content": str}``. :func:`chat_template_of` compiles the
template when it reads it, so a template jinja2 cannot parse is a :class:`ChatTemplateError`
at start-up, not an error per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
                    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or parsed (names the file)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it may name; ``source`` says where it came
    from (a file, or ``"default"``)."""

    template: str = DEFAULT_CHAT_TEMPLATE
    source: str = "default"
    bos_token: str = ""
    eos_token: str = ""
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_compiled", _compile(self.template))
        except Exception as e:   # jinja2.TemplateSyntaxError and friends
            raise ChatTemplateError(f"chat template from {self.source}: jinja2 cannot parse it: "
                              f"{e}") from None

    def __reduce__(self):
        """Pickled as its fields (Ray Serve pickles the gateway's app); compiled again."""
        return (ChatTemplate, (self.template, self.source, self.bos_token, self.eos_token))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (then the assistant's turn opened)."""
        return self._compiled.render(messages=messages, bos_token=self.bos_token,
                                     eos_token=self.eos_token,
                                     add_generation_prompt=add_generation_prompt)


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    """As transformers compiles chat templates (``_compile_jinja_template``)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


DEFAULT_CHAT = ChatTemplate()


def _token(value) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


def chat_template_of(model_dir: str | Path) -> ChatTemplate:
    """The model's own chat template, or :data:`DEFAULT_CHAT` when its tokenizer has none."""
    d = Path(model_dir)
    cfg_file = d / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"{cfg_file} is not readable JSON: {e}") from None
    tokens = dict(bos_token=_token(cfg.get("bos_token")), eos_token=_token(cfg.get("eos_token")))
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(), str(jinja), **tokens)
    t = cfg.get("chat_template")
    if isinstance(t, list):   # named templates: the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if isinstance(t, str) and t:
        return ChatTemplate(t, str(cfg_file), **tokens)
    return DEFAULT_CHAT
