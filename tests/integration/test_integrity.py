"""What the user reads is right: text, stream deltas, stop strings, multi-turn, cache keys.

Through the whole cluster (router -> prefill -> KV -> decode), as a client meets it:
- the completion's text is what one vLLM engine writes for its token ids (their decoding,
  less a trailing incomplete character), and so are the SDK's stream deltas and the
  OpenAI gateway's text, for prompts around the block boundaries;
- stop strings act on every generated token, the first (from prefill) included, exactly as
  in one vLLM engine;
- a chat's second turn, whose prompt holds the first turn's answer, equals the PreFT
  reference computed on its whole prompt (decode never caches base-model KV of generated
  tokens where a prompt could hit it), cold and warm;
- ReFT-P with suffix positions: prompts that share a block but differ in length never share
  KV (the cache key carries the length).
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from reference import engine_text

from conftest import ADAPTER_SEEDS

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
BLOCK = 128
LENGTHS = (1, 2, 5, 127, 128, 129, 255, 256, 257)


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model"])


@pytest.fixture(scope="module")
def oai(cluster):
    import openai

    from http_gateway import HttpGatewayThread

    gw = HttpGatewayThread(cluster.address, timeout=120)
    gw.start()
    with openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="x", max_retries=0,
                       timeout=120) as c:
        yield c
    gw.stop()


def _vocab(cluster) -> int:
    return cluster.pool.prefill[0].info.vocab_size


def _compare(got, ref, what: str) -> None:
    k = ref.comparable_prefix(GAP_TOL)
    assert k >= 4, f"{what}: the reference has a near-tie at step {k}; pick another prompt"
    assert tuple(got[:k]) == ref.tokens[:k], (
        f"{what}: mismatch at step {next(i for i in range(k) if got[i] != ref.tokens[i])}: "
        f"cluster {tuple(got[:k])} vs reference {ref.tokens[:k]}")


# --------------------------------------------------------------------------- text

def test_text_stream_and_openai_equal_the_decoded_tokens(cluster, client, oai, tokenizer):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, _vocab(cluster)) for _ in range(n)] for n in LENGTHS]
    names = [*ADAPTER_SEEDS, "rlo", "rfl", None]
    jobs = [(name, p) for name in names for p in prompts]

    def run(job):
        name, p = job
        kw = dict(prompt_token_ids=p, max_tokens=16, temperature=0.0, ignore_eos=True)
        c = client.generate(name, **kw)
        deltas = list(client.stream(name, **kw))
        r = oai.completions.create(model=name or "base", prompt=p, max_tokens=16,
                                   temperature=0, extra_body={"ignore_eos": True})
        return c, deltas, r.choices[0].text

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(run, jobs))
    for (name, p), (c, deltas, http_text) in zip(jobs, results):
        what = f"adapter {name}, {len(p)}-token prompt"
        assert len(c.token_ids) == 16, what
        assert c.text == engine_text(tokenizer, c.token_ids), what
        assert tuple(t for d in deltas for t in d.token_ids) == c.token_ids, what
        assert "".join(d.text for d in deltas) == c.text, what
        assert http_text == c.text, what


# --------------------------------------------------------------------------- stop strings

def _printable(pieces: list[str]) -> bool:
    return all(p and p.isascii() and p.isprintable() for p in pieces)


def _stop_cases(cluster, client, tokenizer, adapter):
    """(prompt, stop, case) triples found on this model's own greedy outputs: a stop string
    that straddles the first and second generated tokens, one inside the first token, and
    one later; each occurs first where it is meant to, after printable ASCII text only."""
    rng = random.Random(23 if adapter is None else 29)
    found: dict[str, tuple[list[int], str]] = {}
    for _ in range(80):
        p = [rng.randrange(3, _vocab(cluster)) for _ in range(rng.randrange(8, 40))]
        c = client.generate(adapter, prompt_token_ids=p, max_tokens=12, ignore_eos=True)
        pieces = [tokenizer.decode([t]) for t in c.token_ids]
        text = c.text
        first = pieces[0]
        cands = {"straddle": (first[-1:] + pieces[1][:1], len(first) - 1, 2),
                 "inside-first": (first[-2:] if len(first) >= 3 else "", len(first) - 2, 1),
                 "later": (pieces[4][:2], len("".join(pieces[:4])), 5)}
        for case, (stop, at, n_pieces) in cands.items():
            if (case not in found and len(stop) == 2 and _printable(pieces[:n_pieces])
                    and text.find(stop) == at):
                found[case] = (p, stop)
        if len(found) == 3:
            return [(p, stop, case) for case, (p, stop) in found.items()]
    pytest.fail(f"no prompt gave every stop case: found {sorted(found)}")


def _check_stop(client, adapter, p, stop, case):
    full = client.generate(adapter, prompt_token_ids=p, max_tokens=12, ignore_eos=True)
    c = client.generate(adapter, prompt_token_ids=p, max_tokens=12, ignore_eos=True,
                        stop=[stop])
    deltas = list(client.stream(adapter, prompt_token_ids=p, max_tokens=12, ignore_eos=True,
                                stop=[stop]))
    assert c.finish_reason == "stop", (case, stop, c.text)
    assert c.text == full.text[:full.text.index(stop)], (case, stop, c.text)
    assert "".join(d.text for d in deltas) == c.text, case
    return c


def test_stop_strings_across_the_prefill_decode_seam_match_one_engine(
        cluster, client, tokenizer, single_engine):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for p, stop, case in _stop_cases(cluster, client, tokenizer, None):
        c = _check_stop(client, None, p, stop, case)
        one = single_engine.generate(
            [TokensPrompt(prompt_token_ids=p)],
            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop]),
            use_tqdm=False)[0].outputs[0]
        assert (c.text, c.finish_reason) == (one.text, one.finish_reason), case
        assert c.token_ids == tuple(one.token_ids), case


def test_stop_strings_with_an_adapter(cluster, client, tokenizer):
    for p, stop, case in _stop_cases(cluster, client, tokenizer, "dov"):
        _check_stop(client, "dov", p, stop, case)


# --------------------------------------------------------------------------- multi-turn

@pytest.mark.parametrize("adapter", ["cid", "rlo"])
def test_second_turn_holding_the_answer_equals_the_reference(cluster, client, reference,
                                                              assets, adapter):
    """Turn 1: a 100-token prompt and a 60-token answer (the decode engine's first block
    then holds 28 generated tokens). Turn 2 = turn 1's prompt + answer + 30 new tokens: its
    positions 100..159 are prompt positions now, computed with the adapter."""
    rng = random.Random(41 if adapter == "cid" else 43)
    vocab = _vocab(cluster)
    p1 = [rng.randrange(3, vocab) for _ in range(100)]
    a1 = client.generate(adapter, prompt_token_ids=p1, max_tokens=60, ignore_eos=True)
    assert len(a1.token_ids) == 60
    p2 = [*p1, *a1.token_ids, *(rng.randrange(3, vocab) for _ in range(30))]
    assert len(p2) > BLOCK + 60
    ref = reference.generate(p2, assets["adapters"][adapter], 16, mode="preft")
    for attempt in ("cold", "warm"):
        t2 = client.generate(adapter, prompt_token_ids=p2, max_tokens=16, ignore_eos=True)
        _compare(t2.token_ids, ref, f"{adapter}, turn 2 ({attempt} caches)")


# --------------------------------------------------------------------------- ReFT-P l<s>

@pytest.mark.parametrize("order", ["short first", "long first"])
def test_suffix_position_reft_never_shares_kv_across_lengths(cluster, client, reference,
                                                             assets, order):
    """rfl intervenes at the first 3 and last 3 prompt positions. A 129-token prompt has
    positions 126 and 127 of its first block intervened; a 168-token prompt with the same
    first block has not: whichever runs second must not reuse the other's block."""
    rng = random.Random(61 if order == "short first" else 62)
    vocab = _vocab(cluster)
    block = [rng.randrange(3, vocab) for _ in range(BLOCK)]
    short = block + [rng.randrange(3, vocab)]
    long = block + [rng.randrange(3, vocab) for _ in range(40)]
    pair = (short, long) if order == "short first" else (long, short)
    for p in pair:
        c = client.generate("rfl", prompt_token_ids=p, max_tokens=16, ignore_eos=True)
        ref = reference.generate(p, assets["adapters"]["rfl"], 16, mode="preft")
        _compare(c.token_ids, ref, f"rfl, {len(p)}-token prompt ({order})")
