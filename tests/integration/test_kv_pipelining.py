"""KV pipelined layer by layer, on a real vLLM prefill engine (its own process: vLLM keeps
one KV connector per process): prompts prefilled in several chunks are staged as each
layer's forward ends; what decode pulls equals the engine's own blocks byte for byte, over
shared memory and gloo; a prompt aborted halfway leaves nothing held, staged or allocated.
Driver: tests/kv_pipeline_driver.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_real_engine_pipelined_transfer_and_abort_halfway(assets, tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "kv_pipeline_driver.py"),
                        str(assets["model"]), str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(out.read_text())
    for p, transport in zip(got["prompts"], ("shm", "gloo")):
        assert p["steps"] >= 5 and p["blocks"] >= 2, p          # chunked, multi-block
        assert p["pipelined"] and p["transport"] == transport, p
        assert p["bytes_equal"], p
    a = got["aborted"]
    assert a["params"] is None                                   # no KV handed over
    assert a["offers"] == 0 and a["finished"] == []              # nothing held for decode
    assert a["staging"]["staging"] == 0 and a["staging"]["lent"] == 0, a["staging"]
    assert a["blocks_free"] == a["blocks_total"], a              # vLLM freed every block
