"""Model directories for benchmarks: real architectures, random weights, nothing downloaded.

``make_model(name, root)`` writes a HF ``config.json`` of a published architecture plus a
word-level tokenizer covering the whole vocabulary (every id decodes to ``t<id>``), and
returns the directory with the vLLM ``load_format`` to use: ``dummy`` (vLLM fills the
weights with random values at load time) for the real architectures, ``auto`` for the
embedded tiny model, whose weights are written locally by :mod:`app.tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path

_QWEN_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
    "sliding_window": None, "attention_dropout": 0.0, "torch_dtype": "float32",
}
_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
    "torch_dtype": "float32",
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}

# Published shapes (config.json of each model card); weights are random.
ARCHS: dict[str, dict] = {
    "qwen2.5-0.5b": {**_QWEN_COMMON, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True,
                     "max_window_layers": 24, "bos_token_id": 151643, "eos_token_id": 151643},
    "llama-3.2-1b": {**_LLAMA_COMMON, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "tie_word_embeddings": True,
                     "bos_token_id": 128000, "eos_token_id": 128001},
    "llama-3.1-8b": {**_LLAMA_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "tie_word_embeddings": False,
                     "bos_token_id": 128000, "eos_token_id": 128001},
}
MODELS = ("tiny", *ARCHS)


def _word_tokenizer(vocab_size: int, eos_id: int, out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos_id}",
                                   bos_token=f"t{eos_id}", unk_token="t0")
    fast.save_pretrained(str(out))


def make_model(name: str, root: str | Path) -> tuple[Path, str]:
    """(model directory, load_format) for ``name`` in :data:`MODELS`, built under ``root``."""
    root = Path(root)
    if name == "tiny":
        from app.tiny import make_tiny_model
        return make_tiny_model(root / "tiny-llama"), "auto"
    if name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    out = root / name
    cfg = ARCHS[name]
    if (out / "config.json").exists() and json.loads((out / "config.json").read_text()) == cfg:
        return out, "dummy"
    out.mkdir(parents=True, exist_ok=True)
    _word_tokenizer(cfg["vocab_size"], cfg["eos_token_id"], out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out, "dummy"
