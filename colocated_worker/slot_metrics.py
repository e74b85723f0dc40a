"""Per-step adapter-slot metrics of a colocated engine, through ``ray.util.metrics`` (as
``worker_runtime/ray_metrics.py``'s: exported by Ray's metrics agent with a ``ray_`` prefix).

Steps 3-5 run in one engine on the colocated path; every engine step observes two
histograms, tagged by worker: ``preft_worker_step_decoding_requests`` (requests whose
scheduled tokens in the step are generated ones: they hold no adapter slot) and
``preft_worker_step_prefill_adapters`` (distinct LoRA adapters whose prompt tokens the step
computes: what ``max_loras`` bounds, ``colocated_worker/prompt_slots.py``). Each new
request adds its prefix-cache lookup, in prompt tokens split at its adapter span's start
(``colocated_worker/adapter_span.py``), to ``preft_worker_prefix_cache_queries`` and
``preft_worker_prefix_cache_hits`` (counters, tag ``span``: ``base`` for positions before
the span, the base model's KV; ``adapter`` for the rest), and its adapter kind to
``preft_worker_requests`` (tag ``kind``: lora_p, reft_p, lora, alora, base). Outside a Ray
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
            from ray.util.metrics import Counter, Histogram

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
            self.queries = Counter(
                "preft_worker_prefix_cache_queries",
                "Prompt tokens looked up in a colocated engine's prefix cache, by span part "
                "(base: before the adapter's span; adapter: from it on)",
                tag_keys=(*keys, "span"))
            self.hits = Counter(
                "preft_worker_prefix_cache_hits",
                "Prompt tokens found in a colocated engine's prefix cache, by span part",
                tag_keys=(*keys, "span"))
            self.requests = Counter("preft_worker_requests",
                                    "Requests a colocated engine served, by adapter kind",
                                    tag_keys=(*keys, "kind"))
            self.enabled = True
        except Exception as e:  # noqa: BLE001 -- metrics must never stop a worker
            log.debug("slot metrics disabled: %s", e)
            self.enabled = False

    def observe(self, decoding: int, prefill_adapters: int) -> None:
        if self.enabled:
            self.decoding.observe(decoding, tags=self.tags)
            self.prefill.observe(prefill_adapters, tags=self.tags)

    def lookups(self, parts: list[tuple[int, int, int, int]]) -> None:
        """A step's new requests: (base queried, base hit, adapter queried, adapter hit)."""
        if not self.enabled:
            return
        for bq, bh, aq, ah in parts:
            for span, q, h in (("base", bq, bh), ("adapter", aq, ah)):
                tags = {**self.tags, "span": span}
                if q:
                    self.queries.inc(q, tags=tags)
                if h:
                    self.hits.inc(h, tags=tags)

    def request(self, kind: str) -> None:
        if self.enabled:
            self.requests.inc(tags={**self.tags, "kind": kind})
