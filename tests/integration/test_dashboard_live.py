"""Every dashboard panel shows live data: a real Prometheus scrapes the cluster's /metrics
while requests run, and each panel's PromQL (as Grafana would send it) returns samples."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_panels_show_live_data(cluster, client):
    from bench.dashboard import LocalPrometheus, has_data, panels
    from router.metrics import default_metrics, start_metrics_server

    server, port = start_metrics_server("127.0.0.1", 0, default_metrics())
    prom = LocalPrometheus([f"127.0.0.1:{port}"], interval_s=0.5)
    try:
        deadline = time.monotonic() + 20
        while not prom.targets_up() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert prom.targets_up(), "prometheus never scraped the router"
        adapters = ["ada", "bea", None, "cid"]
        for i in range(12):   # ~spread over several scrapes, so rate() has two samples
            client.generate(adapters[i % 4], prompt=f"dashboard request {i} " * (1 + i),
                            max_tokens=4)
            time.sleep(0.3)
        time.sleep(1.5)
        empty = []
        for p in panels():
            if not any(has_data(prom.query(t["expr"])) for t in p["targets"]):
                empty.append(p["title"])
        assert not empty, f"panels without data: {empty}"
        # And the headline number is what the requests moved: KV GB/s is positive.
        kv = prom.query("sum(rate(preft_kv_transfer_bytes_total[1m]))")
        assert float(kv[0]["value"][1]) > 0
    finally:
        prom.stop()
        server.shutdown()
