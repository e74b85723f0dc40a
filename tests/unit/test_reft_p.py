"""ReFT-P adapters: validation errors, the intervention math, positions, and the engine
hook's batch plan (no engine: a stand-in model runner)."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adapter_files import edit_config as _edit_config, edit_tensors as _edit_tensors
from cluster.errors import InvalidAdapter
from app.tiny import make_reft_adapter
from prefill_worker.adapters import detect_kind, validate_adapter
from prefill_worker.adapters import reft_p
from prefill_worker.adapters.base import BaseModelShape
from prefill_worker.adapters.reft_p import Positions, parse_positions
from prefill_worker.reft_runtime import EXTRA_ARG, ReftRuntime

BASE = BaseModelShape(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                      num_kv_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # make_reft_adapter only reads the base model's config.json (hidden_size)
    d = tmp_path_factory.mktemp("base")
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 32, "vocab_size": 600}))
    return d


@pytest.fixture(params=["loreft", "direft"])
def adapter(request, model_dir, tmp_path):
    return make_reft_adapter(tmp_path / "ad", model_dir, seed=3, intervention=request.param,
                             layers=(1, 3), rank=4, positions="f2+l3")


def _invalid(path, match, max_rank=16):
    with pytest.raises(InvalidAdapter, match=match):
        validate_adapter(path, BASE, max_rank=max_rank)


# ---------------------------------------------------------------- validation
def test_valid_adapter_detected_as_reft(adapter):
    assert detect_kind(adapter) == "reft_p"
    spec = validate_adapter(adapter, BASE, max_rank=16)
    assert spec.kind == "reft_p" and spec.rank == 4 and len(spec.sha256) == 64
    assert len(spec.target_modules) == 2 and spec.target_modules[0].startswith("layers.1.")


def test_preft_kind_alone_marks_reft(adapter):
    _edit_config(adapter, peft_type=None, preft_kind="reft_p")
    assert validate_adapter(adapter, BASE, max_rank=16).kind == "reft_p"


def test_unknown_preft_kind(adapter):
    _edit_config(adapter, peft_type=None, preft_kind="prefix_tuning")
    _invalid(adapter, "preft_kind='prefix_tuning' is not supported")


def test_pickle_weights_are_refused(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    _invalid(adapter, "pickle")


def test_missing_weights(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    _invalid(adapter, "adapter_model.safetensors is missing")


def test_not_safetensors(adapter):
    (adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    _invalid(adapter, "not a valid safetensors")


def test_rank_above_limit(adapter):
    _invalid(adapter, "max_lora_rank=2", max_rank=2)


@pytest.mark.parametrize("rank", [0, -1, "4", 2.5, True])
def test_bad_rank(adapter, rank):
    _edit_config(adapter, rank=rank)
    _invalid(adapter, "rank must be a positive integer")


def test_unknown_intervention(adapter):
    _edit_config(adapter, intervention="noreft")
    _invalid(adapter, "intervention='noreft': supported are")


@pytest.mark.parametrize("layers,match", [
    ([4], "layer 4 is out of range; the base model has layers 0..3"),
    ([-1], "layer -1 is out of range"),
    ([], "non-empty list"),
    ("1", "non-empty list"),
    ([1, 1], "lists a layer twice"),
])
def test_bad_layers(adapter, layers, match):
    _edit_config(adapter, layers=layers)
    _invalid(adapter, match)


def test_layer_not_in_config(adapter):
    _edit_config(adapter, layers=[1])
    _invalid(adapter, r"layer 3 is not in layers=\[1\]")


def test_hidden_size_mismatch(adapter):
    _edit_config(adapter, hidden_size=512)
    _invalid(adapter, "hidden_size=512 does not match the base model")


@pytest.mark.parametrize("positions", ["first3", "f3+f4", "f0", "l0+f0", "3", "f-1", 5, "f3+"])
def test_bad_positions(adapter, positions):
    _edit_config(adapter, positions=positions)
    _invalid(adapter, "positions=")


def test_wrong_shape(adapter):
    key = next(k for k in load_file(str(adapter / "adapter_model.safetensors"))
               if k.endswith(".bias"))
    _edit_tensors(adapter, lambda t: t.__setitem__(key, torch.zeros(5)))
    _invalid(adapter, r"shape \(5,\) does not match rank=4, hidden_size=256 \(expected \(4,\)\)")


def test_missing_tensor(adapter):
    _edit_tensors(adapter, lambda t: t.pop(sorted(t)[0]))
    _invalid(adapter, "is missing")


def test_unexpected_tensor(adapter):
    _edit_tensors(adapter, lambda t: t.__setitem__("layers.1.extra.weight", torch.zeros(2)))
    _invalid(adapter, "unexpected tensor 'layers.1.extra.weight'")


def test_nan_and_inf(adapter):
    key = sorted(load_file(str(adapter / "adapter_model.safetensors")))[0]
    for bad in (float("nan"), float("inf")):
        def poison(t, bad=bad):
            t[key] = t[key].clone()
            t[key].view(-1)[0] = bad
        _edit_tensors(adapter, poison)
        _invalid(adapter, "NaN or Inf")


def test_integer_dtype(adapter):
    key = sorted(load_file(str(adapter / "adapter_model.safetensors")))[0]
    _edit_tensors(adapter, lambda t: t.__setitem__(key, t[key].to(torch.int32)))
    _invalid(adapter, "not floating point")


def test_loreft_rotation_must_be_orthonormal(model_dir, tmp_path):
    ad = make_reft_adapter(tmp_path / "lo", model_dir, seed=1, intervention="loreft")
    _edit_tensors(ad, lambda t: t.__setitem__("layers.1.rotate_layer.weight",
                                              t["layers.1.rotate_layer.weight"] * 1.5))
    _invalid(ad, "orthonormal rows")


def test_half_precision_accepted(model_dir, tmp_path):
    ad = make_reft_adapter(tmp_path / "lo", model_dir, seed=1, intervention="loreft")
    _edit_tensors(ad, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert validate_adapter(ad, BASE, max_rank=16).kind == "reft_p"
    w = reft_p.load(ad, BASE, 16)
    assert all(t.dtype == torch.float32 for ts in w.layers.values() for t in ts.values())


def test_size_limit(adapter):
    with pytest.raises(InvalidAdapter, match="over the limit"):
        validate_adapter(adapter, BASE, max_rank=16, max_bytes=100)


def test_lora_dirs_still_lora(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert detect_kind(tmp_path) == "lora_p"


# ---------------------------------------------------------------- positions
@pytest.mark.parametrize("spec,want", [
    (None, Positions()), ("all", Positions()), ("ALL", Positions()),
    ("f3", Positions(False, 3, 0)), ("l2", Positions(False, 0, 2)),
    ("f3+l3", Positions(False, 3, 3)), ("l1+f7", Positions(False, 7, 1)),
    ("f0+l2", Positions(False, 0, 2)),
])
def test_parse_positions(spec, want):
    assert parse_positions(spec) == want


def test_position_selection():
    n = 10
    assert [i for i in range(n) if Positions().selects(i, n)] == list(range(n))
    assert [i for i in range(n) if parse_positions("f3+l2").selects(i, n)] == [0, 1, 2, 8, 9]
    assert [i for i in range(4) if parse_positions("f3+l3").selects(i, 4)] == [0, 1, 2, 3]
    assert [i for i in range(1) if parse_positions("l3").selects(i, 1)] == [0]
    assert not Positions().selects(10, n)  # generated tokens are never intervened on
    assert str(parse_positions("l1+f7")) == "f7+l1"


# ---------------------------------------------------------------- math
def test_loreft_math_by_hand(model_dir, tmp_path):
    ad = make_reft_adapter(tmp_path / "lo", model_dir, seed=2, intervention="loreft",
                           layers=(2,), rank=3)
    t = load_file(str(ad / "adapter_model.safetensors"))
    R, W, b = (t["layers.2.rotate_layer.weight"].double(),
               t["layers.2.learned_source.weight"].double(),
               t["layers.2.learned_source.bias"].double())
    w = reft_p.load(ad, BASE, 16)
    h = torch.randn(5, 256, dtype=torch.float64) * 30
    phi = h + w.delta(2, h)
    for i in range(5):  # Φ(h) = h + Rᵀ(Wh + b − Rh), one row at a time
        want = h[i] + R.T @ (W @ h[i] + b - R @ h[i])
        torch.testing.assert_close(phi[i], want, rtol=1e-5, atol=1e-4)
    # LoReFT edits only the R-subspace, where it sets R Φ(h) = W h + b
    torch.testing.assert_close(phi @ R.T, h @ W.T + b, rtol=1e-5, atol=1e-4)
    orth = h - h @ R.T @ R
    torch.testing.assert_close(phi - phi @ R.T @ R, orth, rtol=1e-5, atol=1e-4)


def test_direft_math_by_hand(model_dir, tmp_path):
    ad = make_reft_adapter(tmp_path / "di", model_dir, seed=4, intervention="direft",
                           layers=(0, 3), rank=2)
    t = load_file(str(ad / "adapter_model.safetensors"))
    w = reft_p.load(ad, BASE, 16)
    h = torch.randn(4, 256, dtype=torch.float64) * 30
    for L in (0, 3):
        W1, b, W2 = (t[f"layers.{L}.proj_down.weight"].double(),
                     t[f"layers.{L}.proj_down.bias"].double(),
                     t[f"layers.{L}.proj_up.weight"].double())
        phi = h + w.delta(L, h)
        for i in range(4):  # Φ(h) = h + W₂ᵀ(W₁h + b)
            torch.testing.assert_close(phi[i], h[i] + W2.T @ (W1 @ h[i] + b),
                                       rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- engine hook plan
def _runner(reqs):
    """A stand-in for vLLM's model runner: reqs = [(req_id, key, prompt_len, first_pos, n)]."""
    qsl = np.zeros(len(reqs) + 1, dtype=np.int32)
    positions, requests = [], {}
    for i, (rid, key, plen, start, n) in enumerate(reqs):
        qsl[i + 1] = qsl[i] + n
        positions += list(range(start, start + n))
        sp = SimpleNamespace(extra_args={EXTRA_ARG: key} if key else None)
        requests[rid] = SimpleNamespace(sampling_params=sp, num_prompt_tokens=plen)
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=len(reqs), req_ids=[r[0] for r in reqs]),
        query_start_loc=SimpleNamespace(np=qsl), requests=requests)
    return runner, torch.tensor(positions)


