"""A cluster whose adapter store is ``s3://`` on a real S3-compatible server (moto's process).

One colocated engine (the cheapest cluster with an adapter host), started with no adapters;
they are uploaded afterwards through the SDK, so the router stages, publishes for validation
and commits to the bucket, and the worker fetches by URI. The tokens equal the single-process
PreFT reference; an adapter whose object is corrupted in the bucket fails its own requests
with the sha256 error while other adapters, old and newly registered, keep serving; with the
bucket gone, then the store down, uploads fail clearly and cached adapters still serve; the
secret never reaches a log file.
"""

from __future__ import annotations

import random

import grpc
import pytest

from preft_client import FailedPrecondition, InvalidArgument, Unavailable

pytestmark = pytest.mark.integration

BUCKET = "preft-cluster"
PREFIX = "adapters"
GAP_TOL = 1e-3
N_TOKENS = 12


@pytest.fixture(scope="module")
def s3_cluster(assets, tmp_path_factory):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)
    from cluster.s3_store import reset_clients
    from app.launcher import LocalCluster
    from s3_server import MotoServer, aws_profile

    moto = MotoServer(tmp_path_factory.mktemp("moto")).start()
    try:
        key, secret = moto.require_auth()
        moto.client("s3", key, secret).create_bucket(Bucket=BUCKET)
        moto.key, moto.secret = key, secret
        # The nodes' ~/.aws (tests/conftest.py): the router here and the Ray workers, which
        # may have started before this module, read the endpoint and key from these files.
        with aws_profile(moto.endpoint, key, secret):
            reset_clients()
            eng = EngineConfig(model=assets["model"])
            cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                                prefill_workers=0, decode_workers=0, colocated_workers=1,
                                router=RouterConfig(port=0), store_uri=f"s3://{BUCKET}/{PREFIX}",
                                run_dir=str(tmp_path_factory.mktemp("s3-run")), name="s3c")
            c = LocalCluster(cfg).start_in_thread()
            try:
                yield c, moto
            finally:
                c.stop()
    finally:
        reset_clients()
        moto.stop()


@pytest.fixture(scope="module")
def sclient(s3_cluster):
    from preft_client import PreftClient

    with PreftClient(s3_cluster[0].address, timeout=120, retries=0) as c:
        yield c


def _keys(moto, prefix: str) -> list[str]:
    page = moto.client("s3", moto.key, moto.secret).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in page.get("Contents", ()))


def _prompt(cluster, seed: int) -> list[int]:
    rng = random.Random(seed)
    vocab = cluster.pool.colocated[0].info.vocab_size
    return [rng.randrange(3, vocab) for _ in range(37)]


def _generate_equals_reference(client, cluster, reference, name, adapter_dir, seed):
    p = _prompt(cluster, seed)
    c = client.generate(name, prompt_token_ids=p, max_tokens=N_TOKENS, ignore_eos=True)
    ref = reference.generate(p, adapter_dir, N_TOKENS, mode="preft")
    k = ref.comparable_prefix(GAP_TOL)
    assert k > 0 and tuple(c.token_ids[:k]) == ref.tokens[:k], (name, c.token_ids, ref.tokens)
    return c


def test_registered_adapter_lives_in_the_bucket_and_serves_exactly(s3_cluster, sclient,
                                                                   reference, assets):
    cluster, moto = s3_cluster
    info = sclient.register_adapter("ada", assets["adapters"]["ada"])
    assert _keys(moto, f"{PREFIX}/") == [f"{PREFIX}/{info.sha256}/adapter_config.json",
                                         f"{PREFIX}/{info.sha256}/adapter_model.safetensors"]
    assert cluster.view.adapters["ada"].uri == f"s3://{BUCKET}/{PREFIX}/{info.sha256}"
    _generate_equals_reference(sclient, cluster, reference, "ada", assets["adapters"]["ada"], 1)


