"""The router's per-request path choice (router/pool.py ``WorkerPool.place``) and the CLI's
pool sizes; no engine, no Ray."""

from __future__ import annotations

import argparse

import pytest

from cluster.messages import WorkerInfo
from router.pool import NeedsColocated, NoWorkers, WorkerHandle, WorkerPool


def _w(wid: str, role: str, outstanding: int = 0, healthy: bool = True) -> WorkerHandle:
    h = WorkerHandle(WorkerInfo(wid, role, "L", 1, 1, None, role != "decode", 0.0, 0), None)
    h.outstanding, h.healthy = outstanding, healthy
    return h


def _pool(colo=(), pre=(), dec=()) -> WorkerPool:
    p = WorkerPool()
    for w in (*colo, *pre, *dec):
        p.add(w)
    return p


def test_all_token_requests_go_to_colocated_workers_only():
    pool = _pool([_w("c0", "colocated", outstanding=50)], [_w("p0", "prefill")], [_w("d0", "decode")])
    for _ in range(5):
        assert pool.place("a", all_token=True).path == "colocated"


def test_all_token_without_a_healthy_colocated_worker_needs_one():
    pool = _pool([_w("c0", "colocated", healthy=False)], [_w("p0", "prefill")], [_w("d0", "decode")])
    with pytest.raises(NeedsColocated):
        pool.place("a", all_token=True)
    assert pool.place("a", all_token=False).path == "prefill_decode"


def test_single_shape_clusters_use_their_only_path():
    assert _pool([_w("c0", "colocated")]).place("a", all_token=False).path == "colocated"
    pd = _pool([], [_w("p0", "prefill")], [_w("d0", "decode")]).place(None, all_token=False)
    assert (pd.path, pd.prefill.worker_id, pd.decode.worker_id) == ("prefill_decode", "p0", "d0")
    with pytest.raises(NoWorkers):
        _pool([], [_w("p0", "prefill")], []).place("a", all_token=False)


@pytest.mark.parametrize("colo,pre,dec,path", [
    (0, 0, 0, "colocated"),          # a tie: no KV moves
    (2, 1, 2, "colocated"),
    (3, 1, 2, "prefill_decode"),     # the colocated worker is busier than the pair's busier one
    (3, 5, 0, "colocated"),
])
def test_mixed_cluster_chooses_by_load(colo, pre, dec, path):
    pool = _pool([_w("c0", "colocated", colo)], [_w("p0", "prefill", pre)],
                 [_w("d0", "decode", dec)])
    assert pool.place("a", all_token=False).path == path


def test_adapter_hosts_and_validation_fall_back_to_colocated():
    pool = _pool([_w("c0", "colocated")])
    assert pool.pick_adapter_host(None).worker_id == "c0"
    assert [w.worker_id for w in pool.adapter_hosts()] == ["c0"]


def _args(**kw):
    base = dict(prefill_workers=None, decode_workers=None, colocated_workers=0)
    return argparse.Namespace(**{**base, **kw})


def test_cli_pool_sizes(tmp_path):
    from app.cli import _parse_adapters, _pool_sizes
    from cluster.config import ConfigError

    assert _pool_sizes(_args()) == (1, 1, 0)
    assert _pool_sizes(_args(colocated_workers=2)) == (0, 0, 2)
    assert _pool_sizes(_args(colocated_workers=1, prefill_workers=1, decode_workers=1)) == (1, 1, 1)
    assert _pool_sizes(_args(colocated_workers=1, prefill_workers=2)) == (2, 1, 1)
    x, y = tmp_path / "x", tmp_path / "y"
    x.mkdir(), y.mkdir()
    assert _parse_adapters([f"a={x}", f"b:lora={y}"]) == ((("a", str(x)), ("b", str(y))),
                                                          (("b", "lora"),))
    with pytest.raises((SystemExit, ConfigError), match="NAME:KIND=PATH"):
        _parse_adapters(["nopath"])
    with pytest.raises((SystemExit, ConfigError), match="is not a directory"):
        _parse_adapters([f"a={tmp_path / 'missing'}"])


def test_engine_cores_and_openmp_env():
    import json
    import subprocess
    import sys

    from app.launcher import omp_env
    from worker_runtime.env import parse_cores

    assert parse_cores("0-2,5") == [0, 1, 2, 5]
    assert omp_env("0-1") == {"OMP_NUM_THREADS": "2", "OMP_PROC_BIND": "true",
                              "OMP_PLACES": "{0,1}"}
    # a fresh process, as a worker is (an engine built earlier in this one replaces
    # torch.set_num_threads): the engine thread gets the threads and cores asked for
    code = """
import json, os, threading, torch
from worker_runtime.env import use_engine_cores
got = {}
def engine_thread():
    use_engine_cores("0")
    got["threads"], got["cpus"] = torch.get_num_threads(), sorted(os.sched_getaffinity(0))
t = threading.Thread(target=engine_thread); t.start(); t.join()
print(json.dumps(got))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={"OMP_NUM_THREADS": "4", "PATH": ""})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"threads": 1, "cpus": [0]}


def test_local_cores_shared_or_split():
    from dataclasses import replace
    from unittest import mock

    from app.launcher import LocalCluster, omp_env
    from cluster.config import ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig

    assert omp_env("0-1", shared=True)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in omp_env("0-1")
    eng = EngineConfig(model="m")
    cfg = ClusterConfig(PrefillConfig(engine=eng), DecodeConfig(engine=eng))
    assert cfg.local_cores == "shared"                     # the default
    with mock.patch("os.cpu_count", return_value=4):
        shared = LocalCluster(cfg)
        assert [shared._cores(r, 0) for r in ("prefill", "decode", "colocated")] == ["0-3"] * 3
        split = LocalCluster(replace(cfg, local_cores="split"))
        assert [split._cores(r, 0) for r in ("prefill", "decode", "colocated")] == [
            "0-1", "2-3", "0-3"]
    with pytest.raises(ValueError, match="local_cores"):
        replace(cfg, local_cores="half")
