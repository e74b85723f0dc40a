"""The sampling surface on the prefill/decode path: logprobs and penalties, where the split
must be invisible.

The first token comes from the prefill engine (adapter on), the rest from the decode engine,
which receives the first token in its *prompt*. Rules that count generated tokens
(presence/frequency penalties, ``min_tokens``) would silently miss the first token there;
logprobs come from two engines and must line up. Every case is compared with the
single-process reference (``tests/reference.py``: :class:`Rules` from vLLM's definitions,
:func:`detailed` for logprobs): greedy tokens up to the first near-tie, logprobs within
float tolerance. The colocated path has the same tests in ``test_colocated.py``.
"""

from __future__ import annotations

import random

import pytest

from reference import Rules, detailed
from sampling_checks import (ADAPTERS, GAP_TOL, N, PENALTIES, assert_tokens, check_logprobs,
                             check_penalties, knobs, prompts)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_logprobs_equal_the_reference(cluster, client, reference, assets, adapter):
    check_logprobs(client, reference, assets["adapters"][adapter] if adapter else None,
                   adapter, cluster.pool.prefill[0].info.vocab_size)


def test_adapter_changes_the_prompt_and_first_token_logprobs(cluster, client):
    """Not vacuous: under an adapter the prompt's logprobs and the first token's differ
    from the base model's (the adapter is on over the prompt)."""
    p = prompts(cluster.pool.prefill[0].info.vocab_size)[0]
    got = {a: client.generate(a, prompt_token_ids=p, max_tokens=2, ignore_eos=True,
                              logprobs=0, prompt_logprobs=0) for a in ADAPTERS}
    for a in ("ada", "rlo"):
        diff = max(abs(x.logprob - y.logprob) for x, y in
                   zip(got[a].prompt_logprobs[1:], got[None].prompt_logprobs[1:]))
        assert diff > 0.01, a
        assert got[a].logprobs[0].logprob != got[None].logprobs[0].logprob


@pytest.mark.parametrize("rules", list(PENALTIES.values()), ids=list(PENALTIES))
def test_penalties_equal_one_engine(cluster, client, reference, assets, rules):
    check_penalties(client, reference, assets, rules, cluster.pool.prefill[0].info.vocab_size)


def test_penalties_count_the_first_token(cluster, client, reference, assets):
    """The case the decode engine gets wrong if it forgets that the first token (in its
    prompt) was generated: greedy output that repeats its first token without a penalty
    must not repeat it with a frequency penalty, exactly as one engine decides."""
    vocab = cluster.pool.prefill[0].info.vocab_size
    rules = Rules(frequency_penalty=2.0)
    found = 0
    for seed in range(40):
        p = [random.Random(seed).randrange(3, vocab) for _ in range(12)]
        plain = detailed(reference, p, None, N)
        first = plain.tokens[0]
        if first not in plain.tokens[1:plain.comparable_prefix(GAP_TOL)] or first in p:
            continue
        found += 1
        ref = detailed(reference, p, None, N, rules)
        c = client.generate(None, prompt_token_ids=p, max_tokens=N, ignore_eos=True,
                            **knobs(rules))
        assert_tokens(c.token_ids, ref, f"seed {seed}")
        if found == 3:
            break
    assert found >= 1, "no prompt whose greedy output repeats its first token"


def test_logit_bias_min_tokens_and_stop_token_ids(cluster, client, reference, assets):
    """``logit_bias`` forces a token on both engines; ``stop_token_ids`` ends the request
    at a token, but not before ``min_tokens`` tokens (counted across the split)."""
    p = prompts(cluster.pool.prefill[0].info.vocab_size)[0]
    for adapter in ADAPTERS:
        adir = assets["adapters"][adapter] if adapter else None
        plain = detailed(reference, p, adir, N)
        forced = plain.tokens[4]
        biased = Rules(logit_bias=((forced, 100.0),))
        c = client.generate(adapter, prompt_token_ids=p, max_tokens=6, ignore_eos=True,
                            **knobs(biased))
        assert c.token_ids == (forced,) * 6
        for stop_at, min_tokens in ((0, 0), (2, 0), (1, 3)):
            stop = plain.tokens[stop_at]
            rules = Rules(min_tokens=min_tokens, stop_token_ids=(stop,))
            ref = detailed(reference, p, adir, N, rules)
            c = client.generate(adapter, prompt_token_ids=p, max_tokens=N, **knobs(rules))
            assert c.token_ids == ref.tokens, (adapter, stop_at, min_tokens)
            stopped = ref.tokens[-1] == stop
            assert stopped or min_tokens, "the stop token must end the unconstrained cases"
            assert c.finish_reason == ("stop" if stopped else "length")
            assert len(c.token_ids) >= max(min_tokens, 1)


@pytest.mark.parametrize("field,knobs", [
    ("sampling.logprobs", dict(logprobs=21)),
    ("sampling.prompt_logprobs", dict(prompt_logprobs=50)),
    ("sampling.presence_penalty", dict(presence_penalty=3.0)),
    ("sampling.repetition_penalty", dict(repetition_penalty=0.0)),
    ("sampling.min_tokens", dict(min_tokens=9)),
    ("sampling.min_p", dict(min_p=1.5)),
    ("sampling.logit_bias", dict(logit_bias={10**6: 1.0})),
    ("sampling.stop_token_ids", dict(stop_token_ids=[10**6])),
])
def test_bad_sampling_is_refused_naming_the_field(client, field, knobs):
    from preft_client import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        client.generate(None, prompt_token_ids=[5, 6, 7], max_tokens=8, **knobs)
    assert e.value.message.startswith(field), e.value.message
    # and the cluster keeps serving
    assert len(client.generate(None, prompt_token_ids=[5, 6, 7], max_tokens=2).token_ids) == 2


