"""The OpenAI request bodies the gateway accepts, and how a bad one is answered.

Bodies are pydantic models: unknown fields (``user``, ...) are ignored, OpenAI fields we do
not implement are refused with 400 unless left at their default (``_UNSUPPORTED``), and every
validation error becomes a 400 whose message starts with the offending field
(:func:`validation_error`). Chat messages become one prompt (:func:`format_chat`) through
the model's chat template, the one ``preft train`` uses (``preft_client.chat``); without one::

    <|system|>\\n{system text}\\n<|user|>\\n{user text}\\n<|assistant|>\\n{reply}\\n ... <|assistant|>\\n
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from preft_client import DEFAULT_CHAT, ChatTemplate

from http_gateway.errors import GatewayError

NonNegInt = Annotated[int, Field(ge=0, lt=2**32)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension; accepted, not used


# OpenAI fields we accept only at their default: field -> (refused(value), message).
_UNSUPPORTED = {
    "suffix": (bool, "suffix is not supported"),
    "tools": (bool, "tools are not supported (no tool-call parser); for structured output "
                    "use response_format {'type': 'json_schema', 'json_schema': {'schema': "
                    "...}} or {'type': 'json_object'}"),
    "tool_choice": (lambda v: v not in (None, "none"), "tools are not supported"),
}
MAX_LOGPROBS = 20
MAX_N = 16
# Chat (only the gateway has chat messages; the router sees the rendered prompt): messages
# per request, and the characters of their content together (docs/http.md, "Limits").
MAX_CHAT_MESSAGES = 4096
MAX_CHAT_CHARS = 32 << 20
Penalty = Annotated[Finite, Field(ge=-2, le=2)]
TopN = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema_for_its_type(cls, v, info: ValidationInfo):
        if info.data.get("type") != "json_schema" and v is not None:
            raise ValueError("json_schema is only read with type 'json_schema'")
        return v


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extension: exactly one of these."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields (``user``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, lt=2**32)] | None = None
    temperature: Annotated[Finite, Field(ge=0, le=2)] | None = None   # vLLM's [0, 2]
    top_p: Annotated[Finite, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[Finite, Field(ge=-100, le=100)]] | None = None
    # vLLM's extensions, same meanings
    top_k: Annotated[int, Field(ge=-1)] | None = None      # -1 or 0: off
    min_p: Annotated[Finite, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Finite, Field(gt=0, le=10)] | None = None
    min_tokens: NonNegInt = 0
    stop_token_ids: list[NonNegInt] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None   # vLLM's extension

    @field_validator(*_UNSUPPORTED, check_fields=False)   # also the subclasses' fields
    @classmethod
    def _supported(cls, v, info: ValidationInfo):
        refused, why = _UNSUPPORTED[info.field_name]
        if refused(v):
            raise ValueError(why)
        return v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v):
        strings = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for key in v or {}:
            if not key.strip().isdigit() or int(key) >= 2**32:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), "
                                 f"got {key!r:.40}")
        return v

    def knobs(self) -> dict:
        """The SDK's sampling keyword arguments (``preft_client.client.SAMPLING_KNOBS``)."""
        return dict(top_k=max(0, self.top_k or 0), min_p=self.min_p or 0.0,
                    repetition_penalty=self.repetition_penalty,
                    presence_penalty=self.presence_penalty or 0.0,
                    frequency_penalty=self.frequency_penalty or 0.0,
                    logit_bias={int(k): b for k, b in (self.logit_bias or {}).items()},
                    min_tokens=self.min_tokens, stop_token_ids=self.stop_token_ids)

    def answer_knobs(self) -> dict:
        """What the answer holds, as SDK arguments: samples, logprobs, the echoed prompt."""
        return {}

    def guide(self) -> dict:
        """The SDK's structured-output keyword argument (at most one)."""
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type != "text" and so is not None:
            raise GatewayError(400, "response_format: give it or structured_outputs, not both",
                               "response_format")
        if rf is not None and rf.type == "json_object":
            return {"json_object": True}
        if rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise GatewayError(400, "response_format.json_schema: required with type "
                                        "'json_schema'", "response_format")
            return {"json_schema": rf.json_schema.schema_}
        if so is None:
            return {}
        given = {k: v for k, v in (("json_schema", so.json_), ("regex", so.regex),
                                   ("choice", so.choice), ("grammar", so.grammar),
                                   ("json_object", so.json_object)) if v is not None}
        if len(given) != 1:
            raise GatewayError(400, "structured_outputs: give exactly one of json, regex, "
                                    "choice, grammar, json_object", "structured_outputs")
        return given

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
    prompt: Union[str, list[NonNegInt], list[str], list[list[NonNegInt]]]
    echo: bool | None = False        # the prompt's text (and logprobs) before the completion
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None   # sample this many,
    suffix: str | None = None                     # answer the n most likely
    logprobs: TopN | None = None     # each token's logprob and the top k

    @field_validator("best_of")
    @classmethod
    def _best_of_covers_n(cls, v, info: ValidationInfo):
        if v is not None and v < (info.data.get("n") or 1):
            raise ValueError(f"must be >= n ({info.data.get('n')})")
        return v

    def samples(self) -> int:
        return self.best_of or self.n or 1

    def answer_knobs(self) -> dict:
        echo = bool(self.echo)
        ranked = self.samples() > (self.n or 1)   # best_of ranks samples by their logprobs
        return dict(logprobs=0 if ranked and self.logprobs is None else self.logprobs,
                    echo=echo, n=self.samples(),
                    prompt_logprobs=self.logprobs if echo and self.logprobs is not None
                    else None)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, lt=2**32)] | None = None
    logprobs: bool | None = False
    top_logprobs: TopN | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    @field_validator("messages", mode="before")
    @classmethod
    def _few_enough(cls, v):
        if isinstance(v, list) and len(v) > MAX_CHAT_MESSAGES:
            raise ValueError(f"at most {MAX_CHAT_MESSAGES} messages per request, got {len(v)}")
        return v

    @field_validator("messages")
    @classmethod
    def _short_enough(cls, v: list[ChatMessage]):
        chars = sum(len(p.text) for m in v if isinstance(m.content, list) for p in m.content)
        chars += sum(len(m.content) for m in v if isinstance(m.content, str))
        if chars > MAX_CHAT_CHARS:
            raise ValueError(f"at most {MAX_CHAT_CHARS} characters of content in all "
                             f"messages together, got {chars}")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return v

    def answer_knobs(self) -> dict:
        return dict(logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                    n=self.n or 1)


