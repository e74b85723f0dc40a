"""Tensor parallelism 2 on both pools: KV moves rank to rank and the output stays exact.

One prefill and one decode worker, each with a vLLM engine of ``tensor_parallel_size=2``
(vLLM's mp executor: two rank processes per worker, gloo between them on CPU) on the tiny
GQA model, whose two KV heads split one per rank. Each prefill rank serves its shard; each
decode rank pulls its prefill peer's shard. Greedy outputs equal the single-process HF+PEFT
PreFT reference for LoRA-P and ReFT-P adapters (interventions on every prompt position
and on the first/last few) and the base model, at prompt lengths around the block size;
the KV bytes a request reports (summed over the ranks) equal the unsharded count; no
block is held or in use afterwards.
"""

from __future__ import annotations

import random

import pytest

from reference import unsharded_kv_bytes

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
TP = 2


@pytest.fixture(scope="module")
def tp_cluster(assets, tmp_path_factory):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)
    from app.launcher import LocalCluster

    eng = EngineConfig(model=assets["model"], tensor_parallel_size=TP)
    adapters = tuple((n, assets["adapters"][n]) for n in ("ada", "bea", "rlo", "rfl"))
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        prefill_workers=1, decode_workers=1, router=RouterConfig(port=0),
                        adapters=adapters, run_dir=str(tmp_path_factory.mktemp("tp-run")),
                        name="tp2")
    c = LocalCluster(cfg).start_in_thread()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tclient(tp_cluster):
    from preft_client import PreftClient

    with PreftClient(tp_cluster.address, timeout=120, retries=0) as c:
        yield c


def test_tp2_prefill_and_decode_match_the_reference(tp_cluster, tclient, reference, assets):
    import ray

    info = tp_cluster.pool.prefill[0].info
    block_size = int(info.kv_layout.split("/")[2].split("x")[1])
    rng = random.Random(7)
    compared = total = 0
    for adapter in ("ada", "bea", "rlo", "rfl", None):
        for n in (3, block_size, block_size + 1, 129, 300):
            p = [rng.randrange(3, info.vocab_size) for _ in range(n)]
            c = tclient.generate(adapter, prompt_token_ids=p, max_tokens=16, ignore_eos=True)
            ref = reference.generate(p, assets["adapters"][adapter] if adapter else None, 16)
            k = ref.comparable_prefix(GAP_TOL)
            assert list(c.token_ids[:k]) == list(ref.tokens[:k]), (adapter, n)
            compared, total = compared + k, total + 16
            # both ranks' shards, added up: the unsharded prompt's KV
            assert c.kv_bytes == unsharded_kv_bytes(assets["model"], n, info.kv_layout), (
                n, c.kv_bytes)
            assert c.kv_transport == "shm", c.kv_transport   # one host: shared memory
    assert compared >= 0.9 * total
    # ReFT-P ran on both prefill ranks (each applies it to its copy of the residual stream)
    rows = ray.get(tp_cluster.pool.prefill[0].actor.__ray_call__.remote(
        lambda self: self.loop.engine.collective_rpc(
            lambda w: w.worker.model_runner.preft_reft.rows_intervened)))
    assert len(rows) == TP and all(r > 0 for r in rows), rows
    p_actor, d_actor = tp_cluster.pool.prefill[0].actor, tp_cluster.pool.decode[0].actor
    assert tp_cluster.wait_until(lambda: ray.get(p_actor.held_transfers.remote()) == 0, 20)
    assert tp_cluster.wait_until(
        lambda: (lambda u: u.blocks_free == u.blocks_total and u.requests == 0)(
            ray.get(d_actor.kv_usage.remote())), 20)


def test_tp2_engines_run_two_ranks_each(tp_cluster, tclient):
    import ray

    # what `preft status` shows operators
    assert [(w.role, w.tensor_parallel_size) for w in tclient.cluster_status()["workers"]] == [
        ("prefill", TP), ("decode", TP)]

    for w in tp_cluster.pool.all():
        ranks = ray.get(w.actor.__ray_call__.remote(
            lambda self: self.loop.engine.vllm_config.parallel_config.tensor_parallel_size))
        assert ranks == TP, (w.worker_id, ranks)
    # each rank's KV cache holds its shard: the model's 2 KV heads, one per rank
    info = tp_cluster.pool.prefill[0].info
    assert int(info.kv_layout.split("/")[2].split("x")[0]) == 2 // TP, info.kv_layout
    # LoRA-P on every prefill rank runs our grouped kernel (installed by vLLM's plugin)
    kernels = ray.get(tp_cluster.pool.prefill[0].actor.__ray_call__.remote(
        lambda self: self.loop.engine.collective_rpc(lambda w: sorted({
            type(p).__name__ for p in
            w.worker.model_runner.lora_manager._adapter_manager.punica_wrapper_mapping.values()}))))
    assert kernels == [["GroupedPunicaWrapperCPU"]] * TP, kernels
    # each prefill rank advertises its own endpoint: host:port0+port1
    kv = ray.get(tp_cluster.pool.prefill[0].actor.__ray_call__.remote(
        lambda self: self.kv.kv_address))
    assert len(kv.rpartition(":")[2].split("+")) == TP, kv