def test_structured_output_parses_and_validates(cluster, client):
    """JSON schemas, a regex and a choice on the prefill/decode path: the prefill engine's
    grammar picks the first token, the decode engine's continues from it (a decode grammar
    that started over would write a second value after the first token)."""
    import json

    from sampling_checks import check_structured

    vocab = cluster.pool.prefill[0].info.vocab_size
    assert check_structured(client, vocab) >= 20
    # not vacuous: unguided, this model writes no JSON
    free = client.generate("ada", prompt_token_ids=prompts(vocab)[0], max_tokens=20)
    with pytest.raises(ValueError):
        json.loads(free.text)


def _prefill_counts(cluster):
    import ray

    st = [ray.get(w.actor.stats.remote(), timeout=30) for w in cluster.pool.prefill]
    return sum(s.prompt_tokens for s in st), sum(s.prompt_tokens_cached for s in st)


def _idle(cluster) -> None:
    """Nothing held or leaked once requests are done: prefill offers, decode blocks."""
    import time

    import ray

    deadline = time.time() + 20
    while time.time() < deadline:
        held = sum(ray.get(w.actor.held_transfers.remote()) for w in cluster.pool.prefill)
        used = sum(ray.get(w.actor.kv_usage.remote()).blocks_in_use for w in cluster.pool.decode)
        if held == 0 and used == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{held} prefill offers held, {used} decode blocks in use")


def test_n_samples_prefill_once_and_move_kv_once(cluster, client):
    """n = 4 at temperature 1 with a seed: four samples, each exactly the request with
    seed + i (so reproducible); the prompt's full blocks are computed once on prefill and
    moved once to decode (each later sample pulls only the last, partial block)."""
    vocab = cluster.pool.prefill[0].info.vocab_size
    p, q = prompts(vocab, lengths=(600, 600))[:2]
    single = client.generate("ada", prompt_token_ids=q, max_tokens=8, ignore_eos=True)
    tokens0, cached0 = _prefill_counts(cluster)
    c = client.generate("ada", prompt_token_ids=p, max_tokens=8, temperature=1.0, seed=5,
                        n=4, ignore_eos=True, logprobs=0)
    tokens1, cached1 = _prefill_counts(cluster)
    assert [s.index for s in c.samples] == [0, 1, 2, 3]
    assert all(len(s.token_ids) == 8 and len(s.logprobs) == 8 for s in c.samples)
    assert len({s.token_ids for s in c.samples}) > 1, "samples should differ at T=1"
    assert c.usage.completion_tokens == 32 and c.token_ids == c.samples[0].token_ids
    assert tokens1 - tokens0 == 4 * 600
    computed = (tokens1 - tokens0) - (cached1 - cached0)
    tail = 600 % 128
    assert computed == 600 + 3 * tail, f"prompt tokens computed {computed}"
    blocks = -(-600 // 128)
    assert c.kv_bytes == single.kv_bytes * (blocks + 3) // blocks, (c.kv_bytes, single.kv_bytes)
    for i, s in enumerate(c.samples):
        alone = client.generate("ada", prompt_token_ids=p, max_tokens=8, temperature=1.0,
                                seed=5 + i, ignore_eos=True)
        assert alone.token_ids == s.token_ids, i
    _idle(cluster)


@pytest.mark.parametrize("adapter", ["rlo", None])
def test_n_greedy_samples_equal_the_reference(cluster, client, reference, assets, adapter):
    vocab = cluster.pool.prefill[0].info.vocab_size
    p = prompts(vocab, lengths=(45,))[0]
    ref = detailed(reference, p, assets["adapters"][adapter] if adapter else None, N)
    c = client.generate(adapter, prompt_token_ids=p, max_tokens=N, n=3, ignore_eos=True)
    for s in c.samples:
        assert_tokens(s.token_ids, ref, f"sample {s.index}")
    _idle(cluster)


def test_preft_generate_cli_samples_logprobs_and_choice(cluster, capsys):
    """``preft generate --n 2 --logprobs 1 --choice ...``: each sample printed with its
    tokens' logprobs, every sample one of the choices; a bad flag value is a clear error."""
    from app.cli import make_parser

    args = make_parser().parse_args([
        "generate", "Pick one", "--address", cluster.address, "--adapter", "ada",
        "--n", "2", "--temperature", "1", "--seed", "4", "--logprobs", "1",
        "--choice", "yes please", "--choice", "no"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    texts = [line for line in out.splitlines() if line in ("yes please", "no")]
    assert len(texts) == 2
    assert "(rank " in out
    with pytest.raises(SystemExit) as e:   # refused by the parser, naming the flag
        make_parser().parse_args(["generate", "x", "--address", cluster.address,
                                  "--presence-penalty", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--presence-penalty" in err and "[-2, 2]" in err, err


def test_n_samples_cancelled_early_hold_nothing(cluster, client):
    """A client that leaves after the first tokens of an n-sample request: every sample's
    KV offer on prefill is freed (not held for its 120 s TTL) and decode leaks nothing."""
    vocab = cluster.pool.prefill[0].info.vocab_size
    for keep in (1, 4):      # leave during the first tokens, and during decode
        p = prompts(vocab, lengths=(300,))[0]
        stream = client.stream("ada", prompt_token_ids=p, max_tokens=200, n=3,
                               temperature=1.0, seed=keep, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i + 1 == keep:
                break
        stream.close()
        _idle(cluster)
