"""The adapter registry belongs to one base model (issue 25, item 4), on real components.

A run directory made on one model is refused by ``preft up`` on another (one line, before
Ray starts); an adapter of another model in the registry never generates (the worker checks
it at load: FAILED_PRECONDITION) and is removed by re-validation; registering identical
files again returns the current version instead of a new one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from preft_client import PreftClientError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """Another base model (hidden size 128, not the session model's 256) and a LoRA for it."""
    from app.tiny import TinyModelSpec, make_lora_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("narrow")
    model = make_tiny_model(root / "model", TinyModelSpec(num_hidden_layers=2, hidden_size=128,
                                                          intermediate_size=256))
    return {"model": model, "lora": make_lora_adapter(root / "lora", model, seed=5)}


def test_identical_files_are_the_same_version(client, assets):
    path = assets["adapters"]["dov"]
    first = client.register_adapter("twin", path, public=True)
    again = client.register_adapter("twin", path, public=True)
    assert (again.version, again.sha256) == (first.version, first.sha256)
    other = client.register_adapter("twin", assets["adapters"]["ada_v2"], public=True)
    assert other.version == first.version + 1 and other.sha256 != first.sha256
    client.delete_adapter("twin")


def test_a_run_directory_of_another_model_is_refused(assets, narrow, tmp_path):
    """The run dir bound to the session model, with an adapter; ``preft up`` on another
    model stops before Ray with one line naming the run dir and the ways on."""
    from app.launcher import LocalCluster
    from cluster.config import ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig
    from cluster.state import AdapterRecord

    run = tmp_path / "run"
    eng = EngineConfig(model=assets["model"])
    lc = LocalCluster(ClusterConfig(prefill=PrefillConfig(engine=eng),
                                    decode=DecodeConfig(engine=eng), run_dir=str(run)))
    lc.start_state(lambda _: None)
    try:
        assert lc.check_registry_model() is None                  # empty: bound to it now
        lc.state().put_adapter(AdapterRecord("alice", "lora_p", 1, "0" * 64, 8, ("q_proj",),
                                             1, "", True, "file:///nowhere"))
        assert lc.check_registry_model() is None                  # same model: goes on
    finally:
        lc.stop()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "app.cli", "up", "--model", str(narrow["model"]),
                        "--colocated-workers", "1", "--port", "0", "--run-dir", str(run)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert r.returncode == 2 and len(err) == 1, r.stdout + r.stderr    # one line, no trace
    assert err[0].startswith("preft up: error:") and "Traceback" not in r.stderr, err
    assert str(run.resolve()) in err[0] and "alice" in err[0], err
    assert "--run-dir" in err[0] and "--revalidate-adapters" in err[0], err
    assert "starting Ray" not in r.stdout + r.stderr and time.monotonic() - t0 < 60


def _inject(cluster, narrow) -> None:
    """An adapter of the other model in the session registry, as a run directory made on
    that model would hold it (files in the store, a record in Redis)."""
    from cluster.adapter_store import digest_dir, stage_local_dir
    from cluster.state import AdapterRecord

    sha, size = digest_dir(narrow["lora"])
    uri = cluster.store.commit(stage_local_dir(cluster.store, narrow["lora"], 1 << 30), sha)
    state = cluster.state()
    state.put_adapter(AdapterRecord("stale", "lora_p", state.next_version("stale"), sha, 8,
                                    ("q_proj", "v_proj"), size, "", True, uri))


def test_an_adapter_of_another_model_never_generates(cluster, client, narrow):
    from app.model_binding import ModelBinding
    from cluster.model_info import model_fingerprint

    _inject(cluster, narrow)
    try:
        assert cluster.wait_until(lambda: "stale" in cluster.view.adapters, 10)
        with pytest.raises(PreftClientError) as ei:
            client.generate("stale", prompt="hello there", max_tokens=4)
        assert ei.value.code.name == "FAILED_PRECONDITION", ei.value
        assert "does not fit" in ei.value.message and "shape" in ei.value.message, ei.value
        said: list[str] = []
        model = cluster.cfg.prefill.engine.model
        removed = cluster.revalidate_registry(ModelBinding(model_fingerprint(model), model),
                                              said.append)
        assert removed == ["stale"], said
        assert "stale" not in cluster.state().list_adapters()
        assert {"ada", "rlo"} <= set(cluster.state().list_adapters())   # those that fit stay
    finally:
        cluster.state().delete_adapter("stale")
