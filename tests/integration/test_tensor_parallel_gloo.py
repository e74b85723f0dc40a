"""Tensor parallelism 2 with KV over each rank pair's torch.distributed group (gloo here).

``TransferConfig.shared_memory=False`` on both pools: every rank pair moves its shard over
its own gloo group, as pairs on two hosts do (NCCL on GPUs), instead of a shared-memory
segment. Outputs equal the HF+PEFT PreFT reference; the bytes add up to the unsharded
count, half from each rank.
"""

from __future__ import annotations

import random

import pytest

from reference import unsharded_kv_bytes

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
TP = 2


@pytest.fixture(scope="module")
def gloo_cluster(assets, tmp_path_factory):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig, TransferConfig)
    from app.launcher import LocalCluster

    eng = EngineConfig(model=assets["model"], tensor_parallel_size=TP)
    xfer = TransferConfig(shared_memory=False)
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng, transfer=xfer),
                        decode=DecodeConfig(engine=eng, transfer=xfer),
                        router=RouterConfig(port=0),
                        adapters=(("bea", assets["adapters"]["bea"]),
                                  ("rdi", assets["adapters"]["rdi"])),
                        run_dir=str(tmp_path_factory.mktemp("tp-gloo-run")), name="tpgloo")
    c = LocalCluster(cfg).start_in_thread()
    try:
        yield c
    finally:
        c.stop()


def test_tp2_kv_over_gloo_rank_pairs_is_exact(gloo_cluster, reference, assets):
    import ray

    from preft_client import PreftClient

    info = gloo_cluster.pool.prefill[0].info
    block = int(info.kv_layout.split("/")[2].split("x")[1])
    rng = random.Random(3)
    d = gloo_cluster.pool.decode[0].actor
    with PreftClient(gloo_cluster.address, timeout=120, retries=0) as client:
        for adapter in ("bea", "rdi"):
            for n in (block + 1, 250):
                p = [rng.randrange(3, info.vocab_size) for _ in range(n)]
                c = client.generate(adapter, prompt_token_ids=p, max_tokens=12, ignore_eos=True)
                ref = reference.generate(p, assets["adapters"][adapter], 12)
                k = ref.comparable_prefix(GAP_TOL)
                assert list(c.token_ids[:k]) == list(ref.tokens[:k]), (adapter, n)
                assert c.kv_transport == "gloo", c.kv_transport
                assert c.kv_bytes == unsharded_kv_bytes(assets["model"], n, info.kv_layout), (
                    n, c.kv_bytes)
    # each decode rank pulled half of it
    per_rank = ray.get(d.__ray_call__.remote(lambda self: self.loop.engine.collective_rpc(
        lambda w: sum(r.bytes for r in __import__(
            "vllm.distributed.kv_transfer", fromlist=["x"]).get_kv_transfer_group()
            .worker.endpoint.records()))))
    assert len(per_rank) == TP and per_rank[0] == per_rank[1] > 0, per_rank
