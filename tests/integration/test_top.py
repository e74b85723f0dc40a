"""``preft top`` renders a running cluster: workers from ClusterStatus, rates from /metrics."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.integration


def test_top_shows_workers_and_kv_rate(cluster, client):
    from rich.console import Console

    from app.top import run
    from router.metrics import default_metrics, start_metrics_server

    server, port = start_metrics_server("127.0.0.1", 0, default_metrics())
    stop = threading.Event()

    def load():
        while not stop.is_set():
            client.generate("ada", prompt="top is watching " * 20, max_tokens=4)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    console = Console(record=True, width=200, force_terminal=False)
    try:
        run(client, cluster.address, f"http://127.0.0.1:{port}/metrics", interval=2.0,
            iterations=3, console=console)
    finally:
        stop.set()
        t.join(60)
        server.shutdown()
    out = console.export_text()
    for w in cluster.pool.all():
        assert w.worker_id in out
    assert "KV GB/s" in out and "KV transfer per pair" in out