def test_plan_rows_mixed_batch(model_dir, tmp_path):
    a = reft_p.load(make_reft_adapter(tmp_path / "a", model_dir, seed=1, layers=(1, 3)),
                    BASE, 16)
    b = reft_p.load(make_reft_adapter(tmp_path / "b", model_dir, seed=2, layers=(3,),
                                      intervention="direft", positions="f2+l1"), BASE, 16)
    rt = ReftRuntime(4)
    assert rt._build_plan(_runner([("x", None, 3, 0, 3)])[0], torch.arange(3)) is None
    rt.acquire("ka", a)
    rt.acquire("kb", b)
    runner, pos = _runner([
        ("base", None, 4, 0, 4),      # rows 0-3: untouched
        ("ra", "ka", 3, 0, 3),        # rows 4-6: all
        ("rb", "kb", 6, 0, 6),        # rows 7-12: f2+l1 -> positions 0, 1, 5
        ("rb2", "kb", 8, 4, 4),       # rows 13-16: a later chunk (positions 4..7) -> 7
    ])
    plan = rt._build_plan(runner, pos)
    assert set(plan) == {1, 3}
    assert [(w is a, idx.tolist()) for w, idx in plan[1]] == [(True, [4, 5, 6])]
    got = {id(w): idx.tolist() for w, idx in plan[3]}
    assert got == {id(a): [4, 5, 6], id(b): [7, 8, 12, 16]}
    rt.release("kb")
    rt.release("kb")
    with pytest.raises(RuntimeError, match="not pinned"):
        rt._build_plan(runner, pos)


