"""Locally built models and adapters: the embedded default the demo and the tests run on.

Nothing here is downloaded. ``make_tiny_model`` writes a Llama-architecture checkpoint with
random weights from a fixed seed plus a byte-level BPE tokenizer trained on an embedded
corpus; ``make_lora_adapter`` writes a PEFT-format LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``) for it. This sits before the request path: it produces the
files that ``preft up`` serves and that the prefill worker's adapter store loads.

Heavy imports (torch, transformers, tokenizers) happen inside the functions so that
importing :mod:`app` stays cheap for the CLI.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

CORPUS = """\
The prefill pool reads the prompt with the adapter and the decode pool writes the answer.
A quick brown fox jumps over the lazy dog while the river runs to the sea.
Serving many adapters on one base model is cheap when the adapter only touches the prompt.
Every request carries a prompt, a set of sampling parameters and the name of an adapter.
The key value cache of the prompt moves between machines over a fast network link.
Once upon a time there was a small model that learned to answer questions politely.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in tables, logs and dashboards.
Hello world! How are you today? I am fine, thank you. What is the weather like?
The scheduler batches requests from many users and the engine runs them together.
Operators watch throughput, latency and queue depth on their dashboards every day.
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a locally built Llama-architecture model."""

    vocab_size: int = 1024          # BPE target; the corpus yields fewer (~575)
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # grouped-query attention: 4 query heads per KV head
    head_dim: int = 32
    max_position_embeddings: int = 4096
    initializer_range: float = 0.1  # large enough that layers mix context (no fixed points)
    lm_head_scale: float = 6.0  # peaked logits, so greedy margins are not vanishing
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"TinyModelSpec.num_attention_heads={self.num_attention_heads} must be a "
                f"multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim not in (32, 64, 80, 96, 112, 128, 256):
            raise ValueError(f"TinyModelSpec.head_dim={self.head_dim}: vLLM's CPU attention "
                             "supports 32, 64, 80, 96, 112, 128, 256")


DEFAULT_SPEC = TinyModelSpec()


def build_tokenizer(vocab_size: int, out_dir: str | os.PathLike) -> int:
    """Train a byte-level BPE tokenizer on the embedded corpus; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    fast.model_max_length = 1 << 20
    fast.save_pretrained(str(out_dir))
    return len(fast)


def make_tiny_model(out_dir: str | os.PathLike, spec: TinyModelSpec = DEFAULT_SPEC) -> Path:
    """Write a random-weight Llama checkpoint and tokenizer to ``out_dir`` (idempotent)."""
    out = Path(out_dir)
    marker = out / "preft_tiny_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    # The model's vocabulary is exactly the tokenizer's, so every sampled id decodes.
    n_tok = build_tokenizer(spec.vocab_size, out)
    cfg = LlamaConfig(
        vocab_size=n_tok, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5,
        rope_theta=10000.0, initializer_range=spec.initializer_range, torch_dtype="float32")
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(spec.lm_head_scale)
        # A never-sampled EOS keeps greedy tests at their full length.
        model.lm_head.weight[cfg.eos_token_id].fill_(0.0)
    model.save_pretrained(str(out), safe_serialization=True)
    marker.write_text(json.dumps(asdict(spec)))
    return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(out_dir: str | os.PathLike, base_model: str | os.PathLike, *,
                      seed: int, rank: int = 8, alpha: int = 16,
                      targets: tuple[str, ...] = LORA_TARGETS, b_std: float = 0.08) -> Path:
    """Write a PEFT LoRA adapter with random, non-zero A and B for ``base_model``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(base_model))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dims = {
        "q_proj": (cfg.hidden_size, cfg.num_attention_heads * head_dim),
        "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
        "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
        "o_proj": (cfg.num_attention_heads * head_dim, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for t in targets:
            d_in, d_out = dims[t]
            group = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, d_in, generator=gen) / d_in ** 0.5).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(d_out, rank, generator=gen) * b_std).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": 0.0, "bias": "none", "target_modules": list(targets),
        "base_model_name_or_path": str(base_model), "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def make_alora_adapter(out_dir: str | os.PathLike, base_model: str | os.PathLike, *,
                       seed: int, invocation: tuple[int, ...] | list[int],
                       targets: tuple[str, ...] = LORA_TARGETS, rank: int = 8) -> Path:
    """Write a PEFT activated-LoRA adapter: :func:`make_lora_adapter`'s files with
    ``alora_invocation_tokens`` in the config (the adapter applies from the last
    occurrence of those token ids in the prompt on)."""
    out = make_lora_adapter(out_dir, base_model, seed=seed, rank=rank, targets=targets)
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["alora_invocation_tokens"] = [int(t) for t in invocation]
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return out


def make_reft_adapter(out_dir: str | os.PathLike, base_model: str | os.PathLike, *,
                      seed: int, intervention: str = "loreft",
                      layers: tuple[int, ...] = (1, 3), rank: int = 4,
                      positions: str = "all", scale: float = 40.0) -> Path:
    """Write a ReFT-P adapter (``prefill_worker.adapters.reft_p`` format) for ``base_model``:
    random weights with a bias of std ``scale`` (the tiny model's residual stream has a norm
    of ~60-110 after layer 0), big enough to change greedy outputs."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    if intervention not in ("loreft", "direft"):
        raise ValueError(f"intervention={intervention!r}: use 'loreft' or 'direft'")
    d = AutoConfig.from_pretrained(str(base_model)).hidden_size
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for L in layers:
        p = f"layers.{L}"
        if intervention == "loreft":
            q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
            tensors[f"{p}.rotate_layer.weight"] = q.T.to(torch.float32).contiguous()
            tensors[f"{p}.learned_source.weight"] = (
                torch.randn(rank, d, generator=gen) * (2.0 / d ** 0.5)).contiguous()
            tensors[f"{p}.learned_source.bias"] = torch.randn(rank, generator=gen) * scale
        else:
            tensors[f"{p}.proj_down.weight"] = (
                torch.randn(rank, d, generator=gen) * (2.0 / d ** 0.5)).contiguous()
            tensors[f"{p}.proj_down.bias"] = torch.randn(rank, generator=gen) * scale
            tensors[f"{p}.proj_up.weight"] = (
                torch.randn(rank, d, generator=gen) / rank ** 0.5).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "REFT_P", "preft_kind": "reft_p", "intervention": intervention,
              "layers": list(layers), "rank": rank, "positions": positions, "hidden_size": d,
              "base_model_name_or_path": str(base_model)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
