"""Store copies of replaced adapter versions (issue 26, item 7): the rule
(:class:`cluster.adapter_store.Retirements`) and the router's sweep (``router/admin.py``)
against the local store and a real S3-compatible server (moto's process). A copy goes once
its grace has passed and no live worker reports its version; a copy whose files a current
version uses is never deleted. No engine: the registry and residency are a fake state."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.adapter_store import (ALLOWED_FILES, LocalDirStore, Retirements, digest_dir,
                                   held_versions)
from cluster.state import AdapterRecord

from test_s3_store import BUCKET, moto  # noqa: F401  (the S3 server fixture, shared)


def test_held_versions_reads_residency():
    got = held_versions({"w1": {"a": "engine@v3", "b": "disk@v1"}, "w2": {"a": "disk@v2"},
                         "w3": {"odd": "engine"}})
    assert got == {("a", 3), ("b", 1), ("a", 2)}


def test_due_waits_for_grace_and_holders_and_keeps_live_content():
    r = Retirements(grace_s=10.0)
    r.add("a", 1, "sha-a1", "file:///s/sha-a1", now=0.0)
    r.add("b", 1, "sha-b1", "file:///s/sha-b1", now=0.0)
    r.add("c", 1, "sha-live", "file:///s/sha-live", now=0.0)
    assert r.due(set(), set(), now=5.0) == [] and len(r) == 3      # in its grace
    assert r.next_due_in(now=5.0) == 5.0
    # past the grace: c's content is a current version's (kept, off the list); a is held
    out = r.due({"sha-live"}, {("a", 1)}, now=11.0)
    assert [c.name for c in out] == ["b"] and len(r) == 1
    assert [c.name for c in r.due(set(), {("a", 2)}, now=12.0)] == ["a"] and len(r) == 0
    assert r.next_due_in() == float("inf")


class _State:
    """The registry, members and residency the sweep reads (cluster.state.ClusterState)."""

    def __init__(self) -> None:
        self.adapters: dict[str, AdapterRecord] = {}
        self.resident: dict[str, dict[str, str]] = {"w1": {}}

    def list_adapters(self):
        return dict(self.adapters)

    def members(self):
        return {w: None for w in self.resident}

    def residency(self, ids):
        return {w: dict(self.resident[w]) for w in ids}


def _record(name: str, version: int, uri: str, sha: str) -> AdapterRecord:
    return AdapterRecord(name, "lora_p", version, sha, 8, ("q_proj",), 1, "", True, uri)


def _router(store, state: _State):
    from router.admin import AdminRpcs

    svc = AdminRpcs.__new__(AdminRpcs)
    svc.cfg = SimpleNamespace(request_timeout_s=0.2, state_refresh_s=0.05)
    svc.view, svc.store = SimpleNamespace(state=state), store
    return svc


def _commit(store, src: Path) -> tuple[str, str]:
    sha, _ = digest_dir(src)
    staged = store.staging_dir()
    for name in ALLOWED_FILES:
        shutil.copyfile(src / name, staged / name)
    return store.commit(staged, sha), sha


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from app.tiny import make_lora_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("retired-assets")
    model = make_tiny_model(root / "model")
    return [make_lora_adapter(root / f"v{i}", model, seed=60 + i) for i in range(3)]


def _replace_and_sweep(store, files, exists) -> None:
    """v1 replaced by v2 while a worker holds v1; v0's files (another adapter's current
    version) replaced too: v1 goes only once the worker lets go, v0 never."""
    state = _State()
    (u0, s0), (u1, s1), (u2, s2) = (_commit(store, f) for f in files)
    state.adapters = {"x": _record("x", 2, u2, s2), "twin": _record("twin", 1, u0, s0)}
    state.resident["w1"] = {"x": "engine@v1"}
    svc = _router(store, state)

    async def go():
        svc._retire(_record("x", 1, u1, s1))
        svc._retire(_record("y", 4, u0, s0))
        await asyncio.sleep(0.6)                   # past the grace, still held
        assert exists(s1) and exists(s0)
        state.resident["w1"] = {"x": "engine@v2"}  # the worker moved to v2
        await asyncio.wait_for(svc.__dict__["_retire_sweep"], 5)

    asyncio.run(go())
    assert not exists(s1)
    assert exists(s0) and exists(s2)


def test_router_deletes_a_replaced_copy_from_the_local_store(files, tmp_path):
    store = LocalDirStore(tmp_path / "store")
    _replace_and_sweep(store, files, lambda sha: (store.root / sha).is_dir())




def test_router_deletes_a_replaced_copy_from_an_s3_store(files, moto, monkeypatch):
    from cluster.adapter_store import S3Store
    from cluster.s3_store import reset_clients

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret)
    reset_clients()
    client = moto.client("s3", moto.key, moto.secret)

    def exists(sha: str) -> bool:
        return bool(client.list_objects_v2(Bucket=BUCKET, Prefix=f"a/{sha}/").get("Contents"))

    try:
        _replace_and_sweep(S3Store(f"s3://{BUCKET}/a"), files, exists)
    finally:
        reset_clients()


def test_a_copy_with_a_shorter_grace_is_not_kept_waiting_behind_a_longer_one(files, tmp_path):
    """The sweep sleeps until the earliest grace ends; a copy retired meanwhile with a
    shorter grace wakes it (the session's replacements keep the router's long one)."""
    store = LocalDirStore(tmp_path / "store")
    state = _State()
    (u0, s0), (u1, s1) = (_commit(store, f) for f in files[:2])
    svc = _router(store, state)
    retired, _ = svc._retirements()

    async def go():
        retired.grace_s = 60.0
        svc._retire(_record("slow", 1, u0, s0))
        await asyncio.sleep(0.2)                   # the sweep is asleep for a minute
        retired.grace_s = 0.1
        svc._retire(_record("fast", 1, u1, s1))
        for _ in range(40):
            if not (store.root / s1).exists():
                break
            await asyncio.sleep(0.05)
        svc.__dict__["_retire_sweep"].cancel()

    asyncio.run(go())
    assert not (store.root / s1).exists() and (store.root / s0).exists()