def test_layer_hook_adds_delta_to_hidden_states(model_dir, tmp_path):
    w = reft_p.load(make_reft_adapter(tmp_path / "a", model_dir, seed=1, layers=(2,),
                                      intervention="direft"), BASE, 16)
    rt = ReftRuntime(4)
    hidden, residual = torch.randn(5, 256), torch.randn(5, 256)
    idx = torch.tensor([1, 3])
    rt._plan = {2: [(w, idx)]}
    new_h, new_r = rt._layer_hook(2)(None, (), (hidden, residual))
    assert new_r is residual
    stream = new_h + residual  # the residual stream the next layer sees
    want = hidden + residual
    want[idx] = want[idx] + w.delta(2, want[idx])
    torch.testing.assert_close(stream, want)
    assert torch.equal(new_h[[0, 2, 4]], hidden[[0, 2, 4]])
    assert rt._layer_hook(1)(None, (), (hidden, residual)) is None


def test_host_lru_keeps_pinned(model_dir, tmp_path):
    w = reft_p.load(make_reft_adapter(tmp_path / "a", model_dir, seed=1), BASE, 16)
    rt = ReftRuntime(2)
    rt.put("a", w)
    rt.acquire("a", w)
    rt.put("b", w)
    rt.put("c", w)  # over capacity: "a" is pinned, so "b" goes
    assert "a" in rt and "b" not in rt and "c" in rt
    rt.release("a")
    rt.put("d", w)
    assert "a" not in rt and rt.active() == 0
