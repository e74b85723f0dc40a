"""Checks of the sampling surface shared by the prefill/decode tests (test_sampling.py)
and the colocated ones (test_colocated.py): the cluster against the single-process
reference (:class:`reference.Rules`, :func:`reference.detailed`)."""

from __future__ import annotations

import random

from reference import Rules, detailed

GAP_TOL = 1e-3
LP_TOL = 2e-3
N = 12
ADAPTERS = [None, "ada", "rlo"]   # base, LoRA-P, ReFT-P


def prompts(vocab: int, lengths=(40, 129, 7)) -> list[list[int]]:
    rng = random.Random(17)
    # a small alphabet: prompts repeat tokens, so the repetition penalty has work to do
    alphabet = [rng.randrange(3, vocab) for _ in range(24)]
    return [[rng.choice(alphabet) for _ in range(L)] for L in lengths]


def assert_tokens(got, ref, what: str) -> int:
    k = ref.comparable_prefix(GAP_TOL)
    assert tuple(got[:k]) == ref.tokens[:k], (
        f"{what}: cluster {got[:k]} vs reference {ref.tokens[:k]}")
    assert k >= 3, f"{what}: only {k} comparable steps"
    return k


def assert_logprobs(c, ref, k: int, what: str) -> None:
    """Token logprobs (first from prefill, the rest from decode) and the top alternatives."""
    assert len(c.logprobs) == len(c.token_ids)
    for i in range(k):
        lp = c.logprobs[i]
        assert lp.token_id == c.token_ids[i]
        assert abs(lp.logprob - ref.logprobs[i]) < LP_TOL, (what, i, lp.logprob, ref.logprobs[i])
        assert [t for t, _ in lp.top] == [t for t, _ in ref.top[i]], (what, i)
        for (_, a), (_, b) in zip(lp.top, ref.top[i]):
            assert abs(a - b) < LP_TOL, (what, i)


def assert_prompt_logprobs(c, prompt, ref, what: str) -> None:
    assert [p.token_id for p in c.prompt_logprobs] == prompt, what
    assert c.prompt_logprobs[0].rank == 0 and all(p.rank >= 1 for p in c.prompt_logprobs[1:])
    worst = max(abs(p.logprob - r) for p, r in zip(c.prompt_logprobs[1:], ref.prompt_logprobs))
    assert worst < LP_TOL, f"{what}: prompt logprobs differ by up to {worst}"


PENALTIES = {
    "presence+frequency": Rules(presence_penalty=1.0, frequency_penalty=1.5),
    "repetition": Rules(repetition_penalty=1.4),
    "all three": Rules(repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=0.9),
}


def knobs(r: Rules) -> dict:
    return dict(repetition_penalty=r.repetition_penalty, presence_penalty=r.presence_penalty,
                frequency_penalty=r.frequency_penalty, logit_bias=dict(r.logit_bias),
                min_tokens=r.min_tokens, stop_token_ids=list(r.stop_token_ids))




def check_logprobs(client, reference, adir, adapter, vocab: int) -> None:
    """Token logprobs (first from prefill, the rest from decode), the top alternatives and
    prompt logprobs equal the reference's; the stream's deltas carry the same."""
    for p in prompts(vocab):
        ref = detailed(reference, p, adir, N, k=3)
        c = client.generate(adapter, prompt_token_ids=p, max_tokens=N, ignore_eos=True,
                            logprobs=3, prompt_logprobs=1)
        what = f"{adapter or 'base'} len={len(p)}"
        k = assert_tokens(c.token_ids, ref, what)
        assert_logprobs(c, ref, k, what)
        assert_prompt_logprobs(c, p, ref, what)
        deltas = list(client.stream(adapter, prompt_token_ids=p, max_tokens=N,
                                    ignore_eos=True, logprobs=3))
        streamed = [lp for d in deltas for lp in d.logprobs]
        assert [x.token_id for x in streamed] == list(c.token_ids)
        # the stream's prompt hits the prefix caches the first request filled: the tail is
        # computed over cached KV, a different float32 summation order (seen: 1.7e-5 on
        # ReFT-P at 129 tokens when this test runs alone)
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, c.logprobs))


def check_penalties(client, reference, assets, rules: Rules, vocab: int) -> None:
    for adapter in ADAPTERS:
        adir = assets["adapters"][adapter] if adapter else None
        for p in prompts(vocab):
            ref = detailed(reference, p, adir, N, rules)
            c = client.generate(adapter, prompt_token_ids=p, max_tokens=N, ignore_eos=True,
                                **knobs(rules))
            assert_tokens(c.token_ids, ref, f"{adapter or 'base'} len={len(p)}")


# ---------------------------------------------------------------- structured output
SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n"],
     "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                    "n": {"type": "integer", "minimum": 0, "maximum": 99}}},
    {"type": "object", "additionalProperties": False, "required": ["color", "tags"],
     "properties": {"color": {"enum": ["red", "green", "blue"]},
                    "tags": {"type": "array", "maxItems": 3,
                             "items": {"type": "string", "maxLength": 4}}}},
    {"type": "array", "minItems": 1, "maxItems": 4,
     "items": {"type": "integer", "minimum": -5, "maximum": 5}},
]


def check_structured(client, vocab: int, adapters=("ada", "rlo", None)) -> int:
    """Every completion under a JSON schema (greedy and sampled, several adapters) parses
    and validates; regex and choice guides hold too. Returns the requests checked."""
    import json
    import re

    import jsonschema

    n = 0
    for i, adapter in enumerate(adapters):
        for j, schema in enumerate(SCHEMAS):
            for temperature in (0.0, 1.0):
                p = prompts(vocab, lengths=(9 + 31 * i + 7 * j,))[0]
                c = client.generate(adapter, prompt_token_ids=p, max_tokens=80,
                                    temperature=temperature, seed=n, json_schema=schema)
                what = f"{adapter or 'base'} schema {j} T={temperature}: {c.text!r}"
                assert c.finish_reason == "stop", what
                jsonschema.validate(json.loads(c.text), schema)
                n += 1
        c = client.generate(adapter, prompt_token_ids=p, max_tokens=20,
                            regex=r"[a-z]{3}-[0-9]{2}")
        assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", c.text), c.text
        c = client.generate(adapter, prompt_token_ids=p, max_tokens=20, temperature=1.0,
                            seed=3, choice=["alpha beta", "gamma", "delta epsilon zeta"])
        assert c.text in ("alpha beta", "gamma", "delta epsilon zeta"), c.text
        n += 2
    return n
