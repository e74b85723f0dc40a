"""The engines' context length comes from the model: the session cluster is built with no
max_model_len on a tiny model whose own limit is 1024 positions (tests/conftest.py), and
``preft up --max-model-len`` above that limit fails, naming both numbers, before Redis, Ray
or any engine starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_starts_on_the_models_own_context_length(assets, cluster, client):
    hf = json.loads((Path(assets["model"]) / "config.json").read_text())
    assert hf["max_position_embeddings"] == 1024
    assert cluster.cfg.prefill.engine.max_model_len == cluster.cfg.decode.engine.max_model_len == 1024
    workers = cluster.pool.prefill + cluster.pool.decode
    assert workers and all(w.info.max_model_len == 1024 for w in workers)
    c = client.generate(None, prompt="The prefill pool reads the prompt", max_tokens=4)
    assert c.usage.completion_tokens == 4


def test_preft_up_above_the_models_limit_fails_before_anything_starts(assets, tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PREFT_HOME"] = str(tmp_path / "home")
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "up", "--model", assets["model"],
         "--max-model-len", "4096", "--port", "0", "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    assert "max_model_len=4096" in out.stderr and "context length 1024" in out.stderr
    assert "Traceback" not in out.stderr
    assert not run_dir.exists()          # no Redis data, no store, no worker caches
    assert "starting Ray" not in out.stderr and took < 20, (took, out.stderr)
