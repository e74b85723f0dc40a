"""What the base model's own ``config.json`` allows, checked before anything starts.

The engines' settings have defaults (context length, dtype, KV cache size) that a real model
can contradict; vLLM would find out only inside each worker, after Ray and Redis are up and
the weights are loading. The launcher calls :func:`resolve_cluster` first: it reads
``config.json`` with ``json`` (no torch, no transformers), fills ``EngineConfig.max_model_len``
with the model's own context length when it is unset, and raises :class:`ConfigError`
naming the field, the value and the model's limit when a setting cannot work.

The context length follows vLLM's rule (``vllm/config/model.py: _get_and_verify_max_len``
and ``ModelArchConfigConvertorBase.derive_max_model_len_and_key``): the smallest of the
length keys below (``model_max_length`` wins when present), times the RoPE scaling factor
unless the scaling type leaves ``max_position_embeddings`` already scaled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig, ConfigError, EngineConfig

LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
               "model_max_length", "max_target_positions", "max_sequence_length",
               "max_seq_length", "seq_len")
VLLM_FALLBACK_LEN = 2048   # vLLM assumes this when config.json names no length
# RoPE types whose max_position_embeddings is already the scaled length (vLLM skips `factor`).
PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
# vLLM's CPU attention (CPUAttentionBackend.get_supported_head_sizes, vLLM 0.32);
# tests/unit/test_model_info.py keeps this equal to the installed vLLM's list.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Model types whose KV cache is plain (every layer full attention, K and V of
# num_key_value_heads x head size per token, no sharing): only these get the KV-fit check,
# so an unusual cache (MLA, hybrid, shared layers) is never refused by a wrong estimate.
PLAIN_KV_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo", "olmo2",
                  "gemma", "starcoder2", "stablelm", "internlm2", "gpt2")
_ALIASES = {"hidden": ("hidden_size", "n_embd", "d_model"),
            "heads": ("num_attention_heads", "n_head", "num_heads"),
            "layers": ("num_hidden_layers", "n_layer", "num_layers"),
            "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv")}


@dataclass(frozen=True)
class ModelInfo:
    """The parts of a model's config.json that the engines' settings must agree with."""

    path: str
    max_len: int | None      # the model's own context length (None: config.json names none)
    max_len_from: str        # where it came from, e.g. "max_position_embeddings=1024"
    default_len: int         # vLLM's default when max_model_len is unset (LongRoPE: shorter;
                             # 2048 when config.json names no length)
    head_size: int | None    # None: unknown or not plain attention (then not checked)
    kv_elems_per_token: int | None   # K and V elements of all layers; None: not estimated


def _err(path: str, what: str) -> ConfigError:
    return ConfigError(f"EngineConfig.model={path!r}: {what}")


def read_config(model: str) -> dict[str, Any]:
    """The model directory's config.json as a dict; a clear error when it is missing or bad."""
    f = Path(model) / "config.json"
    if not Path(model).is_dir():
        raise _err(model, "no such directory (expected a Hugging Face model directory "
                   "with config.json, e.g. from `huggingface-cli download`)")
    if not f.is_file():
        raise _err(model, f"{f} does not exist (expected a Hugging Face model directory)")
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(model, f"{f} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise _err(model, f"{f} is not a JSON object")
    return data


def _rope_params(text: dict) -> list[dict]:
    rp = text.get("rope_parameters") or text.get("rope_scaling")
    if not isinstance(rp, dict) or not rp:
        return []
    nested = all(isinstance(v, dict) for v in rp.values())   # one dict per layer type
    return [v for v in rp.values() if v] if nested else [rp]


def _rope_factor(path: str, params: list[dict]) -> float:
    factor = 1.0
    for rp in params:
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind not in PRESCALED_ROPE and rp.get("factor") is not None:
            factor = rp["factor"]
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
                raise _err(path, f"config.json rope scaling factor={factor!r} ({kind}) must "
                           "be a positive number")
    return float(factor)


def _max_len(path: str, cfg: dict, text: dict) -> tuple[int | None, str, int]:
    """(limit, where it came from, vLLM's default): vLLM's derivation for the common keys."""
    found = {k: text[k] for k in LENGTH_KEYS if text.get(k) is not None}
    for k, v in found.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 1:
            raise _err(path, f"config.json {k}={v!r} must be a positive integer")
    if text.get("model_max_length"):                   # Command-R style: it overrides
        key = "model_max_length"
    else:
        key = min(found, key=lambda k: (found[k], LENGTH_KEYS.index(k)), default=None)
    n = found[key] if key else VLLM_FALLBACK_LEN
    src = f"{key}={n}" if key else f"vLLM's assumed {n}: config.json names none of {LENGTH_KEYS}"
    params = _rope_params(text)
    model_type = str(text.get("model_type") or cfg.get("model_type") or "")
    factor = 1.0 if "gemma3" in model_type else _rope_factor(path, params)   # gemma3: pre-scaled
    if factor != 1.0:
        src = f"{src} x rope scaling factor {factor:g}"
    n = int(n * factor)
    default = n
    if any(p.get("rope_type", p.get("type")) == "longrope" for p in params):
        default = int(text.get("original_max_position_embeddings", n))
    return (n if key else None), src, default   # no length named: any max_model_len is taken


def _pick(text: dict, role: str):
    return next((text[k] for k in _ALIASES[role] if text.get(k) is not None), None)


def _attention(path: str, text: dict, model_type: str) -> tuple[int | None, int | None]:
    """(head size, KV elements per token) of plain multi-head attention, else (None, None)."""
    hidden, heads, layers = _pick(text, "hidden"), _pick(text, "heads"), _pick(text, "layers")
    kv_heads = _pick(text, "kv_heads") or heads
    if "kv_lora_rank" in text or not all(isinstance(x, int) for x in (hidden, heads, layers)):
        return None, None                                # MLA or unfamiliar names: vLLM's call
    for name, v in (("hidden_size", hidden), ("num_attention_heads", heads),
                    ("num_hidden_layers", layers), ("num_key_value_heads", kv_heads)):
        if not isinstance(v, int) or v < 1:
            raise _err(path, f"config.json {name}={v!r} must be a positive integer")
    if heads % kv_heads:
        raise _err(path, f"config.json num_attention_heads={heads} is not a multiple of "
                   f"num_key_value_heads={kv_heads}")
    head = text.get("head_dim")
    if head is None:
        if hidden % heads:
            raise _err(path, f"config.json hidden_size={hidden} is not a multiple of "
                       f"num_attention_heads={heads} (and no head_dim is given)")
        head = hidden // heads
    if not isinstance(head, int) or head < 1:
        raise _err(path, f"config.json head_dim={head!r} must be a positive integer")
    windowed = text.get("use_sliding_window") or (
        text.get("sliding_window") and text.get("use_sliding_window") is not False) or any(
        t != "full_attention" for t in text.get("layer_types") or ())
    plain = model_type in PLAIN_KV_TYPES and not windowed
    return head, 2 * layers * kv_heads * head if plain else None


def model_info(model: str) -> ModelInfo:
    """Read and check ``model``/config.json: architecture, vocabulary, heads, RoPE, length."""
    cfg = read_config(model)
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and archs) and not cfg.get("model_type"):
        raise _err(model, "config.json names neither 'architectures' nor 'model_type': "
                   "vLLM cannot tell which model class to build")
    vocab = text.get("vocab_size")
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
        raise _err(model, f"config.json vocab_size={vocab!r} must be a positive integer")
    max_len, src, default = _max_len(model, cfg, text)
    head, kv_elems = _attention(model, text, text.get("model_type") or cfg.get("model_type"))
    return ModelInfo(model, max_len, src, default, head, kv_elems)


