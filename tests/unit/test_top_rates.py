"""preft top's arithmetic: rates and histogram quantiles from two scrapes."""

from __future__ import annotations

import pytest

from app.top import quantile, rates


def snap(**series):
    return {(name, tuple(sorted(labels.items()))): v for (name, labels), v in series.items()}


def hist(name, counts: dict[str, float]):
    return {(f"{name}_bucket", (("le", le),)): c for le, c in counts.items()}


def test_quantile_interpolates_within_the_bucket():
    a = hist("h", {"0.1": 0, "0.2": 0, "+Inf": 0})
    b = hist("h", {"0.1": 50, "0.2": 100, "+Inf": 100})
    assert quantile(a, b, "h", 0.5) == pytest.approx(0.1)
    assert quantile(a, b, "h", 0.75) == pytest.approx(0.15)
    assert quantile(a, a, "h", 0.5) is None          # nothing observed in the interval


def test_rates_from_counter_deltas():
    pair = (("decode_worker", "d0"), ("prefill_worker", "p0"))
    a = {("preft_kv_transfer_bytes_total", pair): 1e9,
         ("preft_requests_total", (("status", "OK"),)): 10,
         ("preft_requests_total", (("status", "NOT_FOUND"),)): 1,
         ("preft_generation_tokens_total", ()): 100,
         ("preft_adapter_cache_hits_total", (("tier", "engine"),)): 5,
         ("preft_adapter_cache_hits_total", (("tier", "disk"),)): 5}
    b = dict(a)
    b[("preft_kv_transfer_bytes_total", pair)] += 4e9
    b[("preft_requests_total", (("status", "OK"),))] += 20
    b[("preft_requests_total", (("status", "NOT_FOUND"),))] += 2
    b[("preft_generation_tokens_total", ())] += 400
    b[("preft_adapter_cache_hits_total", (("tier", "engine"),))] += 3
    b[("preft_adapter_cache_hits_total", (("tier", "disk"),))] += 1
    r = rates(a, b, 2.0)
    assert r["kv_gbps"] == pytest.approx(2.0)
    assert r["kv_pairs"] == {"p0 -> d0": pytest.approx(2.0)}
    assert r["req_s"] == pytest.approx(10.0) and r["errors"] == 2
    assert r["tok_s"] == pytest.approx(200.0)
    assert r["adapter_hit_rate"] == pytest.approx(0.75)
    assert r["ttft_p50_ms"] is None
