"""The engines' settings are checked against the model's own config.json before anything
starts (cluster.model_info): max_model_len defaults to the model's context length, a longer
one is refused naming both numbers, and head size, vocabulary, RoPE scaling and the KV cache
a full-length sequence needs are checked up front. Model directories here hold only a
config.json; the vLLM parity tests build vLLM's own ModelConfig from the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ClusterConfig, ConfigError, DecodeConfig, EngineConfig, PrefillConfig
from cluster.model_info import CPU_HEAD_SIZES, model_info, resolve_cluster, resolve_engine

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
         "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
         "head_dim": 32, "num_hidden_layers": 4, "vocab_size": 600,
         "max_position_embeddings": 1024}


def model_dir(tmp_path: Path, name: str = "m", **changes) -> str:
    cfg = {k: v for k, v in {**LLAMA, **changes}.items() if v is not None}
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def resolve(path: str, cpu: bool = True, **engine) -> EngineConfig:
    return resolve_engine(EngineConfig(model=path, **engine), model_info(path), cpu=cpu)


def test_unset_max_model_len_is_the_models_own(tmp_path):
    m = model_dir(tmp_path)
    assert EngineConfig(model=m).max_model_len is None
    assert resolve(m).max_model_len == 1024
    assert resolve(m, max_model_len=512).max_model_len == 512    # lowering is fine


def test_max_model_len_above_the_models_limit_names_both_numbers(tmp_path):
    m = model_dir(tmp_path)
    with pytest.raises(ConfigError) as e:
        resolve(m, max_model_len=4096)
    msg = str(e.value)
    assert "max_model_len=4096" in msg and "1024" in msg and "max_position_embeddings" in msg
    assert "--max-model-len" in msg and f"{m}/config.json" in msg


@pytest.mark.parametrize("changes, limit", [
    (dict(rope_scaling={"type": "linear", "factor": 4.0}), 4096),       # scaled by factor
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), 2048),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
     1024),                                                            # already scaled
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                        "original_max_position_embeddings": 256}), 1024),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), 2048),
    (dict(seq_length=512), 512),                                       # the smallest key wins
    (dict(model_max_length=8192), 8192),                               # Command-R: overrides
])
def test_rope_scaling_and_length_keys_as_vllm_derives_them(tmp_path, changes, limit):
    m = model_dir(tmp_path, **changes)
    assert model_info(m).max_len == limit
    assert resolve(m).max_model_len == limit
    with pytest.raises(ConfigError, match=f"max_model_len={limit + 1} .*{limit}"):
        resolve(m, max_model_len=limit + 1)


def test_no_length_in_config_takes_vllms_2048_and_any_explicit_length(tmp_path):
    m = model_dir(tmp_path, max_position_embeddings=None)
    assert model_info(m).max_len is None
    assert resolve(m).max_model_len == 2048
    assert resolve(m, max_model_len=4096).max_model_len == 4096


def test_missing_or_broken_config_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        model_info(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'empty' / 'config.json'} does not exist"):
        model_info(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        model_info(str(tmp_path / "bad"))


@pytest.mark.parametrize("changes, needle", [
    (dict(architectures=None, model_type=None), "neither 'architectures' nor 'model_type'"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(max_position_embeddings="long"), "max_position_embeddings='long'"),
    (dict(rope_scaling={"type": "linear", "factor": "x"}), "rope scaling factor='x'"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(head_dim=None, hidden_size=250), "hidden_size=250 is not a multiple"),
])
def test_contradictory_model_configs_are_refused_up_front(tmp_path, changes, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        model_info(model_dir(tmp_path, **changes))


def test_head_size_checked_against_vllms_cpu_attention(tmp_path):
    m = model_dir(tmp_path, head_dim=48)
    with pytest.raises(ConfigError, match="head size 48 .*CPU attention.*num_gpus > 0"):
        resolve(m)
    assert resolve(m, cpu=False).max_model_len == 1024      # GPU pools: not our check


def test_kv_cache_must_hold_one_full_length_sequence_on_cpu(tmp_path):
    # Llama-3.2-1B's shape: 64 KiB of float32 KV per token, 131072 positions = 8 GiB.
    m = model_dir(tmp_path, max_position_embeddings=131072, num_hidden_layers=16,
                  num_key_value_heads=8, head_dim=64, num_attention_heads=32, hidden_size=2048)
    with pytest.raises(ConfigError) as e:
        resolve(m)
    msg = str(e.value)
    assert "max_model_len=131072 (unset: the model's own" in msg and "8.0 GiB" in msg
    assert "kv_cache_gib=1" in msg and "about 16384 tokens fit" in msg and "at least 8" in msg
    assert resolve(m, max_model_len=16384).max_model_len == 16384
    assert resolve(m, kv_cache_gib=8).max_model_len == 131072
    assert resolve(m, cpu=False).max_model_len == 131072    # GPU memory is vLLM's to check
    windowed = model_dir(tmp_path, "w", max_position_embeddings=131072, num_hidden_layers=16,
                         num_key_value_heads=8, head_dim=64, num_attention_heads=32,
                         hidden_size=2048, model_type="mistral", sliding_window=4096)
    assert resolve(windowed).max_model_len == 131072        # not a plain cache: not estimated


def test_resolve_cluster_fills_both_pools(tmp_path):
    m = model_dir(tmp_path)
    eng = EngineConfig(model=m)
    cfg = resolve_cluster(ClusterConfig(prefill=PrefillConfig(engine=eng),
                                        decode=DecodeConfig(engine=eng)))
    assert cfg.prefill.engine.max_model_len == cfg.decode.engine.max_model_len == 1024
    assert cfg.prefill.engine.model == m


def test_preft_up_flags_default_to_the_models_own_length(tmp_path):
    from app.cli import build_config, make_parser

    m = model_dir(tmp_path)
    args = make_parser().parse_args(["up", "--model", m])
    assert build_config(args).prefill.engine.max_model_len is None
    assert resolve_cluster(build_config(args)).decode.engine.max_model_len == 1024
    args = make_parser().parse_args(["up", "--model", m, "--max-model-len", "4096"])
    with pytest.raises(ConfigError, match="4096.*1024"):
        resolve_cluster(build_config(args))


# ------------------------------------------------------------------ parity with vLLM itself
def test_cpu_head_sizes_match_the_installed_vllm():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_HEAD_SIZES


@pytest.mark.parametrize("changes", [
    {}, dict(rope_scaling={"type": "linear", "factor": 4.0}),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
    dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    dict(seq_length=512),
], ids=["plain", "linear", "llama3", "dynamic", "yarn", "seq_length"])
def test_default_length_matches_vllms_own_derivation(tmp_path, changes):
    from vllm.config import ModelConfig

    m = model_dir(tmp_path, **changes)
    ours = resolve(m).max_model_len
    assert ModelConfig(model=m, skip_tokenizer_init=True, dtype="float32").max_model_len == ours
    with pytest.raises(Exception, match="greater than the derived max_model_len"):
        ModelConfig(model=m, skip_tokenizer_init=True, dtype="float32", max_model_len=ours + 1)


def test_structured_output_problem_is_found_at_start_up(tmp_path):
    """A tokenizer llguidance cannot read (the demo's old bare Fuse decoder) is named once,
    before anything starts; the demo's byte-fallback tokenizer passes."""
    from cluster.model_info import structured_output_problem
    from trainer.quality import build_char_tokenizer

    build_char_tokenizer(tmp_path / "fuse", "chars")
    problem = structured_output_problem(str(tmp_path / "fuse"))
    assert problem and "can't determine decoder type" in problem and "ByteFallback" in problem
    build_char_tokenizer(tmp_path / "bytes", "bytes")
    assert structured_output_problem(str(tmp_path / "bytes")) is None
