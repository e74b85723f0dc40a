"""Activated-LoRA checks over a running colocated cluster (``tests/integration/
test_colocated.py``): aLoRA output equal to PEFT's own generate, every adapter kind in one
batch, and the prefix cache shared before the invocation and never from it on."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from conftest import ALORA_INVOCATION
from reference import engine_text

GAP_TOL = 1e-3
N = 16


def compare(got, ref, what: str) -> int:
    """Steps compared (up to the reference's first near-tie); fails on a difference."""
    k = ref.comparable_prefix(GAP_TOL)
    assert tuple(got[:k]) == ref.tokens[:k], (
        f"{what}: mismatch at step {next(i for i in range(k) if got[i] != ref.tokens[i])}: "
        f"cluster {tuple(got[:k])} vs reference {ref.tokens[:k]}")
    return k


def invoked(rng: random.Random, vocab: int, n: int, where: str) -> list[int]:
    """An ``n``-token prompt (invocation included) holding the invocation tokens at its
    start, middle or end, and no other occurrence of their first token."""
    inv = list(ALORA_INVOCATION)
    body = [rng.choice([t for t in range(8, vocab)]) for _ in range(n - len(inv))]
    at = {"start": 0, "middle": len(body) // 2, "end": len(body)}[where]
    return body[:at] + inv + body[at:]


def check_alora_equals_peft(client, reference, adapters: dict, vocab: int, tok) -> int:
    """Both aLoRA shapes, invocation at the start, middle and end, and a prompt without
    it (PEFT serves the base model): each equals ``PeftModel.generate``; the invoked ones
    with the invocation after the start differ from the same weights on every token."""
    rng = random.Random(27)
    compared, differ, cases = 0, 0, 0
    for name in ("ala", "alm"):
        for where, n in (("start", 9), ("middle", 70), ("end", 131), ("end", 300)):
            p = invoked(rng, vocab, n, where)
            c = client.generate(name, prompt_token_ids=p, max_tokens=N, ignore_eos=True)
            assert c.text == engine_text(tok, c.token_ids)
            compared += compare(c.token_ids, reference.generate_alora(p, adapters[name], N),
                                f"{name}, invocation at the {where} of {n} tokens")
            if name == "ala" and where != "start":
                full = client.generate("ala_all", prompt_token_ids=p, max_tokens=N,
                                       ignore_eos=True)
                compare(full.token_ids, reference.generate(p, adapters["ala_all"], N, "lora"),
                        f"ala_all, {n}")
                differ, cases = differ + (full.token_ids != c.token_ids), cases + 1
        plain = [rng.randrange(8, vocab) for _ in range(40)]
        c = client.generate(name, prompt_token_ids=plain, max_tokens=N, ignore_eos=True)
        compare(c.token_ids, reference.generate_alora(plain, adapters[name], N),
                f"{name}, not invoked")
        compare(c.token_ids, reference.generate(plain, None, N, "base"), f"{name} = base")
    assert differ == cases, "aLoRA must differ from its weights served on every token"
    return compared


def check_every_kind_in_one_batch(client, reference, adapters: dict, vocab: int) -> None:
    """LoRA-P, ReFT-P, all-token LoRA, both aLoRAs and base requests concurrently: each
    equals its own reference."""
    rng = random.Random(31)
    modes = {"ada": "preft", "rlo": "preft", "cid_all": "lora", "ala": "alora",
             "alm": "alora", None: "base"}
    jobs = [(name, invoked(rng, vocab, rng.randrange(20, 200), "end"))
            for name in modes for _ in range(3)]
    rng.shuffle(jobs)

    def run(job):
        return client.generate(job[0], prompt_token_ids=job[1], max_tokens=N, ignore_eos=True)

    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(run, jobs))
    for (name, p), c in zip(jobs, results):
        mode = modes[name]
        if mode == "alora":
            ref = reference.generate_alora(p, adapters[name], N)
        else:
            files = adapters[name] if name else None
            ref = reference.generate(p, files, N, mode)
        compare(c.token_ids, ref, f"{name} ({mode}) in a mixed batch")


def check_prefix_cache_by_span(client, reference, adapters: dict, vocab: int,
                               block: int, stats) -> None:
    """One 600-token context, the invocation, then 300 more tokens, asked of ala, alm, the
    base model and ala again. ``stats()``: the worker's prefix-cache counters (prompt tokens
    by span part, from the engine's scheduler). After the first request, every request hits
    every full block wholly before the invocation; no block holding or following the
    invocation is shared between adapters or with the base model; the same adapter hits its
    own."""
    rng = random.Random(41)
    context = [rng.randrange(8, vocab) for _ in range(600)]
    p = context + list(ALORA_INVOCATION) + [rng.randrange(8, vocab) for _ in range(300)]
    start, full = len(context), len(p) // block * block   # tokens in complete blocks
    before = (start // block) * block      # tokens of the full blocks wholly before it
    assert before >= 512 and full - before >= 2 * block and start % block

    def ask(name):
        st0 = stats()
        c = client.generate(name, prompt_token_ids=p, max_tokens=N, ignore_eos=True)
        ref = (reference.generate_alora(p, adapters[name], N) if name
               else reference.generate(p, None, N, "base"))
        compare(c.token_ids, ref, f"{name} over the shared context")
        return {k: stats()[k] - st0.get(k, 0) for k in stats()}

    first = ask("ala")
    assert first["base_hits"] == 0 and first["adapter_hits"] == 0, first   # a new context
    second = ask("alm")
    assert second["base_queries"] == start and second["base_hits"] == before, second
    assert second["adapter_hits"] == 0, second          # nothing of ala's from the invocation
    base = ask(None)
    assert base["base_queries"] == len(p) and base["base_hits"] == before, base
    again = ask("ala")   # its own blocks: every full one (counted by position: split at start)
    assert again["base_hits"] == start and again["adapter_hits"] == full - start, again


def check_alora_over_http(base_url: str, reference, adapters: dict, vocab: int, tok) -> None:
    """The OpenAI HTTP surface: the model card says kind alora, and a two-turn agent
    conversation (turn 2 = turn 1's prompt and answer, a new question, the invocation again:
    PEFT applies the adapter from the *last* invocation) returns PEFT's text in each body."""
    import httpx

    rng = random.Random(53)
    with httpx.Client(base_url=base_url, timeout=120) as http:
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert cards["ala"]["preft_kind"] == "alora"
        prompt = invoked(rng, vocab, 150, "end")
        for turn in (1, 2):
            body = http.post("/v1/completions", json={
                "model": "ala", "prompt": prompt, "max_tokens": N, "temperature": 0,
                "ignore_eos": True}).json()
            ref = reference.generate_alora(prompt, adapters["ala"], N)
            k = ref.comparable_prefix(GAP_TOL)
            assert k == N, f"turn {turn}: a near-tie at step {k}; pick another seed"
            assert body["choices"][0]["text"] == engine_text(tok, ref.tokens), f"turn {turn}"
            assert body["usage"]["prompt_tokens"] == len(prompt)
            question = [rng.randrange(8, vocab) for _ in range(40)]
            prompt = prompt + list(ref.tokens) + question + list(ALORA_INVOCATION)