def test_corrupted_object_fails_only_its_adapter(s3_cluster, sclient, reference, assets):
    cluster, moto = s3_cluster
    bea = sclient.register_adapter("bea", assets["adapters"]["bea"])
    moto.client("s3", moto.key, moto.secret).put_object(
        Bucket=BUCKET, Key=f"{PREFIX}/{bea.sha256}/adapter_model.safetensors", Body=b"garbage")
    with pytest.raises(InvalidArgument) as ei:
        sclient.generate("bea", prompt="Hello world", max_tokens=3)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    msg = ei.value.message
    assert f"s3://{BUCKET}/{PREFIX}/{bea.sha256}" in msg and bea.sha256 in msg, msg
    assert "sha256" in msg and "nothing was cached" in msg, msg
    # the worker and the other adapters keep serving: one cached, one fetched after
    _generate_equals_reference(sclient, cluster, reference, "ada", assets["adapters"]["ada"], 2)
    sclient.register_adapter("cid", assets["adapters"]["cid"])
    _generate_equals_reference(sclient, cluster, reference, "cid", assets["adapters"]["cid"], 3)
    with pytest.raises(InvalidArgument, match="sha256"):   # still refused, never cached
        sclient.generate("bea", prompt="Hello world", max_tokens=3)
    st = sclient.cluster_status()
    assert [w.healthy for w in st["workers"]] == [True]


def test_deleted_object_is_a_clear_error_and_delete_removes_the_copy(s3_cluster, sclient,
                                                                     assets):
    cluster, moto = s3_cluster
    dov = sclient.register_adapter("dov", assets["adapters"]["dov"])
    c = moto.client("s3", moto.key, moto.secret)
    for n in ("adapter_config.json", "adapter_model.safetensors"):
        c.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{dov.sha256}/{n}")
    with pytest.raises(FailedPrecondition) as ei:
        sclient.generate("dov", prompt="Hello world", max_tokens=3)
    assert "no adapter files there" in ei.value.message
    assert f"s3://{BUCKET}/{PREFIX}/{dov.sha256}" in ei.value.message
    cid = sclient.get_adapter("cid")
    assert _keys(moto, f"{PREFIX}/{cid.sha256}/")
    sclient.delete_adapter("cid")
    assert _keys(moto, f"{PREFIX}/{cid.sha256}/") == []
    assert _keys(moto, f"{PREFIX}/.staging/") == []    # no upload left anything behind


def test_store_gone_fails_uploads_clearly_and_cached_adapters_serve(s3_cluster, sclient,
                                                                     reference, assets):
    """Last in the module: it empties the bucket, then stops the store."""
    cluster, moto = s3_cluster
    c = moto.client("s3", moto.key, moto.secret)
    keys = _keys(moto, "")
    if keys:
        c.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys]})
    c.delete_bucket(Bucket=BUCKET)
    with pytest.raises(FailedPrecondition, match=f"bucket '{BUCKET}' does not exist"):
        sclient.register_adapter("rlo", assets["adapters"]["rlo"])
    assert "rlo" not in sclient.list_adapters()
    moto.stop()
    with pytest.raises(Unavailable) as ei:
        sclient.register_adapter("rlo", assets["adapters"]["rlo"])
    assert f"cannot reach the adapter store at {moto.endpoint}" in ei.value.message
    assert "rlo" not in sclient.list_adapters()
    # "ada" is in the worker's disk and engine tiers: it serves without the store
    _generate_equals_reference(sclient, cluster, reference, "ada", assets["adapters"]["ada"], 4)
    assert [w.healthy for w in sclient.cluster_status()["workers"]] == [True]
    _no_secret_in_ray_logs(moto.secret)


def _no_secret_in_ray_logs(secret: str) -> None:
    """Every failure above was logged somewhere (router, worker): never with the secret."""
    from pathlib import Path

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [f for f in logs.rglob("*") if f.is_file()]
    assert files
    leaked = [f.name for f in files if secret.encode() in f.read_bytes()]
    assert not leaked, f"the store's secret appears in {leaked}"
