"""`preft bench` smoke run on the tiny model: every system runs, the JSON has every field.

Not a timed assertion: throughput on the tiny model says nothing; the numbers come from
docs/benchmarks.md runs on real architectures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = {"system", "adapters", "distinct_used", "completed", "failed", "wall_s",
              "output_tok_s", "req_s", "output_tokens", "ttft_p50_ms", "ttft_p99_ms",
              "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "startup_s", "samples"}


def test_bench_smoke_all_systems(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "app.cli", "bench", "--model", "tiny", "--adapters", "1,3",
           "--num-requests", "6", "--prompt-len", "8:40", "--output-len", "4", "--rank", "8",
           "--systems", "preft_colocated,preft,preft_mixed,multi_lora,multi_lora_grouped,base",
           "--popularity", "zipf", "--out-dir", str(out), "--assets", str(tmp_path / "assets")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    res_path = out / "e2e_tiny_r8.json"
    failed = [row for row in json.loads(res_path.read_text())["rows"]
              if "failed_to_run" in row] if res_path.exists() else []
    assert r.returncode == 0 and not failed, (failed, r.stdout[-4000:] + r.stderr[-4000:])
    assert "PreFT output tok/s ratios" in r.stdout
    res = json.loads(res_path.read_text())
    assert res["config"]["workload"]["num_requests"] == 6 and res["machine"]["cpus"] >= 1
    by = {(row["system"], row["adapters"]): row for row in res["rows"]}
    preft = ("preft", "preft_colocated", "preft_mixed")
    assert set(by) == {(s, n) for s in (*preft, "multi_lora", "multi_lora_grouped")
                       for n in (1, 3)} | {("base", 0)}
    for row in by.values():
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["completed"] == 6 and row["failed"] == 0, row.get("errors")
        assert row["output_tokens"] == 6 * 4          # ignore_eos: identical work everywhere
        assert row["output_tok_s"] > 0 and row["ttft_p50_ms"] > 0
        assert len(row["samples"]["ttft_ms"]) == 6
    # where the router sent each N's requests, per PreFT shape
    for n in (1, 3):
        assert by[("preft", n)]["paths"] == {"prefill_decode": 6}
        assert by[("preft_colocated", n)]["paths"] == {"colocated": 6}
        assert sum(by[("preft_mixed", n)]["paths"].values()) == 6
    assert sorted((x["system"], x["adapters"]) for x in res["ratios"]) == sorted(
        (s, n) for s in preft for n in (1, 3))
    for x in res["ratios"]:
        assert x["x_multi_lora"] > 0 and x["x_multi_lora_grouped"] > 0 and x["x_base"] > 0
        assert x["system"] == "preft" or x["x_preft"] > 0
    for p in res["plots"]:
        assert Path(p).stat().st_size > 10_000
