"""Bad input gets a clear gRPC status naming the field; the cluster keeps serving."""

from __future__ import annotations

import grpc
import pytest

from preft_client import InvalidArgument, NotFound

pytestmark = pytest.mark.integration


def _still_serving(client):
    c = client.generate("cid", prompt="Hello world!", max_tokens=3)
    assert len(c.token_ids) == 3


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(adapter="no-such-adapter", prompt="hi"), NotFound, "no-such-adapter"),
    (dict(adapter="ada", prompt=""), InvalidArgument, "prompt"),
    (dict(adapter="ada", prompt_token_ids=[]), InvalidArgument, "prompt"),
    (dict(adapter="ada", prompt="hi", max_tokens=0), InvalidArgument, "max_tokens"),
    (dict(adapter="ada", prompt="hi", temperature=-0.5), InvalidArgument, "temperature"),
    (dict(adapter="ada", prompt="hi", top_p=1.5), InvalidArgument, "top_p"),
    (dict(adapter="ada", prompt_token_ids=[5] * 1024), InvalidArgument, "prompt"),
    (dict(adapter="ada", prompt_token_ids=[5] * 1000, max_tokens=100), InvalidArgument,
     "max_tokens"),
    (dict(adapter="ada", prompt_token_ids=[10**6]), InvalidArgument, "prompt_token_ids"),
])
def test_bad_input_is_refused_with_the_field_named(client, kwargs, exc, field):
    with pytest.raises(exc) as ei:
        client.generate(**{"max_tokens": 4, **kwargs})
    assert field in ei.value.message
    assert ei.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    _still_serving(client)


def test_max_tokens_one_ends_at_prefill(client, cluster):
    import ray

    c = client.generate("dov", prompt="The scheduler batches requests", max_tokens=1)
    assert len(c.token_ids) == 1 and c.finish_reason == "length"
    assert c.kv_bytes == 0 and c.workers[1] == ""   # no decode, nothing moved
    p = cluster.pool.prefill[0].actor
    assert cluster.wait_until(lambda: ray.get(p.held_transfers.remote()) == 0, 10)


def test_stream_yields_deltas_then_completes(client):
    deltas = list(client.stream("bea", prompt="Operators watch throughput", max_tokens=6))
    assert sum(len(d.token_ids) for d in deltas) == 6
    assert len(deltas) >= 2  # first token from prefill, then decode deltas


async def test_async_client(cluster):
    from preft_client import AsyncPreftClient

    async with AsyncPreftClient(cluster.address) as ac:
        c = await ac.generate("ada", prompt="Hello", max_tokens=5)
        assert len(c.token_ids) == 5
        assert set(await ac.list_adapters()) >= {"ada", "bea", "cid", "dov"}
        with pytest.raises(NotFound):
            await ac.generate("missing", prompt="Hello")


def test_health_and_reflection(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster.address) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="preft.v1.Router"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert "preft.v1.Router" in names and "grpc.health.v1.Health" in names


def test_decode_engine_has_no_lora_and_no_adapter_code(cluster):
    import ray

    d = cluster.pool.decode[0]
    assert d.info.lora_enabled is False
    mods = ray.get(d.actor.__ray_call__.remote(
        lambda self: sorted(m for m in __import__("sys").modules
                            if m.startswith(("prefill_worker", "peft")))))
    assert mods == [], mods
    # No LoRA manager (and so no punica wrapper) in the decode engine's model runner.
    has_lora = ray.get(d.actor.__ray_call__.remote(lambda self: getattr(
        self.loop.engine.engine_core.engine_core.model_executor.driver_worker.worker
        .model_runner, "lora_manager", None) is not None))
    assert has_lora is False
    p = cluster.pool.prefill[0].actor
    wrappers = ray.get(p.__ray_call__.remote(lambda self: sorted(
        type(w).__name__ for w in self.loop.engine.engine_core.engine_core.model_executor
        .driver_worker.worker.model_runner.lora_manager._adapter_manager
        .punica_wrapper_mapping.values())))
    assert wrappers == ["GroupedPunicaWrapperCPU"]   # our grouped LoRA-P kernel, not vLLM's
    assert cluster.pool.prefill[0].info.lora_enabled is True


@pytest.mark.parametrize("kind, files", [("lora", "dov"), ("alora", "ala")])
def test_all_token_adapter_without_colocated_workers_is_failed_precondition(client, cluster,
                                                                            assets, kind, files):
    """The session cluster has prefill and decode pools only: an all-token LoRA (kind lora)
    or an activated LoRA (kind alora) can never run there (it would
    need the adapter on decode), so the request is refused with FAILED_PRECONDITION naming
    the kind and what to start; the cluster keeps serving."""
    from preft_client import FailedPrecondition

    given = kind   # lora: what the uploader says; alora: what its files say too
    assert cluster.register_adapter("everytok", assets["adapters"][files], kind=given) >= 1
    assert client.get_adapter("everytok").kind == kind
    with pytest.raises(FailedPrecondition) as ei:
        client.generate("everytok", prompt="hi", max_tokens=4)
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"kind {kind!r}" in ei.value.message and "--colocated-workers" in ei.value.message
    with pytest.raises(FailedPrecondition):
        list(client.stream("everytok", prompt="hi", max_tokens=4))
    _still_serving(client)
    client.delete_adapter("everytok")


@pytest.mark.parametrize("case, want", [
    ("plain LoRA files", "alora_invocation_tokens"),
    ("outside the vocabulary", "vocabulary"),
    ("empty", "non-empty list of token ids"),
    ("not ids", "not a token id"),
])
def test_bad_alora_adapters_are_refused_saying_what_to_fix(client, assets, tmp_path, case,
                                                            want):
    """An aLoRA upload whose invocation tokens are missing, empty, not token ids or outside
    the base model's vocabulary is INVALID_ARGUMENT saying so; nothing is registered."""
    import shutil

    from adapter_files import edit_config

    src = assets["adapters"]["ada" if case == "plain LoRA files" else "ala"]
    bad = shutil.copytree(src, tmp_path / "bad")
    if case == "outside the vocabulary":
        edit_config(bad, alora_invocation_tokens=[5, 6, 10**6])
    elif case == "empty":
        edit_config(bad, alora_invocation_tokens=[])
    elif case == "not ids":
        edit_config(bad, alora_invocation_tokens=[5, "six"])
    with pytest.raises(InvalidArgument) as ei:
        client.register_adapter("badalora", str(bad), kind="alora")
    assert want in ei.value.message, ei.value.message
    with pytest.raises(NotFound):
        client.get_adapter("badalora")
    _still_serving(client)
