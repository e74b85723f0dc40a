"""Adapter spans (``colocated_worker/adapter_span.py``, ``prompt_lora.span_mapping``) without
an engine: PEFT's invocation rule, one span rule per kind, the per-token mapping against a
position-by-position reading of the rule, the prefix-cache split, and block hashes made by
vLLM's own hasher: an aLoRA request's blocks before its invocation hash as a base request's,
its blocks from the invocation on as no other adapter's."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from colocated_worker.adapter_span import (OPEN, SPAN_ARG, SpanTable, cache_parts,
                                           invocation_start, request_span, span_of)
from colocated_worker.prompt_lora import span_mapping


def _peft_offset_start(prompt, invocation):
    """PEFT's own rule (peft.tuners.lora.variants.calculate_alora_offsets), as a start."""
    import torch

    from peft.tuners.lora.variants import calculate_alora_offsets

    cfg = {"a": SimpleNamespace(alora_invocation_tokens=list(invocation))}
    off = calculate_alora_offsets(cfg, "a", torch.tensor([prompt]))[0]
    return None if off is None else len(prompt) - off


def test_invocation_start_is_peft_s():
    rng = random.Random(3)
    for _ in range(300):
        inv = [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
        prompt = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        assert invocation_start(prompt, inv) == _peft_offset_start(prompt, inv), (prompt, inv)
    assert invocation_start([1, 2, 3, 9, 1, 2, 3], [1, 2, 3]) == 4     # the last occurrence
    assert invocation_start([1, 2], [1, 2, 3]) is None


def test_one_span_rule_per_kind():
    p = [9, 5, 6, 7, 1, 2]
    assert request_span("lora_p", p) == request_span("reft_p", p) == (0, 6)
    assert request_span("lora", p) == (0, OPEN)
    assert request_span("alora", p, (5, 6, 7)) == (1, OPEN)
    assert request_span("alora", p, (8,)) is None           # not invoked: the base model
    with pytest.raises(ValueError):
        request_span("dora", p)
    assert span_of(SimpleNamespace(extra_args={SPAN_ARG: [3, OPEN]})) == (3, OPEN)
    assert span_of(SimpleNamespace(extra_args=None)) is None and span_of(None) is None


def test_span_mapping_equals_the_rule_position_by_position():
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randrange(1, 7)
        lora = np.array([rng.choice([0, 1, 2, 3]) for _ in range(n)])
        prompt = np.array([rng.randrange(1, 40) for _ in range(n)])
        start = np.array([rng.choice([0, rng.randrange(0, 50)]) for _ in range(n)])
        end = np.array([rng.choice([int(prompt[i]), OPEN]) for i in range(n)])
        computed = np.array([rng.randrange(0, 60) for _ in range(n)])
        sched = np.array([rng.randrange(1, 9) for _ in range(n)])
        sampled_n = np.array([rng.randrange(0, 2) for _ in range(n)])
        sampled, tokens = span_mapping(lora, start, end, computed, sched, sampled_n)
        want_t, want_s = [], []
        for i in range(n):
            for pos in range(computed[i], computed[i] + sched[i]):
                want_t.append(int(lora[i]) if start[i] <= pos < end[i] else 0)
            last = computed[i] + sched[i] - 1
            want_s += [int(lora[i]) if start[i] <= last < end[i] else 0] * sampled_n[i]
        assert tokens == tuple(want_t) and sampled == tuple(want_s)


def test_preft_first_token_has_the_adapter_and_generated_ones_do_not():
    # a 10-token prompt in one chunk, then decode steps (1 token each)
    lora, start, end = np.array([4]), np.array([0]), np.array([10])
    s, t = span_mapping(lora, start, end, np.array([0]), np.array([10]), np.array([1]))
    assert s == (4,) and t == (4,) * 10
    s, t = span_mapping(lora, start, end, np.array([10]), np.array([1]), np.array([1]))
    assert s == (0,) and t == (0,)
    # aLoRA invoked at 6: base before it, the adapter on and after it, generated included
    s, t = span_mapping(lora, np.array([6]), np.array([OPEN]), np.array([0]), np.array([10]),
                        np.array([1]))
    assert t == (0,) * 6 + (4,) * 4 and s == (4,)


def test_span_table_reads_each_request_once_and_forgets_finished_ones():
    reqs = {f"r{i}": SimpleNamespace(sampling_params=SimpleNamespace(
        extra_args={SPAN_ARG: [i, OPEN]})) for i in range(4)}
    table = SpanTable()
    starts, ends = table.arrays(["r0", "r1", "r2", "r3"], np.array([0, 1, 1, 2]), reqs)
    assert list(starts) == [0, 1, 2, 3] and list(ends) == [0, OPEN, OPEN, OPEN]
    reqs["r9"] = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None))
    assert list(table.arrays(["r9"], np.array([5]), reqs)[1]) == [0]   # no span: nowhere
    for i in range(200):
        table.arrays([f"x{i}"], np.array([1]), {f"x{i}": reqs["r1"]})
    assert len(table._spans) < 80


def test_prefix_cache_parts_split_at_the_span_start():
    assert cache_parts(None, 600, 512) == (600, 512, 0, 0)            # base request
    assert cache_parts((0, 600), 600, 256) == (0, 0, 600, 256)        # PreFT
    assert cache_parts((590, OPEN), 600, 512) == (590, 512, 10, 0)    # aLoRA
    assert cache_parts((590, OPEN), 600, 599) == (590, 590, 10, 9)


def _hashes(prompt, lora=None, span=None, salt="base"):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    extra = {SPAN_ARG: list(span)} if span else None
    req = Request("r", prompt, SamplingParams(max_tokens=1, extra_args=extra), None,
                  lora_request=LoRARequest(lora, 1, f"/a/{lora}") if lora else None,
                  cache_salt=salt, block_hasher=get_request_block_hasher(16, sha256))
    return list(req.block_hashes)


def test_block_hashes_by_span_with_vllm_s_hasher():
    from colocated_worker.adapter_span import install_span_block_keys

    install_span_block_keys()
    install_span_block_keys()    # once per process: a second call changes nothing
    prompt = list(range(100, 200))           # 6 full blocks of 16
    base = _hashes(prompt)
    a1 = _hashes(prompt, "ala@v1", (70, OPEN))
    a2 = _hashes(prompt, "alm@v1", (70, OPEN))
    a1v2 = _hashes(prompt, "ala@v2", (70, OPEN))
    preft = _hashes(prompt, "ada@v1", (0, 100), salt="ada@v1")
    assert a1[:4] == base[:4] == a2[:4] == a1v2[:4]   # blocks 0-3 end at or before 70
    for other in (base, a2, a1v2):
        assert not set(a1[4:]) & set(other[4:])      # block 4 holds position 70
    assert not set(preft) & set(base)
    assert _hashes(prompt, "ala@v1", (0, OPEN))[0] != base[0]   # invoked at 0: nothing shared
