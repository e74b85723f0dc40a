"""vLLM's sampling rules, checked on a cluster against one in-process vLLM engine (the
session's ``single_engine``): ``min_tokens`` with stop strings, and seeded sampling (one
generator per request, seeded once; sample ``i`` of ``n`` seeded ``seed + i``). Shared by
the prefill/decode tests (tests/integration/test_sampling_rules.py) and the colocated ones
(tests/integration/test_colocated.py)."""

from __future__ import annotations

import random
from collections import Counter

MAX_TOKENS = 16


def _one(engine, prompt: list[int], **knobs):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(**knobs),
                          use_tqdm=False)[0]
    return out.outputs


WORDS = ("every request carries a prompt and a set of sampling parameters the router "
         "picks a prefill worker by adapter locality and a decode worker by load").split()


def _prompts(engine, seed: int, k: int) -> list[list[int]]:
    """Token ids of English text: the prompt ends on a whole character, so one engine's
    text (detokenized after the prompt) is the decoding of the generated ids alone, as the
    cluster writes it (a prompt of random ids can end inside a character)."""
    rng = random.Random(seed)
    tok = engine.get_tokenizer()
    return [tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 16))))
            for _ in range(k)]


def check_min_tokens_with_stop_strings(client, engine) -> None:
    """A stop string that appears in the first tokens: with ``min_tokens`` the completion
    goes on to at least ``min_tokens`` tokens and stops at the first occurrence that ends
    after them -- text, tokens and finish reason equal one engine's."""
    longer = 0
    for p in _prompts(engine, 61, 6):
        full = client.generate(None, prompt_token_ids=p, max_tokens=MAX_TOKENS, ignore_eos=True)
        chars = Counter(ch for ch in full.text if ch.isascii() and ch.isalpha())
        if not chars:
            continue
        stop = chars.most_common(1)[0][0]
        for min_tokens, ignore_eos in ((0, True), (2, True), (12, True), (12, False)):
            knobs = dict(max_tokens=MAX_TOKENS, min_tokens=min_tokens, ignore_eos=ignore_eos,
                         stop=[stop])
            c = client.generate(None, prompt_token_ids=p, **knobs)
            one = _one(engine, p, temperature=0.0, **knobs)[0]
            what = (p, stop, min_tokens, ignore_eos, c.text, c.finish_reason, c.token_ids,
                    one.text, one.finish_reason, one.token_ids, full.text)
            assert (c.text, c.finish_reason) == (one.text, one.finish_reason), what
            assert c.token_ids == tuple(one.token_ids), what
            if min_tokens == 12 and one.finish_reason == "stop":
                assert len(c.token_ids) > 12, what
                longer += full.text.find(stop) < len(c.text)
    assert longer, "no case had its stop string early: the rule was not exercised"


def check_seeded_sampling(client, engine, adapter=None) -> None:
    """Temperature 1 with a seed: the completion is one engine's with the same seed (one
    generator, seeded once, consumed by every token), with and without top-k/top-p."""
    for i, p in enumerate(_prompts(engine, 62, 4)):
        for seed, knobs in ((i, {}), (1000 + i, dict(top_k=20, top_p=0.9))):
            c = client.generate(adapter, prompt_token_ids=p, max_tokens=MAX_TOKENS,
                                temperature=1.0, seed=seed, ignore_eos=True, **knobs)
            one = _one(engine, p, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                       ignore_eos=True, **knobs)[0]
            assert c.token_ids == tuple(one.token_ids), (p, seed, knobs, c.token_ids, one.token_ids)
            assert c.text == one.text


def check_n_seeded_samples(client, engine) -> None:
    """``n = 4`` with a seed: sample ``i`` is one engine's sample ``i`` (seeded ``seed + i``),
    so no sample shares another's draws (nor its own first token's)."""
    for p in _prompts(engine, 63, 2):
        c = client.generate(None, prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=1.0,
                            seed=5, n=4, ignore_eos=True)
        ones = _one(engine, p, max_tokens=MAX_TOKENS, temperature=1.0, seed=5, n=4,
                    ignore_eos=True)
        assert [s.token_ids for s in c.samples] == [tuple(o.token_ids) for o in ones], p
        assert len({s.token_ids for s in c.samples}) == 4