# --------------------------------------------------------------------------- prompts

_ROLE_TAG = {"system": "system", "developer": "system", "user": "user",
             "assistant": "assistant", "tool": "tool"}


def format_chat(messages: list[ChatMessage],
                template: ChatTemplate = DEFAULT_CHAT) -> str:
    """The prompt of a chat: ``template`` (the model's, else ``preft_client.chat``'s default: one
    ``<|role|>\\n{text}\\n`` block per message, then ``<|assistant|>\\n``) over the messages
    as ``{"role", "content"}`` dicts. ``developer`` is written as ``system``; list content
    (text parts) is concatenated."""
    plain = []
    for m in messages:
        if isinstance(m.content, list):
            text = "".join(p.text for p in m.content)
        else:
            text = m.content or ""
        plain.append({"role": _ROLE_TAG[m.role], "content": text})
    try:
        return template.render(plain)
    except Exception as e:   # the template's raise_exception, or a jinja2 runtime error
        raise GatewayError(400, f"messages: the model's chat template refused them: {e}",
                           "messages") from None


def single_prompt(prompt) -> tuple[str | None, list[int] | None]:
    """(text, None) or (None, token ids): a string, a list of token ids, or a list holding
    exactly one of those."""
    if isinstance(prompt, str):
        return prompt, None
    if not prompt:
        raise GatewayError(400, "prompt: is empty: give a string or token ids", "prompt")
    if isinstance(prompt[0], int):
        return None, list(prompt)
    if len(prompt) != 1:
        raise GatewayError(400, f"prompt: only one prompt per request is supported, got "
                                f"{len(prompt)}", "prompt")
    return single_prompt(prompt[0])


# --------------------------------------------------------------------------- bad bodies

_UNION_MESSAGES = {"prompt": "prompt: must be a string, a list of token ids (integers >= 0), "
                             "or a list holding one of those",
                   "stop": "stop: must be a string or a list of strings"}


def _field(error: dict) -> list[str]:
    return [str(p) for p in error.get("loc", ()) if p != "body"]


def validation_error(exc: RequestValidationError) -> GatewayError:
    """A 400 naming the first offending field (``max_tokens: Input should be ...``)."""
    errors = exc.errors()
    if not errors:
        return GatewayError(400, "invalid request body")
    first = errors[0]
    loc = _field(first)
    if first.get("type") == "json_invalid":
        return GatewayError(400, f"request body is not valid JSON: {first.get('msg', '')}")
    if not loc:
        if first.get("type") == "missing":
            return GatewayError(400, "a JSON request body is required")
        return GatewayError(400, f"request body: {first.get('msg', 'invalid')}")
    param = loc[0]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    same_field = [e for e in errors if _field(e)[:1] == [param]]
    if first.get("type") == "missing":
        text = f"{param}: field required"
    elif len(same_field) > 1 and param in _UNION_MESSAGES:
        text = _UNION_MESSAGES[param]
    else:
        text = f"{'.'.join(loc)}: {msg}"
    return GatewayError(400, text, param)
