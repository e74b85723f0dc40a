"""The Grafana dashboard is valid dashboard JSON and queries only metrics we export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASH = ROOT / "deploy" / "grafana" / "preft-dashboard.json"
PROM = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def exported_sample_names() -> set[str]:
    """Every sample name the router's registry exposes once each series has a value."""
    from router.metrics import GAUGES, RouterMetrics

    m = RouterMetrics()
    m.requests.labels("OK").inc()
    for h in (m.ttft, m.tpot, m.e2e, m.queue, m.prefill, m.adapter_load_seconds):
        h.observe(0.1)
    m.prompt_tokens.inc()
    m.generation_tokens.inc()
    m.observe_kv("p", "d", 1024, 0.01)
    m.kv_failures.labels("p", "d").inc()
    m.observe_adapter("store", 0.2)
    m.routing.labels("prefill", "locality", "p").inc()
    m.spills.labels("locality").inc()
    m.paths.labels("colocated", "lora").inc()
    m.set_gauge_source(lambda: [(n, {"x": "1"}, 1.0) for n in GAUGES])
    return {s.name for f in text_string_to_metric_families(m.render().decode())
            for s in f.samples}


def test_dashboard_is_grafana_json():
    d = json.loads(DASH.read_text())
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    assert any(i["type"] == "datasource" and i["pluginId"] == "prometheus" for i in d["__inputs"])
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for p in d["panels"]:
        assert p["type"] in ("timeseries", "stat", "gauge", "bargauge", "table"), p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["datasource"]["type"] == "prometheus"
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for needed in ("kv transfer throughput", "per pair", "latency", "failures",
                   "first token", "per output token", "queue depth", "hit rate"):
        assert needed in titles, needed


def test_every_panel_query_names_an_exported_metric():
    exported = exported_sample_names()
    d = json.loads(DASH.read_text())
    used = set()
    for p in d["panels"]:
        for t in p["targets"]:
            names = set(re.findall(r"\bpreft_[a-z0-9_]+", t["expr"]))
            assert names, f"panel {p['title']!r} query names no preft_ metric: {t['expr']}"
            used |= names
    missing = used - exported
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"


def test_known_gauge_names_only():
    from router.metrics import RouterMetrics

    m = RouterMetrics()
    m.set_gauge_source(lambda: [("preft_not_a_gauge", {}, 1.0)])
    with pytest.raises(KeyError):
        m.render()


def test_prometheus_config_is_valid(tmp_path):
    assert shutil.which("promtool"), "promtool comes with prometheus (scripts/setup.sh)"
    # file_sd files need not exist for the check; point it at an empty one to be explicit.
    text = PROM.read_text().replace("/tmp/ray/prom_metrics_service_discovery.json",
                                    str(tmp_path / "sd.json"))
    (tmp_path / "sd.json").write_text("[]")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(text)
    r = subprocess.run(["promtool", "check", "config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gauges_come_from_the_newest_live_router():
    from router.metrics import RouterMetrics

    m = RouterMetrics()
    first = lambda: [("preft_router_inflight_requests", {}, 1.0)]   # noqa: E731
    second = lambda: [("preft_router_inflight_requests", {}, 2.0)]  # noqa: E731
    value = lambda: next(s.value for f in text_string_to_metric_families(m.render().decode())  # noqa: E731
                         for s in f.samples if s.name == "preft_router_inflight_requests")
    m.set_gauge_source(first)
    m.set_gauge_source(second)
    assert value() == 2.0
    m.clear_gauge_source(second)          # the newer router stopped
    assert value() == 1.0
