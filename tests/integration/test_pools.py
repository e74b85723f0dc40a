"""Two prefill and two decode workers: the session cluster grows by one of each while it
serves (membership by heartbeat), then adapter-locality routing is checked under a skewed
(Zipf) mix, the bounded-load spill under one hot adapter, token-exactness through both
pools, and a prefill worker's adapter pins (the ``hot_set`` policy's worker half)."""

from __future__ import annotations

import collections
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ADAPTER_SEEDS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def grown(cluster):
    import ray

    new = [cluster.add_worker("prefill"), cluster.add_worker("decode")]
    ray.get([a.info.remote() for a in new])   # engines up
    pool = cluster.pool
    assert cluster.wait_until(lambda: len(pool.prefill) == 2 and len(pool.decode) == 2
                              and all(w.healthy for w in pool.all()), 30), \
        "new workers did not join the router's pools through their heartbeats"
    return cluster


def _zipf_mix(names, n, s=1.1, seed=0):
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(len(names))]
    return rng.choices(names, weights, k=n)


def test_locality_keeps_each_adapter_on_one_prefill_worker(grown, client):
    names = sorted(ADAPTER_SEEDS)
    mix = _zipf_mix(names, 48)
    svc = grown._server.service
    spills_before = grown.pool.prefill_policy.spills

    def run(name):
        return name, client.generate(name, prompt="The scheduler batches requests from many",
                                     max_tokens=4).workers

    # One at a time: no worker is ever over the load bound, so nothing may spill and every
    # adapter must stay on its rendezvous-hash worker.
    placed = [run(name) for name in mix]
    assert grown.pool.prefill_policy.spills == spills_before
    by_adapter = collections.defaultdict(set)
    for name, (pw, dw) in placed:
        by_adapter[name].add(pw)
    assert all(len(ws) == 1 for ws in by_adapter.values()), by_adapter
    used = {pw for _, (pw, _) in placed}
    assert used == {w.worker_id for w in grown.pool.prefill}, "both prefill workers get work"
    with ThreadPoolExecutor(4) as ex:   # concurrent: decode placement by load
        placed = list(ex.map(run, mix[:16]))
    decoders = {dw for _, (_, dw) in placed}
    assert len(decoders) == 2, "decode placement by load uses both decode workers"
    assert svc.pool is grown.pool


def test_hot_adapter_spills_to_the_next_worker(grown, client):
    pol = grown.pool.prefill_policy
    before = pol.spills
    with ThreadPoolExecutor(8) as ex:
        placed = list(ex.map(lambda i: client.generate(
            "ada", prompt_token_ids=[11 + i] * 200, max_tokens=8, ignore_eos=True).workers,
            range(24)))
    assert pol.spills > before
    assert len({pw for pw, _ in placed}) == 2


def test_exact_through_both_pools(grown, client, reference, assets):
    rng = random.Random(21)
    jobs = [(n, [rng.randrange(3, 500) for _ in range(L)])
            for n in ADAPTER_SEEDS for L in (1, 128, 129, 300)]
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda j: client.generate(j[0], prompt_token_ids=j[1], max_tokens=16,
                                                     ignore_eos=True), jobs))
    workers = set()
    for (name, p), c in zip(jobs, outs):
        ref = reference.generate(p, assets["adapters"][name], 16)
        k = ref.comparable_prefix(1e-3)
        assert c.token_ids[:k] == ref.tokens[:k], (name, len(p))
        workers.add(c.workers)
    assert len({d for _, d in workers}) == 2


def test_prefill_worker_pins_adapters_in_its_host_tier(grown, client):
    """The hot_set policy's worker half on a real engine: pinned adapters sit in vLLM's
    host-memory LoRA tier (their next request is an engine hit), and unpin on request."""
    import ray

    from cluster.messages import AdapterRef

    w = grown.pool.prefill[0]
    name = sorted(ADAPTER_SEEDS)[0]
    r = grown.view.adapters[name]
    ref = AdapterRef(r.name, r.version, r.kind, r.sha256, r.uri)
    try:
        assert ray.get(w.actor.pin_adapters.remote((ref,))) == (name,)
        stats = ray.get(w.actor.stats.remote())
        assert stats.pinned == (name,) and stats.resident[name].startswith("engine")
    finally:
        assert ray.get(w.actor.pin_adapters.remote(())) == ()
    assert ray.get(w.actor.stats.remote()).pinned == ()
