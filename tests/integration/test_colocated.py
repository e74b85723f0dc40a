"""Colocated workers: one engine, adapter on prompt positions only, decode in the same batch.

A colocated-only cluster (``preft up --colocated-workers 1``: no prefill or decode pool)
must reproduce the single-process PreFT reference token for token (LoRA-P, ReFT-P and the
base model; with logprobs and penalties too, concurrent, so prompt chunks and other users' decode tokens share engine
steps: asserted from the worker's step counter), serve all-token LoRA adapters (kind
``lora``) exactly as HF+PEFT with the adapter on every token, serve activated-LoRA adapters
(kind ``alora``) exactly as PEFT's own generate, share the base model's prefix-cache blocks
before an aLoRA's invocation and no block from it on (``tests/alora_checks.py``), and then
-- grown by a prefill and a decode worker -- keep every all-token request off the decode
pool.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from reference import engine_text

from conftest import ADAPTER_SEEDS, ALORA_ADAPTERS, REFT_ADAPTERS
from prefill_worker.adapters.alora import without_invocation

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
N_TOKENS = 24
LENGTHS = [128, 129, 256, 1, 2, 5, 17, 63, 127, 200, 255, 257]


@pytest.fixture(scope="module")
def colo(assets, tmp_path_factory):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)
    from app.launcher import LocalCluster

    eng = EngineConfig(model=assets["model"])
    a = dict(assets["adapters"])
    # aLoRA "ala"'s weights as a plain LoRA file set, served on every token (kind lora)
    a["ala_all"] = str(without_invocation(a["ala"], tmp_path_factory.mktemp("ala_all")))
    adapters = tuple((n, a[n]) for n in [*ADAPTER_SEEDS, *REFT_ADAPTERS, *ALORA_ADAPTERS]) + (
        ("cid_all", a["cid"]), ("ala_all", a["ala_all"]))
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        prefill_workers=0, decode_workers=0, colocated_workers=1,
                        router=RouterConfig(port=0), adapters=adapters,
                        adapter_kinds=(("cid_all", "lora"), ("ala_all", "lora")),
                        run_dir=str(tmp_path_factory.mktemp("colo-run")), name="colo")
    c = LocalCluster(cfg).start_in_thread()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cclient(colo):
    from preft_client import PreftClient

    with PreftClient(colo.address, timeout=120) as c:
        yield c


def _compare(got, ref, what: str) -> tuple[int, int]:
    k = ref.comparable_prefix(GAP_TOL)
    assert tuple(got[:k]) == ref.tokens[:k], (
        f"{what}: mismatch at step {next(i for i in range(k) if got[i] != ref.tokens[i])}: "
        f"cluster {tuple(got[:k])} vs reference {ref.tokens[:k]}")
    return k, len(ref.tokens) - k


def _stats(colo):
    import ray

    return ray.get(colo.pool.colocated[0].actor.stats.remote(), timeout=30)


def test_colocated_only_cluster_has_no_prefill_or_decode_pool(colo, cclient):
    import os

    assert not colo.pool.prefill and not colo.pool.decode and len(colo.pool.colocated) == 1
    # a colocated engine computes on every core (one OpenMP thread each: before, Ray's
    # OMP_NUM_THREADS=1 left a multi-core engine single-threaded)
    assert colo.pool.colocated[0].info.engine_threads == (os.cpu_count() or 1)
    st = cclient.cluster_status()
    assert [w.role for w in st["workers"]] == ["colocated"]
    assert cclient.get_adapter("cid_all").kind == "lora"
    assert cclient.get_adapter("cid").kind == "lora_p"


def test_colocated_equals_preft_reference_in_mixed_steps(colo, cclient, reference, assets):
    from transformers import AutoTokenizer

    rng = random.Random(7)
    vocab = colo.pool.colocated[0].info.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]
    jobs = [(name, p) for name in [*ADAPTER_SEEDS, "rlo", "rfl", None] for p in prompts]
    mixed_before = _stats(colo).mixed_steps

    def run(job):
        name, p = job
        return cclient.generate(name, prompt_token_ids=p, max_tokens=N_TOKENS, ignore_eos=True)

    with ThreadPoolExecutor(8) as ex:  # concurrent: prompt chunks beside decode tokens
        results = list(ex.map(run, jobs))
    tok = AutoTokenizer.from_pretrained(assets["model"])
    compared = cut = differ_base = 0
    for (name, p), c in zip(jobs, results):
        assert len(c.token_ids) == N_TOKENS and c.finish_reason == "length"
        assert c.text == engine_text(tok, c.token_ids)
        adapter_dir = assets["adapters"][name] if name else None
        k, d = _compare(c.token_ids, reference.generate(p, adapter_dir, N_TOKENS, mode="preft"),
                        f"{name}, {len(p)}-token prompt")
        compared, cut = compared + k, cut + d
        if name is not None:
            differ_base += c.token_ids != reference.generate(p, None, N_TOKENS, "base").tokens
        assert c.workers[0] == colo.pool.colocated[0].worker_id and c.kv_bytes == 0
    print(f"\n{len(jobs)} sequences on the colocated worker, {compared} steps compared, "
          f"{cut} cut at near-ties")
    assert cut <= 0.05 * len(jobs) * N_TOKENS
    assert differ_base >= 0.9 * (len(jobs) - len(prompts))
    mixed = _stats(colo).mixed_steps - mixed_before
    assert mixed >= 1, "no engine step held a prompt chunk and another request's decode token"


def test_all_token_lora_equals_peft_on_every_token(colo, cclient, reference, assets):
    rng = random.Random(9)
    vocab = colo.pool.colocated[0].info.vocab_size
    cid = assets["adapters"]["cid"]
    differ = 0
    for n in (5, 64, 130):
        p = [rng.randrange(3, vocab) for _ in range(n)]
        full = cclient.generate("cid_all", prompt_token_ids=p, max_tokens=16, ignore_eos=True)
        _compare(full.token_ids, reference.generate(p, cid, 16, mode="lora"), f"cid_all, {n}")
        prompt_only = cclient.generate("cid", prompt_token_ids=p, max_tokens=16, ignore_eos=True)
        _compare(prompt_only.token_ids, reference.generate(p, cid, 16, mode="preft"), f"cid, {n}")
        differ += full.token_ids != prompt_only.token_ids
    assert differ == 3, "all-token LoRA must differ from the same files served as LoRA-P"


@pytest.mark.parametrize("adapter", [None, "ada", "rlo"])
def test_colocated_logprobs_equal_the_reference(colo, cclient, reference, assets, adapter):
    """Token and prompt logprobs on the colocated path (one engine, adapter on the prompt
    positions only), as on the prefill/decode path (``test_sampling.py``)."""
    from sampling_checks import check_logprobs

    check_logprobs(cclient, reference, assets["adapters"][adapter] if adapter else None,
                   adapter, colo.pool.colocated[0].info.vocab_size)


def test_colocated_penalties_equal_one_engine(colo, cclient, reference, assets):
    from sampling_checks import PENALTIES, check_penalties

    check_penalties(cclient, reference, assets, PENALTIES["all three"],
                    colo.pool.colocated[0].info.vocab_size)


def test_colocated_structured_output_parses_and_validates(colo, cclient):
    from sampling_checks import check_structured

    assert check_structured(cclient, colo.pool.colocated[0].info.vocab_size) >= 20


def test_colocated_n_samples(colo, cclient, reference, assets):
    """n samples on one engine: each is exactly the request seeded seed + i; greedy ones
    equal the reference."""
    from sampling_checks import N, assert_tokens, prompts
    from reference import detailed

    p = prompts(colo.pool.colocated[0].info.vocab_size, lengths=(70,))[0]
    c = cclient.generate("ada", prompt_token_ids=p, max_tokens=8, temperature=1.0, seed=9,
                         n=3, ignore_eos=True)
    assert [s.index for s in c.samples] == [0, 1, 2] and c.usage.completion_tokens == 24
    for i, s in enumerate(c.samples):
        assert s.token_ids == cclient.generate("ada", prompt_token_ids=p, max_tokens=8,
                                               temperature=1.0, seed=9 + i,
                                               ignore_eos=True).token_ids
    ref = detailed(reference, p, assets["adapters"]["rlo"], N)
    for s in cclient.generate("rlo", prompt_token_ids=p, max_tokens=N, n=2,
                              ignore_eos=True).samples:
        assert_tokens(s.token_ids, ref, f"sample {s.index}")


# ---------------------------------------------------- activated LoRA (kind alora)
def _files(colo) -> dict:
    """Every adapter's directory, ``ala_all`` (ala's weights without the invocation) too."""
    return dict(colo.cfg.adapters)


def test_alora_equals_peft_and_differs_from_all_token_lora(colo, cclient, reference, assets):
    from transformers import AutoTokenizer

    from alora_checks import check_alora_equals_peft

    assert cclient.get_adapter("ala").kind == "alora" and cclient.get_adapter("alm").kind == "alora"
    before = _stats(colo).by_kind
    tok = AutoTokenizer.from_pretrained(assets["model"])
    compared = check_alora_equals_peft(cclient, reference, _files(colo),
                                       colo.pool.colocated[0].info.vocab_size, tok)
    after = _stats(colo).by_kind
    assert after["alora"] - before.get("alora", 0) == 10
    assert after["alora_not_invoked"] - before.get("alora_not_invoked", 0) == 2
    assert compared >= 8 * 8


def test_every_adapter_kind_in_one_batch_equals_its_reference(colo, cclient, reference,
                                                              assets):
    from alora_checks import check_every_kind_in_one_batch

    mixed = _stats(colo).mixed_steps
    check_every_kind_in_one_batch(cclient, reference, _files(colo),
                                  colo.pool.colocated[0].info.vocab_size)
    assert _stats(colo).mixed_steps > mixed


def test_alora_shares_the_base_prefix_cache_before_its_invocation_only(colo, cclient,
                                                                         reference, assets):
    from alora_checks import check_prefix_cache_by_span

    assert not colo.pool.prefill, "base requests must all reach the colocated engine"
    info = colo.pool.colocated[0].info
    check_prefix_cache_by_span(cclient, reference, _files(colo), info.vocab_size,
                               info.block_size,
                               lambda: _stats(colo).prefix_cache)


def test_alora_over_openai_http_in_a_two_turn_conversation(colo, reference, assets):
    from transformers import AutoTokenizer

    from alora_checks import check_alora_over_http

    gw = colo.start_http(timeout=120)
    try:
        check_alora_over_http(gw.base_url, reference, _files(colo),
                              colo.pool.colocated[0].info.vocab_size,
                              AutoTokenizer.from_pretrained(assets["model"]))
    finally:
        gw.stop()


def test_alora_bench_systems_on_this_cluster(colo, tmp_path):
    """``bench/alora.py``'s workload on this cluster (its adapters registered here, a small
    shape): every system completes every turn; aLoRA and base find each conversation's
    context in the prefix cache after its first turn, all-token LoRA never does."""
    from argparse import Namespace

    from app.tiny import make_alora_adapter
    from bench import alora as bench

    assert not colo.pool.prefill, "base requests must all reach the colocated engine"
    model = colo.cfg.colocated_cfg.engine.model
    for i in range(2):
        a = make_alora_adapter(tmp_path / f"al{i}", model, seed=200 + i,
                               invocation=bench.INVOCATION)
        colo.register_adapter(f"al{i}", str(a))
        colo.register_adapter(f"lo{i}", str(without_invocation(a, tmp_path / f"lo{i}")),
                              kind="lora")
    args = Namespace(context=300, question=8, output=4, adapters=2, conversations=2,
                     concurrency=2)
    info = colo.pool.colocated[0].info
    rows = [bench._run_system(colo, s, 7 + k, args, info.vocab_size)
            for k, s in enumerate(bench.SYSTEMS)]
    by = {r["system"]: r for r in rows}
    assert all(r["requests"] == 4 and r["output_tokens"] == 16 for r in rows), rows
    shared = 300 // info.block_size * info.block_size   # turn 2 shares the context only
    assert by["alora"]["prefix_cache"]["base_hits"] == 2 * shared > 0
    assert by["base"]["prefix_cache"]["base_hits"] == 2 * shared
    assert by["lora"]["prefix_cache"]["adapter_hits"] == 0
    assert set(bench._ratios(rows)) == {"alora_ttft_p50_over_lora",
                                        "alora_output_tok_s_over_base",
                                        "lora_output_tok_s_over_base"}


def test_mixed_cluster_keeps_all_token_requests_off_the_decode_pool(colo, cclient):
    """Grown by a prefill and a decode worker: PreFT requests may take either path, all-token
    requests only the colocated one."""
    import ray

    from router.metrics import default_metrics

    new = [colo.add_worker("prefill"), colo.add_worker("decode")]
    ray.get([a.info.remote() for a in new])
    pool = colo.pool
    assert colo.wait_until(lambda: len(pool.prefill) == 1 and len(pool.decode) == 1
                           and all(w.healthy for w in pool.all()), 60)

    def paths():
        out = {}
        for fam in default_metrics().registry.collect():
            if fam.name == "preft_request_paths":
                for s in fam.samples:
                    if s.name.endswith("_total"):
                        key = (s.labels["path"], s.labels["kind"])
                        out[key] = out.get(key, 0) + s.value
        return out

    before, lora_before = paths(), _stats(colo).by_kind.get("lora", 0)
    jobs = ["cid_all", "ada", "cid_all", "rlo", "cid_all", None] * 4
    with ThreadPoolExecutor(6) as ex:
        outs = list(ex.map(lambda a: cclient.generate(a, prompt="The scheduler batches "
                                                      "requests", max_tokens=8), jobs))
    after = paths()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    n_all = jobs.count("cid_all")
    assert delta.get(("prefill_decode", "lora"), 0) == 0, delta
    assert delta.get(("colocated", "lora"), 0) == n_all, delta
    assert _stats(colo).by_kind["lora"] - lora_before == n_all
    assert all(o.workers[1] == pool.colocated[0].worker_id
               for a, o in zip(jobs, outs) if a == "cid_all")
    assert sum(delta.values()) == len(jobs)


# ---------------------------------------------------- vLLM's sampling rules (one engine's)
def test_colocated_min_tokens_with_stop_strings_equal_one_engine(colo, cclient, single_engine):
    from sampling_rules import check_min_tokens_with_stop_strings

    check_min_tokens_with_stop_strings(cclient, single_engine)


def test_colocated_seeded_sampling_equals_one_engine(colo, cclient, single_engine):
    """The same checks as the prefill/decode path's (tests/integration/
    test_sampling_rules.py), so a seeded request's text is the same on both paths."""
    from sampling_rules import check_n_seeded_samples, check_seeded_sampling

    check_seeded_sampling(cclient, single_engine)
    check_n_seeded_samples(cclient, single_engine)
