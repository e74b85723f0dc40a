"""Adapter slots for prompts only (``colocated_worker/prompt_slots.py``).

A colocated engine with ``max_loras=2`` serves 32 concurrent requests of 8 LoRA-P adapters,
beside all-token LoRA (kind ``lora``) and ReFT-P requests: the engine's own counters show
steps whose requests had more than 2 adapters (before, vLLM's scheduler admitted no third
adapter while two adapters' requests were decoding), no step ever had more than 2 adapters
holding a slot, every output equals the HF+PEFT PreFT reference token for token (up to a
float near-tie) and its text equals its tokens; ReFT-P pins end at the first token and none
is left when the requests are done. On the prefill/decode path, a prefill engine's requests
leave its scheduler at the first token: ``n > 1`` samples and held KV offers hold no slot.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from reference import engine_text

from conftest import REFT_ADAPTERS

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
N_TOKENS = 16
MAX_LORAS = 2
LORA_P = {f"p{i}": 100 + i for i in range(8)}     # 8 LoRA-P adapters (name -> seed)
ALL_TOKEN = "all0"                                 # kind lora, always holds its slot
REFT = ("rlo", "rdi")


def test_prefill_requests_hold_no_slot_past_the_first_token(cluster):
    """The prefill pool: each sample is an engine request of ``max_tokens=1`` that leaves
    the scheduler's running set at its first token, so ``n = 2`` samples of 4 adapters with
    their KV held for decode (8 offers) leave nothing counted against ``max_loras``. (First
    in this file, so that the session's cluster, which then owns Ray, outlives this
    module's.)"""
    import ray

    from cluster.messages import AdapterRef, PrefillRequest, Sampling

    w = cluster.pool.prefill[0].actor
    refs = []
    for i, name in enumerate(("ada", "bea", "cid", "dov")):
        r = cluster.view.adapters[name]
        req = PrefillRequest(f"slots-{i}", AdapterRef(r.name, r.version, r.kind, r.sha256, r.uri),
                             Sampling(max_tokens=8, n=2, temperature=1.0, seed=i),
                             prompt_text=f"held offer number {i} " * 6)
        refs.append(w.prefill.remote(req))
    results = ray.get(refs, timeout=120)
    held = [s.kv.transfer_id for res in results for s in (res, *res.siblings)]
    assert len(held) == 8 and ray.get(w.held_transfers.remote(), timeout=30) >= 8

    def scheduler_view(self):
        sched = self.loop.engine.engine_core.engine_core.scheduler
        return (len(sched.running), len(sched.waiting),
                sorted({r.lora_request.lora_int_id for r in sched.running if r.lora_request}))

    try:
        assert ray.get(w.__ray_call__.remote(scheduler_view), timeout=30) == (0, 0, [])
    finally:
        for tid in held:
            ray.get(w.release.remote(tid), timeout=30)


@pytest.fixture(scope="module")
def slots_cluster(assets, tmp_path_factory):
    from app.launcher import LocalCluster
    from app.tiny import make_lora_adapter
    from cluster.config import (ClusterConfig, ColocatedConfig, DecodeConfig, EngineConfig,
                                PrefillConfig, RouterConfig)

    root = tmp_path_factory.mktemp("slots-adapters")
    paths = {n: str(make_lora_adapter(root / n, assets["model"], seed=s))
             for n, s in LORA_P.items()}
    paths[ALL_TOKEN] = str(make_lora_adapter(root / ALL_TOKEN, assets["model"], seed=131))
    paths.update({n: assets["adapters"][n] for n in REFT})
    eng = EngineConfig(model=assets["model"])
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        colocated=ColocatedConfig(engine=eng, max_loras=MAX_LORAS),
                        prefill_workers=0, decode_workers=0, colocated_workers=1,
                        router=RouterConfig(port=0), adapters=tuple(paths.items()),
                        adapter_kinds=((ALL_TOKEN, "lora"),),
                        run_dir=str(tmp_path_factory.mktemp("slots-run")), name="slots")
    c = LocalCluster(cfg).start_in_thread()
    c.adapter_paths = paths
    yield c
    c.stop()


def _worker_state(c):
    """The colocated worker's counters and ReFT-P pins, read inside the actor."""
    import ray

    def read(self):
        s = self.slots
        return dict(stats={k: v for k, v in vars(s).items() if k != "sink"},
                    reft_active=self.adapters.reft.active(),
                    ended_early=dict(self.adapters._ended_early))

    return ray.get(c.pool.colocated[0].actor.__ray_call__.remote(read), timeout=30)


