"""Seeded sampling across the prefill/decode seam (steps 3-5): one request, one generator.

vLLM V1 gives a seeded request its own ``torch.Generator``, seeded once with the request's
seed when the request enters the model runner and consumed by every step that samples it
(with ``n > 1``, sample ``i`` is a request seeded ``seed + i``). A colocated worker is one
engine, so it does exactly that. A split request must draw from one generator too: the
prefill engine samples the first token from the generator fresh from the seed, and the
decode engine must go on from the state the prefill engine left it in -- not from a fresh
generator (it would repeat the first token's draws), nor from ``seed + 1`` (sample
``i + 1``'s draws). So:

- the prefill engine keeps the generator's state after each sampling step of a request that
  asks for it (:func:`keep_states`; the request's ``extra_args[KEY]`` holds the name the
  worker takes it by: vLLM's runner knows the request by an internal id), and the prefill
  worker takes it once the first token is out (:func:`take_state`);
- the state travels with the first token (``PrefillResult.sampler_state`` ->
  ``DecodeRequest.sampler_state``, plain bytes: ``torch.Generator.get_state()``);
- the decode engine sets the request's new generator to it before its first sampling step
  (:func:`start_from_states`; the request's ``extra_args[KEY]`` holds the bytes).

Both hooks are installed on every model runner (each tensor-parallel rank samples).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

KEY = "preft_sampler_state"
MAX_KEPT = 4096     # states no worker took (a request that failed or ended at prefill)


def _runner(worker: Any) -> Any:
    return getattr(worker, "worker", worker).model_runner


def keep_states(worker: Any) -> None:
    """Prefill side: after each sampling step, keep the generator state of every seeded
    request whose ``extra_args[KEY]`` names it (the last step's state wins: after the first
    token). ``worker``: what ``engine.collective_rpc`` hands a function."""
    runner = _runner(worker)
    sampler = runner.sampler
    inner = sampler.forward
    kept: OrderedDict[str, bytes] = OrderedDict()
    runner.preft_sampler_states = kept

    def forward(logits, sampling_metadata, *args, **kwargs):
        out = inner(logits, sampling_metadata, *args, **kwargs)
        for row, gen in sampling_metadata.generators.items():
            req_ids = runner.input_batch.req_ids
            state = runner.requests.get(req_ids[row]) if row < len(req_ids) else None
            extra = state and state.sampling_params and state.sampling_params.extra_args
            name = extra.get(KEY) if extra else None
            if isinstance(name, str):
                kept[name] = gen.get_state().numpy().tobytes()
                kept.move_to_end(name)
        while len(kept) > MAX_KEPT:
            kept.popitem(last=False)
        return out

    sampler.forward = forward


def take_state(worker: Any, name: str) -> bytes:
    """The state kept under ``name`` (b"" if none), forgotten here."""
    return _runner(worker).preft_sampler_states.pop(name, b"")


def start_from_states(worker: Any) -> int:
    """Decode side: a seeded request whose ``extra_args[KEY]`` holds a generator state starts
    its generator there (instead of fresh from the seed) when it first enters the input
    batch. Returns the size of this device's generator state in bytes (the decode worker
    refuses states of another size before they reach the engine)."""
    import torch

    runner = _runner(worker)
    batch = runner.input_batch
    inner = batch.add_request
    size = torch.Generator(device=runner.device).get_state().numel()

    def add_request(request):
        params, gen = request.sampling_params, request.generator
        state = (params.extra_args or {}).get(KEY) if params is not None else None
        # Only before its first sampled token: a preempted request that comes back keeps
        # the generator it has consumed since.
        if state and gen is not None and not request.output_token_ids and len(state) == size:
            gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        return inner(request)

    batch.add_request = add_request
    return size
