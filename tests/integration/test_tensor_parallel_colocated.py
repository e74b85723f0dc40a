"""A colocated worker whose engine has tensor parallelism 2 (one engine, two rank processes).

The prompt-only LoRA mapping and the ReFT-P hooks run on each rank; an all-token adapter
registered as kind ``lora`` reaches every rank before its first request. Concurrent
requests (prompt chunks beside other requests' decode tokens in one step) reproduce the
single-process reference token for token: LoRA-P and ReFT-P with the adapter on the prompt
only, the all-token adapter on every token, the base model.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
TP = 2
N_TOKENS = 16


@pytest.fixture(scope="module")
def tp_colo(assets, tmp_path_factory):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)
    from app.launcher import LocalCluster

    eng = EngineConfig(model=assets["model"], tensor_parallel_size=TP)
    a = assets["adapters"]
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        prefill_workers=0, decode_workers=0, colocated_workers=1,
                        router=RouterConfig(port=0),
                        adapters=(("ada", a["ada"]), ("rlo", a["rlo"]), ("cid_all", a["cid"])),
                        adapter_kinds=(("cid_all", "lora"),),
                        run_dir=str(tmp_path_factory.mktemp("tp-colo-run")), name="tpcolo")
    c = LocalCluster(cfg).start_in_thread()
    try:
        yield c
    finally:
        c.stop()


def test_tp2_colocated_engine_matches_the_reference(tp_colo, reference, assets):
    import ray

    from preft_client import PreftClient

    w = tp_colo.pool.colocated[0]
    assert ray.get(w.actor.__ray_call__.remote(
        lambda self: self.loop.engine.vllm_config.parallel_config.tensor_parallel_size)) == TP
    rng = random.Random(5)
    vocab = w.info.vocab_size
    jobs = [(adapter, mode, [rng.randrange(3, vocab) for _ in range(n)])
            for adapter, mode in (("ada", "preft"), ("rlo", "preft"), ("cid_all", "lora"),
                                  (None, "base"))
            for n in (5, 129, 300)]
    with PreftClient(tp_colo.address, timeout=180) as client, ThreadPoolExecutor(6) as ex:
        # a long generation is decoding while the jobs' prompts arrive: mixed steps
        long = client.stream(None, prompt_token_ids=[7] * 8, max_tokens=200, ignore_eos=True)
        next(iter(long))
        outs = list(ex.map(lambda j: client.generate(j[0], prompt_token_ids=j[2],
                                                     max_tokens=N_TOKENS, ignore_eos=True),
                           jobs))
        assert sum(len(d.token_ids) for d in long) > 0
        stats = ray.get(w.actor.stats.remote())
    compared = 0
    for (adapter, mode, p), c in zip(jobs, outs):
        adir = assets["adapters"]["cid" if adapter == "cid_all" else adapter] if adapter else None
        ref = reference.generate(p, adir, N_TOKENS, mode=mode)
        k = ref.comparable_prefix(GAP_TOL)
        assert list(c.token_ids[:k]) == list(ref.tokens[:k]), (adapter, len(p))
        compared += k
    assert compared >= 0.9 * N_TOKENS * len(jobs)
    # prompt chunks and decode tokens shared steps (counted on the ranks)
    assert stats.mixed_steps > 0, stats