def _jobs(vocab: int) -> list[tuple[str, str, list[int]]]:
    """(adapter, reference mode, prompt): 4 requests of each LoRA-P adapter (32), and 4
    all-token and 4 ReFT-P requests beside them, shuffled."""
    rng = random.Random(24)
    names = [n for n in LORA_P for _ in range(4)]
    jobs = [(n, "preft") for n in names] + [(ALL_TOKEN, "lora")] * 4
    jobs += [(n, "preft") for n in REFT for _ in range(2)]
    rng.shuffle(jobs)
    return [(n, mode, [rng.randrange(3, vocab) for _ in range(rng.choice((9, 40, 90, 150)))])
            for n, mode in jobs]


def test_more_adapters_decode_than_max_loras_and_every_token_is_exact(slots_cluster,
                                                                      reference, assets):
    from preft_client import PreftClient
    from transformers import AutoTokenizer

    c = slots_cluster
    jobs = _jobs(c.pool.colocated[0].info.vocab_size)
    before = _worker_state(c)["stats"]
    with PreftClient(c.address, timeout=300) as client, ThreadPoolExecutor(len(jobs)) as ex:
        outs = list(ex.map(lambda j: client.generate(j[0], prompt_token_ids=j[2],
                                                     max_tokens=N_TOKENS, ignore_eos=True),
                           jobs))
    after = _worker_state(c)
    st = after["stats"]
    print(f"\nsteps {st['steps'] - before['steps']}, wide steps "
          f"{st['wide_steps'] - before['wide_steps']}, most adapters in one step's batch "
          f"{st['max_batch_adapters']}, most holding a slot {st['max_slot_adapters']}")
    # the engine's own counters: requests of more than max_loras adapters in one batch ...
    assert st["wide_steps"] > before["wide_steps"] and st["max_batch_adapters"] > MAX_LORAS
    # ... while no step had more than max_loras adapters holding a slot, and the all-token
    # adapter held its slot while it decoded
    assert st["max_slot_adapters"] <= MAX_LORAS
    assert st["all_token_decode_steps"] > before["all_token_decode_steps"]
    assert st["prompts_done"] - before["prompts_done"] == len(jobs)
    # ReFT-P pins ended (at the first token, then the unpins found them ended): none left
    assert after["reft_active"] == 0 and after["ended_early"] == {}
    _check_exact(c, jobs, outs, reference, AutoTokenizer.from_pretrained(assets["model"]))


def test_status_and_top_show_the_colocated_slots(slots_cluster, capsys, monkeypatch):
    """``preft status`` and ``preft top`` show the engine's last step (requests decoding,
    adapters prefilling / max_loras) and its wide steps, as its ``AdapterStats`` say; each
    step is also observed by the worker's Prometheus histograms."""
    import ray
    from preft_client import PreftClient
    from rich.console import Console

    from app.cli import main
    from app.top import cluster_status, render

    c = slots_cluster
    wid, actor = c.pool.colocated[0].worker_id, c.pool.colocated[0].actor
    with PreftClient(c.address, timeout=60) as client:
        client.generate("p0", prompt="status of the slots", max_tokens=2)
        st = cluster_status(client)
    stats = ray.get(actor.stats.remote(), timeout=30)
    assert st["slots"] == {wid: (stats.decoding_requests, stats.prefill_adapters, MAX_LORAS,
                                 stats.wide_steps)}
    assert ray.get(actor.__ray_call__.remote(
        lambda self: self.slots.sink is not None and self.slots.steps > 0), timeout=30)
    text = f"{stats.decoding_requests} decoding, {stats.prefill_adapters}/{MAX_LORAS} " \
           f"prefilling, {stats.wide_steps} wide"
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["status", "--address", c.address]) == 0
    assert text in capsys.readouterr().out
    console = Console(record=True, width=300, force_terminal=False)
    console.print(render(st, None, c.address))
    assert text in console.export_text()


def _check_exact(c, jobs, outs, reference, tok) -> None:
    cut = 0
    for (name, mode, p), out in zip(jobs, outs):
        assert len(out.token_ids) == N_TOKENS and out.finish_reason == "length"
        assert out.text == engine_text(tok, out.token_ids)
        ref = reference.generate(p, c.adapter_paths[name], N_TOKENS, mode=mode)
        k = ref.comparable_prefix(GAP_TOL)
        assert tuple(out.token_ids[:k]) == ref.tokens[:k], (
            f"{name} ({mode}), {len(p)}-token prompt: cluster {tuple(out.token_ids[:k])} vs "
            f"reference {ref.tokens[:k]}")
        cut += len(ref.tokens) - k
    assert cut <= 0.05 * len(jobs) * N_TOKENS
