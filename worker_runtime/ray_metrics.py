"""Worker-side metrics through ``ray.util.metrics`` (Ray's metrics agent exports them with a
``ray_`` prefix, e.g. ``ray_preft_worker_kv_pull_bytes_total``, on the port given to
``ray start --metrics-export-port``; ``deploy/prometheus/prometheus.yml`` scrapes it).

The router's ``/metrics`` already carries every request-level series; these add the
workers' own view (what each engine pulled, prefilled and loaded), tagged by worker, for
clusters where the router is not the only thing watched. Outside a Ray worker process
(unit tests) every call is a no-op.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_SECONDS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class WorkerMetrics:
    def __init__(self, role: str, worker_id: str) -> None:
        self.tags = {"worker": worker_id, "role": role}
        try:
            import ray
            from ray.util.metrics import Counter, Histogram

            if not ray.is_initialized():
                raise RuntimeError("not in a Ray process")
            keys = ("worker", "role")
            self.kv_bytes = Counter("preft_worker_kv_pull_bytes",
                                    "KV bytes pulled into this decode engine", tag_keys=keys)
            self.kv_seconds = Histogram("preft_worker_kv_pull_seconds",
                                        "Seconds per KV pull", boundaries=_SECONDS, tag_keys=keys)
            self.tokens = Counter("preft_worker_tokens", "Tokens this engine computed "
                                  "(prompt tokens at prefill, generated tokens at decode)",
                                  tag_keys=keys)
            self.step_seconds = Histogram("preft_worker_request_seconds",
                                          "Engine time per request (prefill or whole decode)",
                                          boundaries=_SECONDS, tag_keys=keys)
            self.adapter_loads = Counter("preft_worker_adapter_loads",
                                         "Adapters resolved below the engine tier",
                                         tag_keys=(*keys, "tier"))
            self.offers_released = Counter(
                "preft_worker_kv_offers_released",
                "Held prompt KV freed without a pull, by why: caller_left (the router gave "
                "up as prefill finished), ttl (nobody pulled or released it in hold_ttl_s: "
                "the last resort)", tag_keys=(*keys, "reason"))
            self.enabled = True
        except Exception as e:  # noqa: BLE001 -- metrics must never stop a worker
            log.debug("ray metrics disabled: %s", e)
            self.enabled = False

    def kv_pull(self, nbytes: int, seconds: float) -> None:
        if self.enabled:
            self.kv_bytes.inc(nbytes, tags=self.tags)
            self.kv_seconds.observe(seconds, tags=self.tags)

    def request(self, tokens: int, seconds: float) -> None:
        if self.enabled:
            if tokens:
                self.tokens.inc(tokens, tags=self.tags)
            self.step_seconds.observe(seconds, tags=self.tags)

    def kv_offer_released(self, reason: str, n: int = 1) -> None:
        if self.enabled and n:
            self.offers_released.inc(n, tags={**self.tags, "reason": reason})

    def adapter(self, tier: str) -> None:
        if self.enabled and tier and tier != "engine":
            self.adapter_loads.inc(tags={**self.tags, "tier": tier})
