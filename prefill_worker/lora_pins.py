"""Pinning adapters in the engine's host-memory LoRA tier (step 3's adapter cache, off the
request path: the router's ``hot_set`` placement says which adapters to pin).

vLLM's worker LoRA manager keeps registered adapters in an LRU of ``max_cpu_loras`` (host
memory) and activates up to ``max_loras`` of them in the batch's slots. Only the first is
pinned here (``LRUCacheLoRAModelManager._pin_lora_in_cpu_cache``), never the batch slots
(``pin_adapter`` / ``LLMEngine.pin_lora`` would pin both), so the scheduler keeps every
batch slot. The caller keeps the pins at most ``PrefillConfig.pinnable_loras``. Engine
thread only. The LRU lives in each model runner: on every rank of a tensor-parallel
engine, so the pins go through ``engine.collective_rpc`` (in-process for the ``uni``
executor).
"""

from __future__ import annotations

from typing import Any


class PinUnsupported(RuntimeError):
    """This vLLM's LoRA manager has not the host-memory LRU these pins were written for."""


def host_tier(worker: Any):
    """A model runner's registered-adapter LRU (vLLM's ``LRUCache``, with
    ``pinned_items``); ``worker``: what ``collective_rpc`` hands a function."""
    try:
        runner = getattr(worker, "worker", worker).model_runner
        cache = runner.lora_manager._adapter_manager._registered_adapters
    except AttributeError as e:
        raise PinUnsupported(f"no LoRA manager host tier on this engine ({e})") from None
    for name in ("pin", "_unpin", "pinned_items"):
        if not hasattr(cache, name):
            raise PinUnsupported(f"vLLM's adapter LRU {type(cache).__name__} has no {name!r}")
    return cache


def _pin_rank(worker: Any, lora_id: int) -> bool:
    cache = host_tier(worker)
    if lora_id not in cache:
        return False
    cache.pin(lora_id)
    return True


def _unpin_rank(worker: Any, lora_id: int) -> None:
    cache = host_tier(worker)
    if lora_id in cache.pinned_items:
        cache._unpin(lora_id)


def _pinned_rank(worker: Any) -> set[int]:
    return set(host_tier(worker).pinned_items)


def pin(engine: Any, lora_request: Any) -> None:
    """Load the adapter into the host tier if it is not there (as a request would: LRU
    eviction of an unpinned one), then pin it there, on every rank."""
    lora_id = lora_request.lora_int_id
    if not all(engine.collective_rpc(_pin_rank, args=(lora_id,))):
        engine.add_lora(lora_request)
        engine.collective_rpc(_pin_rank, args=(lora_id,))


def unpin(engine: Any, lora_id: int) -> None:
    """Back to plain LRU order (no-op when it is not pinned or no longer loaded)."""
    engine.collective_rpc(_unpin_rank, args=(lora_id,))


def pinned(engine: Any) -> set[int]:
    return set.intersection(*engine.collective_rpc(_pinned_rank))
