"""The output stream that prefill and decode share (worker_runtime/sequence.py).

No engine: the tiny model's byte-level BPE tokenizer and vLLM's detokenizer classes only.
"""

from __future__ import annotations

import random

import pytest

from reference import engine_text

from cluster.messages import Sampling
from worker_runtime.sequence import OutputStream


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from app.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(1024, d)
    return AutoTokenizer.from_pretrained(str(d))


def _split(tok, sampling, ids, engine_finish="length"):
    """Prefill feeds the first token; decode replays it, then feeds the rest one by one."""
    pre = OutputStream(tok, sampling, "r").append([ids[0]], None if len(ids) > 1 else engine_finish)
    steps = [pre]
    if pre.finish_reason is None:
        dec = OutputStream(tok, sampling, "r")
        dec.append([ids[0]], None)
        for i, t in enumerate(ids[1:], 2):
            steps.append(dec.append([t], engine_finish if i == len(ids) else None))
            if steps[-1].finish_reason:
                break
    return steps


def test_text_is_the_decoding_of_the_ids_for_random_tokens(tok):
    rng = random.Random(0)
    for n in (1, 2, 7, 40):
        for _ in range(20):
            ids = [rng.randrange(3, len(tok)) for _ in range(n)]
            steps = _split(tok, Sampling(max_tokens=n), ids)
            assert [t for s in steps for t in s.token_ids] == ids
            assert "".join(s.text for s in steps) == engine_text(tok, ids)
            assert steps[-1].finish_reason == "length"


def test_eos_finishes_and_its_text_is_skipped(tok):
    ids = tok.encode("Hello world") + [tok.eos_token_id]
    steps = _split(tok, Sampling(max_tokens=50), ids, engine_finish="stop")
    assert steps[-1].finish_reason == "stop"
    assert "".join(s.text for s in steps) == "Hello world"


@pytest.mark.parametrize("where", ["straddles first and second", "inside the first", "later"])
def test_stop_strings_over_every_generated_token(tok, where):
    text = "Every request carries a prompt, a set of sampling parameters"
    ids = tok.encode(text)
    pieces = [tok.decode([t]) for t in ids]
    assert len(pieces[0]) >= 2 and len(pieces[1]) >= 1, pieces[:2]
    if where == "straddles first and second":
        stop = pieces[0][-1] + pieces[1][0]
    elif where == "inside the first":
        stop = pieces[0][1:]
    else:
        stop = "sampling"
    steps = _split(tok, Sampling(max_tokens=len(ids), stop=(stop,)), ids)
    got = "".join(s.text for s in steps)
    assert steps[-1].finish_reason == "stop"
    assert got == text[:text.index(stop)], (stop, got)
    n_kept = sum(len(s.token_ids) for s in steps)
    # tokens stop at the one that completed the stop string
    assert tok.decode(ids[:n_kept]).find(stop) >= 0 and tok.decode(ids[:n_kept - 1]).find(stop) < 0


def test_streamed_text_holds_back_a_possible_stop_prefix(tok):
    ids = tok.encode("Hello world")
    s = OutputStream(tok, Sampling(max_tokens=20, stop=("world peace",)), "r")
    streamed = "".join(s.append([t], None).text for t in ids)
    assert streamed == "Hello world"[: -len("world peace") + 1]
    assert s.append(tok.encode("!"), "length").text == "Hello world!"[len(streamed):]


def _min_tokens_rule(pieces: list[str], stop: str, min_tokens: int) -> int:
    """vLLM's rule, written out: with ``min_tokens`` the first stop string that counts is
    the first one that ends after the text of the first ``min_tokens`` tokens; returns
    where the text is cut (-1: it never stops)."""
    text, before = "".join(pieces), len("".join(pieces[:min_tokens]))
    return text.find(stop, max(0, before - len(stop) + 1))


@pytest.mark.parametrize("min_tokens", [0, 1, 2, 5, 12])
@pytest.mark.parametrize("stop", ["e", "re", "a"])
def test_stop_strings_wait_for_min_tokens(tok, min_tokens, stop):
    """A stop string that appears early does not end a completion that has not yet got
    ``min_tokens`` tokens (vLLM's detokenizer: checked only past ``min_tokens``, over the
    text after them); counted across the prefill/decode split."""
    text = "Every request carries a prompt, a set of sampling parameters, and more"
    ids = tok.encode(text)
    pieces = [tok.decode([t]) for t in ids]
    assert "".join(pieces) == text
    cut = _min_tokens_rule(pieces, stop, min_tokens)
    assert cut >= 0, (stop, min_tokens)
    s = Sampling(max_tokens=len(ids), min_tokens=min_tokens, stop=(stop,))
    steps = _split(tok, s, ids)
    kept = [t for st in steps for t in st.token_ids]
    assert "".join(st.text for st in steps) == text[:cut], (stop, min_tokens)
    assert steps[-1].finish_reason == "stop"
    assert len(kept) > min_tokens
    # tokens end at the one that completed the counted stop string
    assert len("".join(pieces[:len(kept)])) >= cut + len(stop) > len("".join(pieces[:len(kept) - 1]))
    # one engine's stream, every token in one stream, ends the same
    one = OutputStream(tok, s, "r")
    for i, t in enumerate(ids):
        step = one.append([t], None)
        if step.finish_reason:
            break
    assert (one.text, one.token_ids) == (text[:cut], kept)
