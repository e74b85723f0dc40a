"""What the decode side may do with prompt KV, at the connector and prefix-cache seams.

No engine: the connector in both roles (as vLLM builds it: one instance per role, sharing
the endpoint their worker created) with fake vLLM request objects, and the prefix-cache
rule on a fake coordinator.
- A decode request's prompt KV comes from prefill, once. If the request is scheduled again
  with part of its prompt missing (preempted, blocks evicted), the connector declares the
  missing tokens external and fails that load: vLLM then fails the request instead of
  recomputing the prompt with the base model.
- The decode engine caches a request's blocks only up to its prompt (never the first
  token's or generated tokens' base-model KV).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kv_transfer.connector import PreftKVConnector
from kv_transfer.endpoint import KVEndpoint
from cluster.messages import KVHandle
from worker_runtime.sequence import cache_only_prompt_blocks, cacheable_tokens

BLOCK = 4


@pytest.fixture
def consumer():
    """The decode engine's connector: ``.scheduler`` and ``.worker`` roles, one endpoint."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    endpoint = KVEndpoint("decode-rules-test", "kv_consumer")
    xfer = SimpleNamespace(engine_id="decode-rules-test", kv_role="kv_consumer",
                           kv_connector_extra_config={"endpoint": endpoint})
    cfg = SimpleNamespace(kv_transfer_config=xfer,
                          cache_config=SimpleNamespace(block_size=BLOCK))
    return SimpleNamespace(scheduler=PreftKVConnector(cfg, KVConnectorRole.SCHEDULER),
                           worker=PreftKVConnector(cfg, KVConnectorRole.WORKER))


def _request(num_tokens: int = 10):
    handle = KVHandle(7, "127.0.0.1", 1, "prefill-x", num_tokens,
                      -(-num_tokens // BLOCK), "L4/f32")
    n = num_tokens + 1   # the engine prompt: the prompt, then the first token
    return SimpleNamespace(request_id="r1", kv_transfer_params=handle.to_params(),
                           num_prompt_tokens=n, num_tokens=n)


def _blocks(n: int):
    return SimpleNamespace(get_unhashed_block_ids=lambda: list(range(1, n + 1)))


def test_prompt_kv_is_pulled_once(consumer):
    sched = consumer.scheduler
    req = _request(10)
    assert sched.get_num_new_matched_tokens(req, 0) == (10, True)
    sched.update_state_after_alloc(req, _blocks(3), 10)
    meta = sched.build_connector_meta(None)
    assert [r.req_id for r in meta.recvs] == ["r1"] and not meta.lost
    # loaded: the prompt is complete, nothing more to load
    assert sched.get_num_new_matched_tokens(req, 10) == (0, False)


def test_preempted_request_missing_prompt_kv_fails_instead_of_recomputing(consumer):
    sched, worker = consumer.scheduler, consumer.worker
    req = _request(10)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, _blocks(3), 10)
    sched.build_connector_meta(None)
    # preempted: vLLM reschedules it with only its first cached block still local
    assert sched.get_num_new_matched_tokens(req, BLOCK) == (10 - BLOCK, True)
    sched.update_state_after_alloc(req, _blocks(2), 10 - BLOCK)
    meta = sched.build_connector_meta(None)
    assert meta.lost == ["r1"] and not meta.recvs
    # worker side: the "load" fails at once, so vLLM fails the request
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    res = worker.get_transfer_results(set())
    assert res.failed_recving == {"r1"} and "r1" in res.finished_recving


def test_preempted_request_whose_prompt_is_still_cached_runs_on(consumer):
    sched = consumer.scheduler
    req = _request(8)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, _blocks(2), 8)
    sched.build_connector_meta(None)
    assert sched.get_num_new_matched_tokens(req, 8) == (0, False)


def test_cacheable_tokens_stop_at_the_prompt():
    # decode's prompt = 100 prompt tokens + the first generated token
    assert cacheable_tokens(101, 50, generated_in_prompt=1) == 50
    assert cacheable_tokens(101, 101, generated_in_prompt=1) == 100
    assert cacheable_tokens(101, 300, generated_in_prompt=1) == 100
    assert cacheable_tokens(1, 5, generated_in_prompt=1) == 0


def test_engine_coordinator_is_clamped():
    calls = []
    coordinator = SimpleNamespace(cache_blocks=lambda req, n: calls.append(n))
    manager = SimpleNamespace(coordinator=coordinator)
    engine = SimpleNamespace(engine_core=SimpleNamespace(engine_core=SimpleNamespace(
        scheduler=SimpleNamespace(kv_cache_manager=manager))))
    cache_only_prompt_blocks(engine, generated_in_prompt=1)
    req = SimpleNamespace(num_prompt_tokens=129)
    for n in (64, 128, 129, 200, 256):
        engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator.cache_blocks(req, n)
    assert calls == [64, 128, 128, 128, 128]


def test_refuses_a_vllm_without_the_coordinator():
    engine = SimpleNamespace(engine_core=SimpleNamespace(engine_core=SimpleNamespace(
        scheduler=SimpleNamespace(kv_cache_manager=SimpleNamespace()))))
    with pytest.raises(RuntimeError, match="prompt-only prefix-cache rule"):
        cache_only_prompt_blocks(engine, generated_in_prompt=1)
