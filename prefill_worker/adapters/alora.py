"""Activated LoRA (aLoRA): LoRA from the invocation sequence on (colocated workers only).

The same delta as LoRA-P, y = W x + (alpha/r) · B (A x), applied to every position from the
start of the last occurrence of the adapter's invocation tokens in the prompt on, generated
tokens included (PEFT's ``alora_invocation_tokens``; ``peft.tuners.lora.variants``). Every
position before it runs through W alone, so that KV is the base model's and is shared with
base requests and other aLoRAs over the same context (``colocated_worker/adapter_span.py``).
A prompt without the invocation tokens is served by the base model alone, as PEFT's forward
does.

Files: standard PEFT aLoRA (``adapter_config.json`` with ``"alora_invocation_tokens":
[ids...]`` + ``adapter_model.safetensors``); the files declare the kind. vLLM refuses an
aLoRA config (its ``PEFTHelper``), so the engine loads a view of the files without the
invocation tokens (:func:`engine_view`): the positions are this package's job, not vLLM's.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from cluster.errors import InvalidAdapter
from prefill_worker.adapters.lora_p import validate as validate_lora
from prefill_worker.adapters.base import AdapterSpec, BaseModelShape, read_json, register_kind

KEY = "alora_invocation_tokens"
MAX_INVOCATION = 1024


def _claims(cfg: dict) -> bool:
    return str(cfg.get("peft_type", "")).upper() == "LORA" and cfg.get(KEY) is not None


@register_kind("alora", claims=_claims,
               needs=f"an aLoRA adapter_config.json names its invocation sequence: "
                     f"\"{KEY}\": [token ids], as PEFT's LoraConfig({KEY}=...) saves it")
def validate(path: Path, base: BaseModelShape, max_rank: int, max_bytes: int) -> AdapterSpec:
    invocation_tokens(path, base.vocab_size)
    return replace(validate_lora(path, base, max_rank, max_bytes), kind="alora")


def invocation_tokens(path: str | Path, vocab_size: int = 0) -> tuple[int, ...]:
    """The adapter's invocation sequence, checked: 1 to 1024 token ids of the base model's
    vocabulary (``vocab_size`` 0: not checked)."""
    tokens = read_json(Path(path) / "adapter_config.json", "aLoRA adapter").get(KEY)
    if not isinstance(tokens, list) or not tokens:
        raise InvalidAdapter(f"{KEY}={tokens!r}: an aLoRA adapter needs its invocation "
                             "sequence as a non-empty list of token ids")
    if len(tokens) > MAX_INVOCATION:
        raise InvalidAdapter(f"{KEY} has {len(tokens)} tokens; at most {MAX_INVOCATION}")
    for t in tokens:
        if type(t) is not int or t < 0 or (vocab_size and t >= vocab_size):
            raise InvalidAdapter(f"{KEY} holds {t!r}, which is not a token id of the base "
                                 f"model's vocabulary (0..{vocab_size - 1}); tokenize the "
                                 "invocation string with the base model's tokenizer")
    return tuple(tokens)


def without_invocation(src: str | Path, dst: str | Path) -> Path:
    """Write ``src``'s files into the directory ``dst`` as a plain PEFT LoRA: the config
    without the invocation tokens, the weights hard-linked (copied across file systems)."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = read_json(src / "adapter_config.json", "aLoRA adapter")
    cfg.pop(KEY, None)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    weights = src / "adapter_model.safetensors"
    try:
        os.link(weights, dst / weights.name)
    except OSError:
        shutil.copyfile(weights, dst / weights.name)
    return dst


def engine_view(path: str | Path) -> Path:
    """``<path>.engine``: the adapter as vLLM loads it (:func:`without_invocation`). Made
    once per directory, atomically."""
    import shutil

    src = Path(path)
    view = src.with_name(src.name + ".engine")
    if view.is_dir():
        return view
    tmp = without_invocation(src, src.with_name(f".{src.name}.engine-{os.getpid()}"))
    try:
        tmp.rename(view)
    except OSError:   # another worker thread made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return view
