"""Seeded sampling across the prefill/decode seam (worker_runtime/sampler_state.py): the
decode engine's generator goes on from the prefill engine's state after the first token.

No engine: the two hooks on stand-ins for vLLM's model runner, sampler and input batch.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from worker_runtime import sampler_state


def _draws(gen: torch.Generator, steps: int, vocab: int = 64) -> list[torch.Tensor]:
    """What vLLM's random sampler takes from a seeded request's generator per step."""
    return [torch.empty(vocab).exponential_(generator=gen) for _ in range(steps)]


def _runner(sample):
    """A stand-in model runner, as ``engine.collective_rpc`` hands it (``worker.model_runner``)."""
    runner = SimpleNamespace(sampler=SimpleNamespace(forward=sample), requests={},
                             input_batch=SimpleNamespace(req_ids=[], add_request=lambda r: r),
                             device="cpu")
    runner.model_runner = runner
    return runner


def test_decode_goes_on_from_prefill_state():
    one = torch.Generator().manual_seed(7)
    want = _draws(one, 5)                       # one engine: five steps of one generator

    prefill = _runner(lambda logits, md: _draws(md.generators[0], 1)[0])
    sampler_state.keep_states(prefill)
    params = SimpleNamespace(extra_args={sampler_state.KEY: "r"})   # vLLM's id is its own
    prefill.input_batch.req_ids = ["r-internal"]
    prefill.requests["r-internal"] = SimpleNamespace(sampling_params=params)
    gen = torch.Generator().manual_seed(7)
    first = prefill.sampler.forward(None, SimpleNamespace(generators={0: gen}))
    state = sampler_state.take_state(prefill, "r")
    assert torch.equal(first, want[0]) and state and not prefill.preft_sampler_states

    decode = _runner(None)
    assert sampler_state.start_from_states(decode) == len(state)
    fresh = torch.Generator().manual_seed(7)    # vLLM seeds the decode request's generator
    req = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={sampler_state.KEY: state}),
                          generator=fresh, output_token_ids=[])
    decode.input_batch.add_request(req)
    rest = _draws(fresh, 4)
    assert all(torch.equal(a, b) for a, b in zip(rest, want[1:]))
    # the old rule (decode seeded seed + 1) drew sample i + 1's first-token draws
    assert not torch.equal(_draws(torch.Generator().manual_seed(8), 1)[0], want[1])


def test_only_requests_that_ask_are_kept_and_a_resumed_request_is_not_rewound():
    prefill = _runner(lambda logits, md: None)
    sampler_state.keep_states(prefill)
    prefill.input_batch.req_ids = ["a", "b"]
    prefill.requests.update(a=SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None)),
                            b=SimpleNamespace(sampling_params=SimpleNamespace(
                                extra_args={sampler_state.KEY: "b"})))
    gens = {0: torch.Generator().manual_seed(1), 1: torch.Generator().manual_seed(2)}
    prefill.sampler.forward(None, SimpleNamespace(generators=gens))
    assert list(prefill.preft_sampler_states) == ["b"]
    assert sampler_state.take_state(prefill, "a") == b""

    decode = _runner(None)
    sampler_state.start_from_states(decode)
    gen = torch.Generator().manual_seed(3)
    _draws(gen, 2)
    before = gen.get_state()
    other = torch.Generator().manual_seed(9).get_state().numpy().tobytes()
    req = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={sampler_state.KEY: other}),
                          generator=gen, output_token_ids=[11, 12])   # back from preemption
    decode.input_batch.add_request(req)
    assert torch.equal(gen.get_state(), before)