def _check_length(engine: EngineConfig, info: ModelInfo) -> EngineConfig:
    if engine.max_model_len is None:
        return replace(engine, max_model_len=info.default_len)
    if info.max_len is not None and engine.max_model_len > info.max_len:
        raise ConfigError(
            f"EngineConfig.max_model_len={engine.max_model_len} (--max-model-len) is greater "
            f"than the model's own context length {info.max_len} ({info.max_len_from} in "
            f"{info.path}/config.json): use at most {info.max_len}, or leave it unset to "
            "get the model's own")
    return engine


def _check_cpu(engine: EngineConfig, info: ModelInfo, defaulted: bool) -> None:
    """CPU engines: vLLM's CPU attention head sizes, and one full-length sequence's KV must fit
    in kv_cache_gib (worker_runtime/env.py rounds it up to whole GiB for vLLM)."""
    if info.head_size is not None and info.head_size not in CPU_HEAD_SIZES:
        raise _err(info.path, f"head size {info.head_size} is not supported by vLLM's CPU "
                   f"attention ({', '.join(map(str, CPU_HEAD_SIZES))}); run this model on "
                   "GPU pools (num_gpus > 0)")
    if info.kv_elems_per_token is None:
        return
    per_tok = info.kv_elems_per_token * _DTYPE_BYTES[engine.dtype]
    avail = max(1, math.ceil(engine.kv_cache_gib)) << 30
    need = per_tok * engine.max_model_len
    if need > avail:
        fits = max(16, (avail // per_tok) // 256 * 256)
        own = f" (unset: the model's own, {info.max_len_from})" if defaulted else ""
        raise ConfigError(
            f"EngineConfig.max_model_len={engine.max_model_len}{own} needs {need / 2**30:.1f} GiB "
            f"of KV cache for one full-length sequence ({per_tok // 1024} KiB per token in "
            f"{engine.dtype}), more than kv_cache_gib={engine.kv_cache_gib:g} gives each engine "
            f"({avail >> 30} GiB): lower max_model_len (--max-model-len; about {fits} tokens "
            f"fit) or raise kv_cache_gib (--kv-cache-gib) to at least {math.ceil(need / 2**30)}")


def resolve_engine(engine: EngineConfig, info: ModelInfo, *, cpu: bool) -> EngineConfig:
    """``engine`` with max_model_len set (the model's own when unset), checked against the model."""
    defaulted = engine.max_model_len is None
    engine = _check_length(engine, info)
    if cpu:
        _check_cpu(engine, info, defaulted)
    return engine


def resolve_cluster(cfg: ClusterConfig) -> ClusterConfig:
    """Both pools' engines resolved against the model's config.json (read once)."""
    info = model_info(cfg.prefill.engine.model)
    pre = resolve_engine(cfg.prefill.engine, info, cpu=not cfg.prefill.num_gpus)
    dec = resolve_engine(cfg.decode.engine, info, cpu=not cfg.decode.num_gpus)
    return replace(cfg, prefill=replace(cfg.prefill, engine=pre),
                   decode=replace(cfg.decode, engine=dec))


# ------------------------------------------------------------------ the model's identity
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE_BYTES = 1 << 20        # each weight file's first MiB of tensor data


def _safetensors_head(f: Path) -> tuple[bytes, int]:
    """A safetensors file's header (tensor names, dtypes, shapes, offsets) and where its
    tensor data begins; (b"", 0) when the file is not one."""
    with f.open("rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if not 0 < n <= 100 << 20:
            return b"", 0
        return fh.read(n), 8 + n


def model_fingerprint(model: str) -> str:
    """What the base model is, cheaply: sha256 of ``config.json`` and, per weight file
    (sorted by name), its name, size, safetensors header (every tensor's name, dtype and
    shape) and first MiB of tensor data -- a few MiB read, never the whole weights. Two
    copies of one model agree wherever they live; a model of another shape, or the same
    shape trained differently, does not. Raises :class:`ConfigError` without config.json."""
    import hashlib

    root = Path(model)
    read_config(model)    # a clear error when it is no model directory
    h = hashlib.sha256(b"config.json\0" + (root / "config.json").read_bytes())
    for f in sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        h.update(f"\0{f.name}\0{f.stat().st_size}\0".encode())
        head, start = _safetensors_head(f) if f.suffix == ".safetensors" else (b"", 0)
        h.update(head)
        with f.open("rb") as fh:
            fh.seek(start)
            h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def structured_output_problem(model: str) -> str | None:
    """Why structured output cannot work on ``model``, or None when it can (or cannot be
    told here). Every engine uses vLLM's ``guidance`` backend, which builds its token table
    with llguidance from the model's ``tokenizer.json``; llguidance reads ByteLevel
    (GPT-2 style) and ByteFallback (Llama/SentencePiece style) decoders only, and refuses
    others ("can't determine decoder type") on every guided request. The launcher says so
    once, at start-up."""
    f = Path(model) / "tokenizer.json"
    try:
        import llguidance
    except ImportError:   # no vLLM here (e.g. a remote cluster's head): its workers decide
        return None
    if not f.is_file():
        return None
    try:
        llguidance.LLTokenizer(f.read_text())
    except (ValueError, OSError) as e:
        return (f"structured output (json_schema, regex, choice, grammar, response_format) "
                f"is unavailable on {model}: vLLM's structured-output backend (llguidance) "
                f"cannot read its tokenizer ({str(e)[:160]}; it needs a ByteLevel or "
                f"ByteFallback decoder); such requests will be refused with INVALID_ARGUMENT")
    return None
