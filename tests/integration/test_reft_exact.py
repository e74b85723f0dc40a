"""Token-exact ReFT-P through the whole cluster (router -> prefill -> KV -> decode).

ReFT-P interventions run inside the prefill engine (prefill_worker/reft_runtime.py), per
request, in batches that also hold LoRA-P and base-model requests. The cluster's greedy
tokens must equal the single-process reference (tests/reference.py: HF with forward hooks
on the prompt forward only, then plain greedy decoding over the same cache) up to the first
near-tie (top-2 logit gap below GAP_TOL, as in test_exact.py), and every ReFT-P output must
differ from the base model's so the check can fail.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REFT_ADAPTERS

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
N_TOKENS = 24
LENGTHS = [1, 129, 2, 5, 17, 64, 128, 200, 257]


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(17)
    return [[rng.randrange(3, vocab) for _ in range(L)] for L in LENGTHS]


def _compare(got: tuple[int, ...], ref, what: str) -> tuple[int, int]:
    k = ref.comparable_prefix(GAP_TOL)
    if got[:k] != ref.tokens[:k]:
        i = next(i for i in range(k) if got[i] != ref.tokens[i])
        raise AssertionError(f"{what}: mismatch at step {i}: cluster {got[:k]} vs "
                             f"reference {ref.tokens[:k]}")
    return k, len(ref.tokens) - k


def test_reft_cluster_equals_reference_in_mixed_batches(cluster, client, reference, assets):
    vocab = cluster.pool.prefill[0].info.vocab_size
    prompts = _prompts(vocab)
    names = [*REFT_ADAPTERS, "ada", "bea", None]  # ReFT-P, LoRA-P and base, mixed
    jobs = [(name, p) for p in prompts for name in names]

    def run(job):
        name, p = job
        return client.generate(name, prompt_token_ids=p, max_tokens=N_TOKENS,
                               temperature=0.0, ignore_eos=True)

    with ThreadPoolExecutor(8) as ex:  # concurrent: prefill batches mix kinds and adapters
        results = list(ex.map(run, jobs))

    compared = cut = 0
    same_as_base = []
    for (name, p), c in zip(jobs, results):
        assert len(c.token_ids) == N_TOKENS and c.finish_reason == "length"
        adapter_dir = assets["adapters"][name] if name else None
        ref = reference.generate(p, adapter_dir, N_TOKENS, mode="preft")
        k, d = _compare(c.token_ids, ref, f"{name} on a {len(p)}-token prompt")
        compared += k
        cut += d
        if name in REFT_ADAPTERS:
            base = reference.generate(p, None, N_TOKENS, mode="base")
            if c.token_ids == base.tokens:
                same_as_base.append((name, len(p)))
    print(f"\n{len(jobs)} sequences, {compared} steps compared, {cut} steps cut at near-ties "
          f"(gap < {GAP_TOL})")
    assert cut <= 0.05 * len(jobs) * N_TOKENS
    # Equality is not vacuous: every ReFT-P output differs from the base model's.
    assert not same_as_base, f"ReFT-P outputs equal to the base model's: {same_as_base}"


def test_reft_prefix_cache_and_new_version(cluster, client, reference, assets):
    """Same cacheable prompt under two ReFT-P adapters and LoRA, a repeat (prefix-cache hit)
    and a new version of a ReFT-P adapter: never served from another adapter's KV."""
    import ray

    rng = random.Random(5)
    vocab = cluster.pool.prefill[0].info.vocab_size
    p = [rng.randrange(3, vocab) for _ in range(2 * 128 + 7)]
    a = assets["adapters"]

    def check(name, adapter_dir):
        c = client.generate(name, prompt_token_ids=p, max_tokens=16, ignore_eos=True)
        _compare(c.token_ids, reference.generate(p, adapter_dir, 16), name)
        return c.token_ids

    cluster.register_adapter("rtmp", a["rlo"])
    try:
        out_1 = check("rtmp", a["rlo"])
        out_di = check("rdi", a["rdi"])
        out_lora = check("ada", a["ada"])
        assert len({out_1, out_di, out_lora}) == 3
        assert check("rtmp", a["rlo"]) == out_1          # repeat: prefix-cache hit
        assert cluster.register_adapter("rtmp", a["rfl"]) == 2
        out_2 = check("rtmp", a["rfl"])                  # never v1's cached KV
        assert out_2 != out_1
        resident = {}
        for w in cluster.pool.prefill:
            resident.update(ray.get(w.actor.stats.remote()).resident)
        assert resident.get("rtmp") == "engine@v2", resident
    finally:
        client.delete_adapter("rtmp")
