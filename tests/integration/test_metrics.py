"""Prometheus metrics of a live cluster: counters agree with what the requests did.

Every check is a delta over a scrape before and after a known set of requests, so the
test is independent of what other tests sent through the shared session cluster.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    out: dict = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return out


def total(snap: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in snap.items()
               if n == name and all(dict(lab).get(k) == w for k, w in labels.items()))


@pytest.fixture(scope="module")
def metrics_url(cluster):
    from router.metrics import default_metrics, start_metrics_server

    server, port = start_metrics_server("127.0.0.1", 0, default_metrics())
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return scrape(r.read().decode())


def prefill_tier_hits(cluster) -> dict[str, int]:
    import ray

    hits: dict[str, int] = defaultdict(int)
    for w in cluster.pool.prefill:
        for tier, n in ray.get(w.actor.stats.remote(), timeout=30).tier_hits.items():
            hits[tier] += n
    return hits


def test_counters_match_requests(cluster, client, metrics_url):
    from preft_client import InvalidArgument

    before, tiers_before = get(metrics_url), prefill_tier_hits(cluster)
    prompts = ["The quick brown fox", "Once upon a time in a land far away",
               "Metrics should add up", "Hello"]
    adapters = ["ada", "bea", None, "ada"]
    done = [client.generate(a, prompt=p, max_tokens=6, ignore_eos=True)
            for a, p in zip(adapters, prompts)]
    with pytest.raises(InvalidArgument):
        client.generate("ada", prompt="bad", max_tokens=0)
    after, tiers_after = get(metrics_url), prefill_tier_hits(cluster)
    d = lambda name, **lab: total(after, name, **lab) - total(before, name, **lab)  # noqa: E731

    k = len(done)
    assert d("preft_requests_total", status="OK") == k
    assert d("preft_requests_total", status="INVALID_ARGUMENT") == 1
    # KV: every request moved its prompt's blocks once; bytes add up to what each reported.
    assert all(c.kv_bytes > 0 for c in done)
    assert d("preft_kv_transfer_bytes_total") == sum(c.kv_bytes for c in done)
    assert d("preft_kv_transfer_seconds_count") == k
    assert d("preft_kv_transfer_size_bytes_sum") == sum(c.kv_bytes for c in done)
    assert d("preft_kv_transfer_failures_total") == 0
    # Latency histograms: one observation per request.
    for h in ("preft_time_to_first_token_seconds", "preft_e2e_request_latency_seconds",
              "preft_time_per_output_token_seconds", "preft_prefill_seconds"):
        assert d(f"{h}_count") == k, h
    assert d("preft_generation_tokens_total") == sum(len(c.token_ids) for c in done) == 6 * k
    assert d("preft_prompt_tokens_total") == sum(c.usage.prompt_tokens for c in done)
    # Adapter tiers: one hit per adapter request, in the tier the worker itself counted.
    n_adapter = sum(a is not None for a in adapters)
    assert sum(d("preft_adapter_cache_hits_total", tier=t)
               for t in ("engine", "disk", "store")) == n_adapter
    for tier in ("engine", "disk", "store"):
        assert d("preft_adapter_cache_hits_total", tier=tier) == \
            tiers_after[tier] - tiers_before[tier], tier
    # A hit below the engine tier is a miss in every faster one.
    assert d("preft_adapter_cache_misses_total", tier="engine") == \
        d("preft_adapter_cache_hits_total", tier="disk") + \
        d("preft_adapter_cache_hits_total", tier="store")
    # Routing: one decision per pool per request.
    assert d("preft_routing_decisions_total", pool="prefill") == k
    assert d("preft_routing_decisions_total", pool="decode") == k


def test_gauges_show_pools_and_free_kv(cluster, client, metrics_url):
    client.generate("bea", prompt="gauges after a request", max_tokens=3)
    snap = get(metrics_url)
    decode_ids = {w.worker_id for w in cluster.pool.decode if w.healthy}
    in_use = {dict(lab)["worker"]: v for (n, lab), v in snap.items()
              if n == "preft_kv_blocks_in_use"}
    assert set(in_use) == decode_ids
    assert all(v == 0 for v in in_use.values()), in_use   # finished requests free their blocks
    assert all(total(snap, "preft_kv_blocks_total", worker=w) > 0 for w in decode_ids)
    assert total(snap, "preft_pool_queue_depth", pool="prefill") == 0
    assert total(snap, "preft_pool_healthy_workers", pool="decode") == len(decode_ids)
    assert total(snap, "preft_router_inflight_requests") == 0


def test_gateway_serves_metrics(cluster):
    from fastapi.testclient import TestClient

    from http_gateway import create_app

    with TestClient(create_app(cluster.address)) as http:
        r = http.get("/metrics")
    assert r.status_code == 200
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"preft_requests", "preft_kv_transfer_bytes", "preft_time_to_first_token_seconds"} <= names
