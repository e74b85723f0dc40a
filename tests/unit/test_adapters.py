"""LoRA-P adapter validation: refused before anything reaches an engine, with the reason."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapter_files import edit_config as _edit_config, edit_tensors as _edit_tensors
from cluster.errors import InvalidAdapter
from prefill_worker.adapters import validate_adapter
from prefill_worker.adapters.base import BaseModelShape


@pytest.fixture(scope="module")
def base(assets):
    from transformers import AutoConfig

    return BaseModelShape.from_hf_config(AutoConfig.from_pretrained(assets["model"]))


@pytest.fixture
def adapter(assets, tmp_path):
    dst = tmp_path / "ad"
    shutil.copytree(assets["adapters"]["ada"], dst)
    return dst


def test_valid_adapter(adapter, base):
    spec = validate_adapter(adapter, base, max_rank=16)
    assert spec.kind == "lora_p" and spec.rank == 8 and len(spec.sha256) == 64
    assert "q_proj" in spec.target_modules


def test_pickle_weights_are_refused(adapter, base):
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(InvalidAdapter, match="pickle"):
        validate_adapter(adapter, base, max_rank=16)


def test_rank_above_limit(adapter, base):
    with pytest.raises(InvalidAdapter, match="max_lora_rank=4"):
        validate_adapter(adapter, base, max_rank=4)


def test_wrong_shape(adapter, base):
    key = next(iter(load_file(str(adapter / "adapter_model.safetensors"))))
    _edit_tensors(adapter, lambda t: t.__setitem__(key, torch.zeros(3, 7)))
    with pytest.raises(InvalidAdapter, match="shape"):
        validate_adapter(adapter, base, max_rank=16)


def test_nan_values(adapter, base):
    def poison(t):
        k = next(k for k in t if k.endswith("lora_B.weight"))
        t[k][0, 0] = float("nan")
    _edit_tensors(adapter, poison)
    with pytest.raises(InvalidAdapter, match="NaN"):
        validate_adapter(adapter, base, max_rank=16)


def test_missing_or_broken_config(adapter, base):
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        validate_adapter(adapter, base, max_rank=16)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter, match="missing"):
        validate_adapter(adapter, base, max_rank=16)


def test_unsupported_targets_and_layer_out_of_range(adapter, base):
    _edit_config(adapter, target_modules=["lm_head"])
    with pytest.raises(InvalidAdapter, match="target_modules"):
        validate_adapter(adapter, base, max_rank=16)


def test_not_safetensors(adapter, base):
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(InvalidAdapter, match="safetensors"):
        validate_adapter(adapter, base, max_rank=16)
