"""Prometheus metrics of the serving path (step 7), recorded where each request is seen whole.

The router sees every request from admission to its last token, plus what the workers
report in typed results (prefill timings and adapter tier; decode's KV transfer bytes and
seconds), so it records the request-level and transfer-level series. Gauges that describe
the pools (queue depth, outstanding requests, KV blocks in use) are read at scrape time
from the router's :class:`~router.pool.WorkerPool`. Names follow vLLM/SGLang conventions
with a ``preft_`` prefix; seconds and bytes in base units; counters end in ``_total``.

``/metrics`` is served by the HTTP gateway and by ``start_metrics_server`` (``preft up
--metrics-port``). ``deploy/grafana/preft-dashboard.json`` queries exactly these names (a
unit test cross-checks), and ``preft top`` reads them live. No torch, no vLLM here.
"""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(14, 33, 2))   # 16 KiB .. 4 GiB
ADAPTER_TIERS = ("engine", "disk", "store")                      # fastest first
# Scrape-time gauges (values from the router's pool state); any other name is refused.
GAUGES = {
    "preft_router_inflight_requests": "Generate calls in flight at the router",
    "preft_pool_queue_depth": "Requests outstanding on the pool's workers",
    "preft_pool_healthy_workers": "Workers taking requests",
    "preft_worker_outstanding_requests": "Requests outstanding per worker",
    "preft_kv_blocks_in_use": "KV cache blocks held by decode requests",
    "preft_kv_blocks_total": "KV cache blocks of the decode engine",
}


class RouterMetrics:
    """The router's metric families, in their own registry (one per router)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("preft_requests", "Finished Generate calls by gRPC status code",
                                ["status"], registry=r)
        self.ttft = Histogram("preft_time_to_first_token_seconds",
                              "Admission to first token (router clock)", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("preft_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("preft_e2e_request_latency_seconds",
                             "Admission to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("preft_request_queue_seconds",
                               "Admission to the prefill engine taking the request",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("preft_prefill_seconds", "Prefill engine time (adapter applied)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("preft_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("preft_generation_tokens", "Tokens generated",
                                         registry=r)
        pair = ["prefill_worker", "decode_worker"]
        self.kv_bytes = Counter("preft_kv_transfer_bytes", "KV bytes moved prefill -> decode",
                                pair, registry=r)
        self.kv_seconds = Histogram("preft_kv_transfer_seconds",
                                    "Time to pull one request's prompt KV into decode blocks",
                                    pair, buckets=TRANSFER_BUCKETS, registry=r)
        self.kv_size = Histogram("preft_kv_transfer_size_bytes", "Bytes per KV transfer", pair,
                                 buckets=BYTES_BUCKETS, registry=r)
        self.kv_by_transport = Counter("preft_kv_transfers", "KV transfers by how they moved: "
                                       "shm (same host), gloo or nccl", ["transport"], registry=r)
        self.kv_failures = Counter("preft_kv_transfer_failures",
                                   "Requests whose KV transfer failed or never happened "
                                   "(decode error before the first delta)", pair, registry=r)
        self.adapter_hits = Counter("preft_adapter_cache_hits",
                                    "Adapter found in this tier of the prefill worker", ["tier"],
                                    registry=r)
        self.adapter_misses = Counter("preft_adapter_cache_misses",
                                      "Adapter not in this tier (looked up in the next one)",
                                      ["tier"], registry=r)
        self.adapter_loads = Counter("preft_adapter_loads",
                                     "Adapters loaded into a prefill worker, by source tier",
                                     ["source"], registry=r)
        self.adapter_load_seconds = Histogram("preft_adapter_load_seconds",
                                              "Time to make an adapter usable (fetch + load)",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.routing = Counter("preft_routing_decisions",
                               "Worker picks by pool and policy", ["pool", "policy", "worker"],
                               registry=r)
        self.paths = Counter("preft_request_paths",
                             "Generate requests by serving path (colocated | prefill_decode) "
                             "and adapter kind (lora_p | reft_p | lora | base)",
                             ["path", "kind"], registry=r)
        self.spills = Counter("preft_routing_spills",
                              "Locality picks that went past the adapter's first-ranked worker "
                              "(bounded load)", ["policy"], registry=r)
        self._lock = threading.Lock()
        self._sources: list[Callable[[], list]] = []   # the newest live router's is read
        r.register(_Gauges(self))

    # ---------------------------------------------------------------- recording
    def observe_adapter(self, tier: str, load_s: float) -> None:
        """One prefill's adapter lookup: a hit in ``tier``, misses in every faster tier."""
        if tier not in ADAPTER_TIERS:
            return
        i = ADAPTER_TIERS.index(tier)
        for faster in ADAPTER_TIERS[:i]:
            self.adapter_misses.labels(faster).inc()
        self.adapter_hits.labels(tier).inc()
        if i > 0:  # not resident in the engine: it was loaded for this request
            self.adapter_loads.labels(tier).inc()
            self.adapter_load_seconds.observe(load_s)

    def observe_kv(self, prefill: str, decode: str, nbytes: int, seconds: float,
                   transport: str = "") -> None:
        self.kv_by_transport.labels(transport or "unknown").inc()
        self.kv_bytes.labels(prefill, decode).inc(nbytes)
        self.kv_seconds.labels(prefill, decode).observe(seconds)
        self.kv_size.labels(prefill, decode).observe(nbytes)

    def set_gauge_source(self, fn: Callable[[], list]) -> None:
        """``fn() -> [(name, labels: dict, value), ...]`` with names from :data:`GAUGES`,
        called at scrape time. One router per process in production; where a process
        runs several (tests), the newest one that has not stopped is the one read."""
        with self._lock:
            self._sources.append(fn)

    def clear_gauge_source(self, fn: Callable[[], list]) -> None:
        with self._lock:
            self._sources = [f for f in self._sources if f != fn]

    def _gauges(self) -> Callable[[], list] | None:
        with self._lock:
            return self._sources[-1] if self._sources else None

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges:
    """Scrape-time gauges from the router's own state (no polling thread)."""

    def __init__(self, m: RouterMetrics) -> None:
        self.m = m

    def describe(self):
        return []

    def collect(self):
        source = self.m._gauges()
        if source is None:
            return
        families: dict[str, GaugeMetricFamily] = {}
        for name, labels, value in source():
            fam = families.get(name)
            if fam is None:
                fam = families[name] = GaugeMetricFamily(name, GAUGES[name], labels=list(labels))
            fam.add_metric([str(v) for v in labels.values()], float(value))
        yield from families.values()


_default: RouterMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> RouterMetrics:
    """The process's router metrics (what /metrics on the gateway serves)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RouterMetrics()
        return _default


def start_metrics_server(host: str, port: int, metrics: RouterMetrics | None = None):
    """Serve ``/metrics`` on ``host:port`` (0 = any free port); returns (server, port)."""
    from prometheus_client import start_http_server

    m = metrics or default_metrics()
    server, _thread = start_http_server(port, addr=host, registry=m.registry)
    return server, server.server_address[1]
