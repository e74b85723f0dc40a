"""LoRA-P: LoRA on the projections, applied to prompt tokens only.

For a target projection y = W x, the adapter adds ΔW = (alpha / r) · B A with A ∈ R^{r×d_in},
B ∈ R^{d_out×r}: y = W x + (alpha/r) · B (A x), for prompt positions only. The decode pool
never sees the adapter; generated tokens run through W alone, attending to the prompt's
adapter-conditioned KV. Files: standard PEFT (``adapter_config.json`` +
``adapter_model.safetensors``); pickle-based weights are refused.

Kind ``lora`` is the same files under standard PEFT semantics: the delta on *every* token,
generated ones included. Only colocated workers serve it (the router never sends it to a
prefill/decode pair), and the uploader says so (``kind="lora"``): the files cannot.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from cluster.errors import InvalidAdapter
from cluster.adapter_store import digest_dir
from prefill_worker.adapters.base import (AdapterSpec, BaseModelShape, read_json, register_kind,
                                          safetensors_weights)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\."
                  r"lora_(A|B)\.weight$")


def _dims(base: BaseModelShape) -> dict[str, tuple[int, int]]:
    q, kv = base.num_heads * base.head_dim, base.num_kv_heads * base.head_dim
    h, i = base.hidden_size, base.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@register_kind("lora")
def validate_all_token(path: Path, base: BaseModelShape, max_rank: int,
                       max_bytes: int) -> AdapterSpec:
    from dataclasses import replace

    return replace(validate(path, base, max_rank, max_bytes), kind="lora")


@register_kind("lora_p")
def validate(path: Path, base: BaseModelShape, max_rank: int, max_bytes: int) -> AdapterSpec:
    cfg = read_json(path / "adapter_config.json", "LoRA-P adapter")
    weights = safetensors_weights(path, "PEFT: save_pretrained(safe_serialization=True)")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter(f"peft_type={cfg.get('peft_type')!r}: LoRA-P needs a PEFT LORA adapter")
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidAdapter(f"r={rank!r}: rank must be a positive integer")
    if rank > max_rank:
        raise InvalidAdapter(f"r={rank} exceeds this cluster's max_lora_rank={max_rank}; "
                             f"retrain with r <= {max_rank}")
    alpha = cfg.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidAdapter(f"lora_alpha={alpha!r} must be a finite number")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise InvalidAdapter(f"target_modules={targets!r}: supported are {list(TARGETS)}")
    if cfg.get("modules_to_save"):
        raise InvalidAdapter("modules_to_save is not supported by LoRA-P (it would change "
                             "the base weights at decode)")
    sha, size = digest_dir(path)
    if size > max_bytes:
        raise InvalidAdapter(f"adapter is {size} bytes, over the limit of {max_bytes}")
    _check_tensors(weights, base, rank, set(targets))
    return AdapterSpec("lora_p", rank, tuple(targets), sha, size)


def _check_tensors(weights: Path, base: BaseModelShape, rank: int, targets: set[str]) -> None:
    import torch
    from safetensors import SafetensorError, safe_open

    dims = _dims(base)
    seen = 0
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if not m:
                    raise InvalidAdapter(f"unexpected tensor {key!r} in adapter_model.safetensors")
                layer, _, module, ab = int(m[1]), m[2], m[3], m[4]
                if layer >= base.num_layers:
                    raise InvalidAdapter(f"{key}: layer {layer} but the base model has "
                                         f"{base.num_layers} layers")
                if module not in targets:
                    raise InvalidAdapter(f"{key}: module {module} not in target_modules")
                t = f.get_tensor(key)
                d_in, d_out = dims[module]
                want = (rank, d_in) if ab == "A" else (d_out, rank)
                if tuple(t.shape) != want:
                    raise InvalidAdapter(f"{key}: shape {tuple(t.shape)} does not match the base "
                                         f"model (expected {want})")
                if not t.is_floating_point():
                    raise InvalidAdapter(f"{key}: dtype {t.dtype} is not floating point")
                if not torch.isfinite(t).all():
                    raise InvalidAdapter(f"{key}: contains NaN or Inf values")
                seen += 1
    except SafetensorError as e:
        raise InvalidAdapter(f"adapter_model.safetensors is not a valid safetensors file: {e}") from None
    if seen == 0:
        raise InvalidAdapter("adapter_model.safetensors holds no LoRA tensors")
