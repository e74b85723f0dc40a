"""Configs and messages validate at construction; routing policies place as documented."""

from __future__ import annotations

import pytest

from cluster.config import (ClusterConfig, ConfigError, DecodeConfig, EngineConfig,
                            PrefillConfig, RouterConfig, TransferConfig, from_dict)
from cluster.errors import AdapterNotFound, InvalidRequest
from cluster.messages import PrefillRequest, Sampling, WorkerInfo
from router.pool import POLICIES, Locality, WorkerHandle, WorkerPool


def test_engine_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="EngineConfig.dtype='fp8'"):
        EngineConfig(model="m", dtype="fp8")
    with pytest.raises(ConfigError, match="TransferConfig.hold_ttl_s"):
        TransferConfig(timeout_s=30, hold_ttl_s=10)
    with pytest.raises(ConfigError, match="RouterConfig.port"):
        RouterConfig(port=70000)


def test_cluster_config_requires_same_model_both_pools():
    with pytest.raises(ConfigError, match="decode.engine.model"):
        ClusterConfig(prefill=PrefillConfig(engine=EngineConfig(model="a")),
                      decode=DecodeConfig(engine=EngineConfig(model="b")))


def test_from_dict_nested_and_unknown_fields(tmp_path):
    cfg = from_dict(ClusterConfig, {
        "prefill": {"engine": {"model": "m"}, "max_loras": 4, "max_cpu_loras": 8},
        "decode": {"engine": {"model": "m"}},
        "router": {"port": 0}})
    assert cfg.prefill.max_loras == 4 and cfg.router.port == 0
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(RouterConfig, {"prot": 1})


@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(seed=-1), "seed"), (dict(stop=("",)), "stop")])
def test_sampling_validation(kw, field):
    with pytest.raises(InvalidRequest) as ei:
        Sampling(**kw).validate()
    assert ei.value.field == field and field in str(ei.value)


def test_prefill_request_needs_exactly_one_prompt():
    with pytest.raises(InvalidRequest, match="prompt"):
        PrefillRequest("r", None, Sampling())
    with pytest.raises(InvalidRequest, match="prompt"):
        PrefillRequest("r", None, Sampling(), prompt_token_ids=(1,), prompt_text="x")


def test_errors_survive_pickling_with_their_code():
    import pickle

    e = pickle.loads(pickle.dumps(AdapterNotFound("x")))
    assert isinstance(e, AdapterNotFound) and e.grpc_code == "NOT_FOUND" and "'x'" in e.message
    e = pickle.loads(pickle.dumps(InvalidRequest("max_tokens", "bad")))
    assert e.field == "max_tokens" and e.grpc_code == "INVALID_ARGUMENT"


def _workers(n):
    return [WorkerHandle(WorkerInfo(f"w{i}", "prefill", "L", 1, 1, None, True, 0.0, 0), None)
            for i in range(n)]


def test_locality_is_sticky_per_adapter_and_spreads_adapters():
    ws, pol = _workers(4), Locality()
    picks = {a: pol.pick(ws, a).worker_id for a in (f"ad{i}" for i in range(40))}
    assert all(pol.pick(ws, a).worker_id == w for a, w in picks.items())
    assert len(set(picks.values())) == 4


def test_locality_spills_when_home_is_overloaded():
    ws, pol = _workers(3), Locality(epsilon=0.25)
    home = pol.pick(ws, "hot")
    home.outstanding = 10
    other = pol.pick(ws, "hot")
    assert other is not home and pol.spills == 1


def test_policies_registry_and_pool():
    assert set(POLICIES) == {"locality", "round_robin", "least_loaded", "hot_set"}
    pool = WorkerPool(prefill=_workers(2), decode=_workers(2))
    pool.decode[0].outstanding = 3
    assert pool.pick_decode() is pool.decode[1]
