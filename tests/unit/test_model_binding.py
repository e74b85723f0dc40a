"""The adapter registry belongs to one base model (issue 25, item 4), without an engine.

The fingerprint tells models apart cheaply; the launcher's check refuses (or re-validates)
a registry made on another model; and a worker refuses to load an adapter whose shapes do
not fit its own model, whatever the registry says (``AdapterHost._entry``).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from cluster.config import ConfigError
from cluster.errors import AdapterMismatch, InvalidAdapter
from cluster.state import AdapterRecord


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Model A (hidden 256), a byte copy of it, model B (hidden 128), model A' (A's shape,
    other weights); a LoRA made for A."""
    from app.tiny import TinyModelSpec, make_lora_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("binding")
    a = make_tiny_model(root / "a", TinyModelSpec(num_hidden_layers=2))
    copy = Path(shutil.copytree(a, root / "a_copy"))
    b = make_tiny_model(root / "b", TinyModelSpec(num_hidden_layers=2, hidden_size=128,
                                                  intermediate_size=256))
    a2 = make_tiny_model(root / "a2", TinyModelSpec(num_hidden_layers=2, seed=4321))
    return {"a": a, "a_copy": copy, "b": b, "a2": a2,
            "lora_a": make_lora_adapter(root / "lora_a", a, seed=7)}


def test_fingerprint_names_the_model_not_its_path(two_models):
    from cluster.model_info import model_fingerprint

    fp = {k: model_fingerprint(str(two_models[k])) for k in ("a", "a_copy", "b", "a2")}
    assert fp["a"] == fp["a_copy"]
    assert len({fp["a"], fp["b"], fp["a2"]}) == 3, fp
    with pytest.raises(ConfigError, match="config.json"):
        model_fingerprint(str(two_models["lora_a"]))


class _State:
    """What check_binding/revalidate use of ClusterState, in memory."""

    def __init__(self, adapters=()) -> None:
        self.binding = None
        self.adapters = {r.name: r for r in adapters}

    def base_model(self):
        return self.binding

    def bind_base_model(self, b) -> None:
        self.binding = b

    def list_adapters(self):
        return dict(self.adapters)

    def delete_adapter(self, name: str) -> bool:
        return self.adapters.pop(name, None) is not None


def _rec(name: str) -> AdapterRecord:
    return AdapterRecord(name, "lora_p", 3, "0" * 64, 8, ("q_proj",), 1, "", True,
                         f"file:///store/{name}", created=time.time())


def test_registry_on_another_model_is_refused_or_revalidated(two_models):
    from app.model_binding import check_binding, revalidate

    a, b = str(two_models["a"]), str(two_models["b"])
    st = _State()
    assert check_binding(st, a, "run directory /r", "refuse") is None   # empty: bound now
    assert st.binding.model == a
    st.adapters = {"alice": _rec("alice"), "bob": _rec("bob")}
    assert check_binding(st, str(two_models["a_copy"]), "run directory /r", "refuse") is None
    with pytest.raises(ConfigError) as ei:
        check_binding(st, b, "run directory /r", "refuse")
    msg = str(ei.value)
    assert "run directory /r" in msg and "alice, bob" in msg and b in msg, msg
    assert "--run-dir" in msg and "--revalidate-adapters" in msg and "\n" not in msg, msg
    new = check_binding(st, b, "run directory /r", "revalidate")
    assert new is not None and st.binding.model == a          # not bound before re-validation

    def validate(uri: str, kind: str):
        if uri.endswith("alice"):
            raise InvalidAdapter("q_proj: shape (8, 256) does not match the base model")
    said = []
    assert revalidate(st, validate, new, said.append) == ["alice"]
    assert set(st.adapters) == {"bob"} and st.binding == new
    assert any("alice" in s and "removed" in s for s in said), said


def test_a_registry_without_a_recorded_model_is_not_trusted(two_models):
    from app.model_binding import check_binding

    st = _State([_rec("old")])
    with pytest.raises(ConfigError, match="did not record"):
        check_binding(st, str(two_models["a"]), "run directory /r", "refuse")


def _host(model: Path, cache: Path):
    from cluster.config import EngineConfig, PrefillConfig
    from prefill_worker.adapter_host import AdapterHost

    return AdapterHost(PrefillConfig(engine=EngineConfig(model=str(model))), cache)


def _ref(store_root: Path, adapter: Path):
    from cluster.adapter_store import digest_dir, stage_local_dir, store_for
    from cluster.messages import AdapterRef

    store = store_for(str(store_root))
    sha, _ = digest_dir(adapter)
    uri = store.commit(stage_local_dir(store, adapter, 1 << 30), sha)
    return AdapterRef(name="old-lora", version=2, kind="lora_p", sha256=sha, uri=uri)


def test_worker_refuses_to_load_an_adapter_of_another_model(two_models, tmp_path):
    ref = _ref(tmp_path / "store", two_models["lora_a"])
    host = _host(two_models["b"], tmp_path / "cache-b")
    with pytest.raises(AdapterMismatch) as ei:
        asyncio.run(host._entry(ref))
    msg = ei.value.message
    assert "old-lora v2" in msg and str(two_models["b"]) in msg and "shape" in msg, msg
    assert ei.value.grpc_code == "FAILED_PRECONDITION"
    assert host.residency() == {}                              # nothing reached the engine
    ok = _host(two_models["a"], tmp_path / "cache-a")          # its own model: loads
    entry, tier = asyncio.run(ok._entry(ref))
    assert tier == "store" and entry.ref == ref
