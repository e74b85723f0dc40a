"""Every YAML in deploy/ parses into the frozen configs (unknown fields are errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig, from_dict

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _data(name: str, model: str = "m") -> dict:
    """A deploy YAML's data; one that names no model (the local ones: `preft up` gives them
    the embedded demo model, app.cli._with_embedded_model) gets ``model`` here."""
    data = yaml.safe_load((DEPLOY / name).read_text())
    for sec in ("prefill", "decode", "colocated"):
        if sec in data and "model" not in data[sec]["engine"]:
            data[sec]["engine"]["model"] = model
    return data


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_yaml_parses(path):
    cfg = from_dict(ClusterConfig, _data(path.name))
    assert cfg.prefill.engine.model == cfg.decode.engine.model


def _load(name: str) -> ClusterConfig:
    return from_dict(ClusterConfig, _data(name))


def test_gpu_examples_have_the_documented_shape():
    c8 = _load("llama-3.1-8b-gpu.yaml")
    assert (c8.prefill_workers, c8.decode_workers) == (1, 2)
    assert c8.prefill.num_gpus == c8.decode.num_gpus == 1
    assert dict(c8.prefill.resources) == {"prefill_node": 1}
    assert dict(c8.decode.resources) == {"decode_node": 1}
    assert c8.ray_address == "auto" and c8.prefill.engine.dtype == "bfloat16"
    assert c8.router.require_auth   # binds 0.0.0.0: keys are mandatory
    c70 = _load("llama-3.1-70b-tp4.yaml")
    # Tensor parallel 4 on both pools: 4 GPUs per worker, one per rank.
    assert c70.prefill.num_gpus == c70.decode.num_gpus == 4
    assert c70.prefill.engine.tensor_parallel_size == c70.decode.engine.tensor_parallel_size == 4


def test_unknown_field_in_a_deploy_yaml_is_an_error(tmp_path):
    from cluster.config import ConfigError

    data = yaml.safe_load((DEPLOY / "llama-3.1-8b-gpu.yaml").read_text())
    data["prefill"]["engine"]["pipeline_parallel_size"] = 4
    with pytest.raises(ConfigError, match="pipeline_parallel_size"):
        from_dict(ClusterConfig, data)


def test_colocated_example_is_colocated_only():
    c = _load("local-colocated.yaml")
    assert (c.prefill_workers, c.decode_workers, c.colocated_workers) == (0, 0, 1)
    assert c.colocated_cfg.max_loras == 8 and c.colocated_cfg.engine.model == c.prefill.engine.model


def test_pool_sizes_are_validated_with_the_field_named():
    from cluster.config import ConfigError

    data = _data("local-colocated.yaml")
    with pytest.raises(ConfigError, match="prefill_workers.*both >= 1, or both 0"):
        from_dict(ClusterConfig, {**data, "decode_workers": 1})
    with pytest.raises(ConfigError, match="colocated_workers=0: the cluster needs workers"):
        from_dict(ClusterConfig, {**data, "colocated_workers": 0})
    with pytest.raises(ConfigError, match="adapter_kinds"):
        from_dict(ClusterConfig, {**data, "adapter_kinds": {"nobody": "lora"}})


def test_yaml_errors_name_the_field_and_value_and_hide_the_secret():
    from cluster.config import ConfigError

    data = _data("local-cpu.yaml")
    with pytest.raises(ConfigError, match=r"ClusterConfig\.router\.port='x': .*valid integer"):
        from_dict(ClusterConfig, {**data, "router": {"port": "x"}})
    with pytest.raises(ConfigError, match=r"prefill\.engine: EngineConfig\.dtype='fp8'"):
        from_dict(ClusterConfig, {**data, "prefill": {"engine": {"model": "m", "dtype": "fp8"}}})
    with pytest.raises(ConfigError, match=r"ClusterConfig\.prefill\.resources\.0\.1='y'"):
        from_dict(ClusterConfig, {**data, "prefill": {**data["prefill"],
                                                      "resources": [["n", "y"]]}})
    unknown = r"ClusterConfig\.router\.prot: unknown field; known: \[.*'port'"
    with pytest.raises(ConfigError, match=unknown):
        from_dict(ClusterConfig, {**data, "router": {"prot": 1}})
    with pytest.raises(ConfigError) as e:
        from_dict(ClusterConfig, {**data, "decode": {**data["decode"],
                                                     "transfer": {"secret": 271828182}}})
    assert "decode.transfer.secret=<not shown>" in str(e.value) and "271828182" not in str(e.value)


def test_yaml_mappings_become_pairs():
    data = _data("local-cpu.yaml")
    data["prefill"] = {**data["prefill"], "resources": {"b_node": 1, "a_node": 2}}
    cfg = from_dict(ClusterConfig, data)
    assert cfg.prefill.resources == (("a_node", 2.0), ("b_node", 1.0))
    with pytest.raises(Exception):
        cfg.prefill.max_loras = 1   # still frozen


def test_unequal_tensor_parallel_sizes_are_refused_naming_both(tmp_path):
    from cluster.config import ConfigError

    data = yaml.safe_load((DEPLOY / "llama-3.1-70b-tp4.yaml").read_text())
    data["decode"]["engine"]["tensor_parallel_size"] = 2
    with pytest.raises(ConfigError) as ei:
        from_dict(ClusterConfig, data)
    msg = str(ei.value)
    assert "decode.engine.tensor_parallel_size=2" in msg, msg
    assert "prefill.engine.tensor_parallel_size=4" in msg, msg
    data["decode"]["engine"]["tensor_parallel_size"] = 0
    with pytest.raises(ConfigError, match="tensor_parallel_size.*from 1 to 64"):
        from_dict(ClusterConfig, data)


def test_preft_up_tensor_parallel_flags(tmp_path):
    from app.cli import build_config, make_parser
    from cluster.config import ConfigError

    m = str(tmp_path)
    cfg = build_config(make_parser().parse_args(["up", "--model", m, "--tp", "2"]))
    assert cfg.prefill.engine.tensor_parallel_size == cfg.decode.engine.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match=r"decode.engine.tensor_parallel_size=1.*"
                                          r"prefill.engine.tensor_parallel_size=2"):
        build_config(make_parser().parse_args(["up", "--model", m, "--prefill-tp", "2"]))


def test_preft_up_colocated_tp(tmp_path):
    from app.cli import build_config, make_parser

    args = ["up", "--model", str(tmp_path), "--colocated-workers", "1"]
    assert build_config(make_parser().parse_args(args)).colocated_cfg.engine.tensor_parallel_size == 1
    cfg = build_config(make_parser().parse_args([*args, "--colocated-tp", "2"]))
    assert cfg.colocated_cfg.engine.tensor_parallel_size == 2
    assert cfg.prefill.engine.tensor_parallel_size == 1
