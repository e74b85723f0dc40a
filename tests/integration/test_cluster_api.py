"""Adapter lifecycle, malformed uploads, auth, admission, cancel and Redis restarts through
the real router (gRPC on loopback), real Redis, real Ray workers and vLLM engines."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from preft_client import (InvalidArgument, NotFound, PermissionDenied, PreftClient,
                          ResourceExhausted, Unauthenticated)

pytestmark = pytest.mark.integration


def _store_snapshot(cluster) -> set[str]:
    root = cluster.store.root
    return {p.name for p in root.iterdir()} | {
        f".staging/{p.name}" for p in (root / ".staging").glob("*")}


def test_adapter_lifecycle(cluster, client, reference, assets):
    from app.tiny import make_lora_adapter

    root = Path(assets["root"])
    v1 = make_lora_adapter(root / "eve1", assets["model"], seed=501)
    v2 = make_lora_adapter(root / "eve2", assets["model"], seed=502)
    rng = random.Random(5)
    p = [rng.randrange(3, 500) for _ in range(140)]
    t0 = time.perf_counter()
    info = client.register_adapter("eve", v1)
    c1 = client.generate("eve", prompt_token_ids=p, max_tokens=12, ignore_eos=True)
    print(f"\nupload-to-servable (upload + first request): {time.perf_counter() - t0:.2f} s")
    assert info.version >= 1 and client.get_adapter("eve").sha256 == info.sha256
    r1 = reference.generate(p, str(v1), 12)
    assert c1.token_ids[:r1.comparable_prefix(1e-3)] == r1.tokens[:r1.comparable_prefix(1e-3)]
    info2 = client.register_adapter("eve", v2)
    assert info2.version == info.version + 1 and info2.sha256 != info.sha256
    c2 = client.generate("eve", prompt_token_ids=p, max_tokens=12, ignore_eos=True)
    r2 = reference.generate(p, str(v2), 12)
    assert c2.token_ids[:r2.comparable_prefix(1e-3)] == r2.tokens[:r2.comparable_prefix(1e-3)]
    assert c2.token_ids != c1.token_ids
    assert client.delete_adapter("eve")
    with pytest.raises(NotFound):
        client.generate("eve", prompt="hi", max_tokens=2)
    with pytest.raises(NotFound):
        client.get_adapter("eve")
    assert not (cluster.store.root / info2.sha256).exists()   # gone from the store
    assert "eve" not in client.list_adapters()


def _variant(assets, tmp: Path, name: str) -> Path:
    d = tmp / name
    shutil.copytree(assets["adapters"]["ada"], d)
    return d


def _edit(d: Path, fn):
    t = load_file(str(d / "adapter_model.safetensors"))
    fn(t)
    save_file(t, str(d / "adapter_model.safetensors"))


def _malformed(assets, tmp: Path):
    cases = []
    d = _variant(assets, tmp, "pickle")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    cases.append(("pkl", d, "pickle"))
    d = _variant(assets, tmp, "shape")
    _edit(d, lambda t: t.__setitem__(next(iter(t)), torch.zeros(3, 5)))
    cases.append(("shape", d, "shape"))
    d = _variant(assets, tmp, "rank")
    cfg = json.loads((d / "adapter_config.json").read_text())
    _edit(d, lambda t: [t.__setitem__(k, torch.zeros(32, v.shape[1]) if "lora_A" in k
                                      else torch.zeros(v.shape[0], 32)) for k, v in list(t.items())])
    cfg["r"] = 32
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    cases.append(("rank", d, "max_lora_rank"))
    d = _variant(assets, tmp, "nan")
    _edit(d, lambda t: t[next(k for k in t if "lora_B" in k)].__setitem__((0, 0), float("nan")))
    cases.append(("nan", d, "NaN"))
    d = _variant(assets, tmp, "noconfig")
    (d / "adapter_config.json").unlink()
    cases.append(("noconfig", d, "missing"))
    return cases


def test_malformed_uploads_are_refused_and_nothing_is_stored(cluster, client, assets, tmp_path):
    before_store = _store_snapshot(cluster)
    before = set(client.list_adapters())
    for name, d, why in _malformed(assets, tmp_path):
        with pytest.raises(InvalidArgument) as ei:
            client.register_adapter(f"bad-{name}", d)
        assert why in ei.value.message, (name, ei.value.message)
    for bad_name, why in [("../evil", "invalid"), ("a/b", "invalid"), ("nul\x00x", "invalid"),
                          ("x" * 10_000, "invalid")]:
        with pytest.raises(InvalidArgument, match=why):
            client.register_adapter(bad_name, assets["adapters"]["ada"])
    # Oversize: over the router's limit (lowered for this test).
    svc = cluster._server.service
    old_cfg = svc.cfg
    svc.cfg = replace(old_cfg, max_adapter_bytes=1000)
    try:
        with pytest.raises(InvalidArgument, match="size limit"):
            client.register_adapter("too-big", assets["adapters"]["ada"])
    finally:
        svc.cfg = old_cfg
    assert _store_snapshot(cluster) - {".staging"} == before_store - {".staging"}
    assert not list((cluster.store.root / ".staging").glob("*"))
    assert set(client.list_adapters()) == before


def test_auth_tenants_and_permissions(cluster, assets):
    from cluster.state import new_api_key

    state = cluster.state()
    k_alice, k_bob = new_api_key(), new_api_key()
    state.add_api_key(k_alice, "alice")
    state.add_api_key(k_bob, "bob")
    svc = cluster._server.service
    old_cfg = svc.cfg
    svc.cfg = replace(old_cfg, require_auth=True)
    try:
        with PreftClient(cluster.address, retries=0) as anon:
            with pytest.raises(Unauthenticated, match="missing API key"):
                anon.generate("ada", prompt="hi", max_tokens=2)
        with PreftClient(cluster.address, api_key="pk-wrong", retries=0) as bad:
            with pytest.raises(Unauthenticated, match="unknown API key"):
                bad.list_adapters()
        with PreftClient(cluster.address, api_key=k_alice) as alice, \
                PreftClient(cluster.address, api_key=k_bob) as bob:
            alice.register_adapter("alice-private", assets["adapters"]["bea"], public=False)
            assert alice.generate("alice-private", prompt="hi", max_tokens=3).usage.completion_tokens == 3
            assert "alice-private" in alice.list_adapters()
            assert "alice-private" not in bob.list_adapters()
            assert "ada" in bob.list_adapters()                  # public adapters are shared
            with pytest.raises(PermissionDenied):
                bob.generate("alice-private", prompt="hi", max_tokens=2)
            with pytest.raises(PermissionDenied):
                bob.register_adapter("alice-private", assets["adapters"]["cid"])
            with pytest.raises(PermissionDenied):
                bob.delete_adapter("alice-private")
            assert alice.delete_adapter("alice-private")
    finally:
        svc.cfg = old_cfg


def test_open_api_on_non_loopback_refuses_to_start():
    from cluster.config import RouterConfig
    from router.server import check_bind_is_safe

    with pytest.raises(PermissionError, match="preft keys create"):
        check_bind_is_safe(RouterConfig(host="0.0.0.0"))
    check_bind_is_safe(RouterConfig(host="0.0.0.0", require_auth=True))
    check_bind_is_safe(RouterConfig(host="127.0.0.1"))


def test_flood_gets_resource_exhausted_and_cancel_frees_blocks(cluster, client):
    import ray

    svc = cluster._server.service
    old_cfg = svc.cfg
    svc.cfg = replace(old_cfg, max_queue_depth=2)
    results, errors = [], []

    def one(i):
        try:
            results.append(client.generate("ada", prompt_token_ids=[7 + i] * 50, max_tokens=24,
                                           ignore_eos=True))
        except ResourceExhausted as e:
            errors.append(e)

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    finally:
        svc.cfg = old_cfg
    assert errors and results and len(errors) + len(results) == 12
    assert "retry" in errors[0].message

    # Cancel mid-stream: the decode worker aborts and frees the request's blocks.
    with PreftClient(cluster.address) as c:
        stream = c._stub.Generate(__import__("preft_client.client", fromlist=["x"])._request(
            "bea", None, [9] * 300, 400, 0.0, 1.0, None, None, True, None), timeout=60)
        got = 0
        for msg in stream:
            got += msg.HasField("delta")
            if got >= 3:
                stream.cancel()
                break
    d = cluster.pool.decode[0].actor
    assert cluster.wait_until(lambda: (lambda u: u.blocks_free == u.blocks_total
                                       and u.requests == 0)(ray.get(d.kv_usage.remote())), 20)
    p = cluster.pool.prefill[0].actor
    assert cluster.wait_until(lambda: ray.get(p.held_transfers.remote()) == 0, 20)


def test_cluster_status(client):
    st = client.cluster_status()
    roles = {w.role for w in st["workers"]}
    assert roles == {"prefill", "decode"} and st["adapters"] >= 4
    dec = next(w for w in st["workers"] if w.role == "decode")
    assert dec.kv_blocks_total > 0 and dec.healthy
    pre = next(w for w in st["workers"] if w.role == "prefill")
    assert pre.kv_bytes_sent > 0 and any(v.startswith(("engine", "disk")) for v in pre.resident.values())


def test_redis_restart_keeps_serving_and_resyncs(cluster, client):
    view = cluster._server.service.view
    before = set(client.list_adapters())
    cluster.redis.stop()
    assert cluster.wait_until(lambda: view.stale, 10)
    c = client.generate("cid", prompt="Hello while Redis is down", max_tokens=4)
    assert len(c.token_ids) == 4                      # served from the cached view
    assert client.cluster_status()["state_stale"] is True
    cluster.redis.start()
    assert cluster.wait_until(lambda: not view.stale, 15)
    assert set(client.list_adapters()) == before      # AOF persisted; state resynced
    assert client.generate("dov", prompt="And after", max_tokens=3).usage.completion_tokens == 3