def test_tp2_text_stream_and_openai_bodies_are_what_the_tokens_say(tp_cluster, tclient,
                                                                   reference, assets):
    """Where users meet it: the SDK's text, its stream deltas, and an OpenAI completions
    body through the HTTP gateway, for a LoRA-P and a ReFT-P adapter on the TP 2 cluster."""
    import httpx
    from transformers import AutoTokenizer

    from http_gateway import HttpGatewayThread
    from reference import engine_text

    tok = AutoTokenizer.from_pretrained(assets["model"])
    gw = HttpGatewayThread(tp_cluster.address, timeout=120)
    gw.start()
    try:
        for adapter in ("ada", "rfl"):
            p = [5 + (11 * i + len(adapter)) % 400 for i in range(150)]
            c = tclient.generate(adapter, prompt_token_ids=p, max_tokens=12, ignore_eos=True)
            ref = reference.generate(p, assets["adapters"][adapter], 12)
            k = ref.comparable_prefix(GAP_TOL)
            assert list(c.token_ids[:k]) == list(ref.tokens[:k]), adapter
            assert c.text == engine_text(tok, c.token_ids), adapter
            deltas = list(tclient.stream(adapter, prompt_token_ids=p, max_tokens=12,
                                         ignore_eos=True))
            assert [t for d in deltas for t in d.token_ids] == list(c.token_ids)
            assert "".join(d.text for d in deltas) == c.text
            with httpx.Client(base_url=gw.base_url, timeout=120) as h:
                r = h.post("/v1/completions", json={"model": adapter, "prompt": p,
                                                    "max_tokens": 12, "temperature": 0,
                                                    "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == c.text, adapter
    finally:
        gw.stop()


def test_a_killed_rank_fails_requests_retriably_and_ray_restarts_the_worker(
        tp_cluster, tclient, reference, assets):
    """Last in the module. SIGKILL one decode rank: vLLM's executor fails the engine's next
    step, the request gets a retriable UNAVAILABLE (not a hang), the worker leaves and
    exits, Ray starts it again with a fresh two-rank engine, and it serves exactly."""
    import os
    import signal
    import time

    import ray

    from preft_client import Unavailable

    d = tp_cluster.pool.decode[0].actor
    actor_pid, rank_pids = ray.get(d.__ray_call__.remote(lambda self: (
        os.getpid(), self.loop.engine.collective_rpc(lambda w: __import__("os").getpid()))))
    os.kill(rank_pids[1], signal.SIGKILL)
    p = [5 + (7 * i) % 300 for i in range(40)]
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        tclient.generate("ada", prompt_token_ids=p, max_tokens=8, ignore_eos=True)
    assert time.monotonic() - t0 < 30, "the failed request took too long"

    def restarted() -> bool:
        try:
            pid = ray.get(d.__ray_call__.remote(lambda self: os.getpid()), timeout=5)
        except Exception:
            return False
        return pid != actor_pid and tp_cluster.pool.decode[0].healthy
    assert tp_cluster.wait_until(restarted, 180), "Ray did not restart the decode worker"
    deadline, c = time.monotonic() + 60, None
    while c is None:
        try:
            c = tclient.generate("ada", prompt_token_ids=p, max_tokens=8, ignore_eos=True)
        except Unavailable:
            assert time.monotonic() < deadline
            time.sleep(1)
    ref = reference.generate(p, assets["adapters"]["ada"], 8)
    k = ref.comparable_prefix(GAP_TOL)
    assert list(c.token_ids[:k]) == list(ref.tokens[:k])
    assert c.kv_bytes == unsharded_kv_bytes(assets["model"], len(p),
                                            tp_cluster.pool.prefill[0].info.kv_layout)
