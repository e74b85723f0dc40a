"""Per-step adapter-slot metrics of a colocated engine, through ``ray.util.metrics`` (as
``worker_runtime/ray_metrics.py``'s: exported by Ray's metrics agent with a ``ray_`` prefix).

Steps 3-5 run in one engine on the colocated path; every engine step observes two
histograms, tagged by worker: ``preft_worker_step_decoding_requests`` (requests whose
scheduled tokens in the step are generated ones: they hold no adapter slot) and
``preft_worker_step_prefill_adapters`` (distinct LoRA adapters whose prompt tokens the step
computes: what ``max_loras`` bounds, ``colocated_worker/prompt_slots.py``). Outside a Ray
worker process every call is a no-op.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class SlotMetrics:
    def __init__(self, worker_id: str) -> None:
        self.tags = {"worker": worker_id, "role": "colocated"}
        try:
            import ray
            from ray.util.metrics import Histogram

            if not ray.is_initialized():
                raise RuntimeError("not in a Ray process")
            keys = ("worker", "role")
            self.decoding = Histogram(
                "preft_worker_step_decoding_requests",
                "Requests decoding (no adapter slot) per colocated engine step",
                boundaries=_COUNTS, tag_keys=keys)
            self.prefill = Histogram(
                "preft_worker_step_prefill_adapters",
                "Distinct LoRA adapters whose prompt tokens one colocated engine step computes",
                boundaries=_COUNTS, tag_keys=keys)
            self.enabled = True
        except Exception as e:  # noqa: BLE001 -- metrics must never stop a worker
            log.debug("slot metrics disabled: %s", e)
            self.enabled = False

    def observe(self, decoding: int, prefill_adapters: int) -> None:
        if self.enabled:
            self.decoding.observe(decoding, tags=self.tags)
            self.prefill.observe(prefill_adapters, tags=self.tags)
