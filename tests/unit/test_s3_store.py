"""The s3:// adapter store against a real S3-compatible server (moto's, its own process).

Round trip (publish a staged upload, commit by content address, fetch, delete) with real
tiny-model LoRA files; a corrupted object fails the worker's sha256 check with both digests
and caches nothing; a missing bucket, an unreachable endpoint, wrong or no credentials give
clear errors naming the URI and never the secret; bad ``s3://`` URLs fail at config time
naming the field. No engine: the worker's fetch and validation run on their own.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.adapter_store import ALLOWED_FILES, S3Store, digest_dir, store_for, store_of
from cluster.errors import AdapterStoreError, InvalidAdapter, StoreUnreachable

BUCKET = "preft-adapters"
SECRET_MARK = "wrong-secret-do-not-print"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    from s3_server import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    try:
        key, secret = server.require_auth()
        server.client("s3", key, secret).create_bucket(Bucket=BUCKET)
        server.key, server.secret = key, secret
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from app.tiny import make_lora_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("s3-assets")
    model = make_tiny_model(root / "model")
    return {"model": model, "a": make_lora_adapter(root / "a", model, seed=11),
            "b": make_lora_adapter(root / "b", model, seed=22)}


def _env(monkeypatch, endpoint: str, key: str, secret: str) -> None:
    from cluster.s3_store import reset_clients

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    reset_clients()


@pytest.fixture
def s3(moto, monkeypatch):
    """The environment of a node allowed into the store (credentials, endpoint)."""
    from cluster.s3_store import reset_clients

    _env(monkeypatch, moto.endpoint, moto.key, moto.secret)
    yield moto
    reset_clients()


def _keys(moto, prefix: str) -> list[str]:
    page = moto.client("s3", moto.key, moto.secret).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in page.get("Contents", ()))


def _stage(store, src: Path) -> Path:
    staged = store.staging_dir()
    for name in ALLOWED_FILES:
        shutil.copyfile(src / name, staged / name)
    return staged


def _commit(store, src: Path) -> tuple[str, str]:
    sha, _ = digest_dir(src)
    return store.commit(_stage(store, src), sha), sha


def test_round_trip_by_content_address(s3, tiny, tmp_path):
    store = store_for(f"s3://{BUCKET}/rt/prefix")
    assert isinstance(store, S3Store)
    staged = _stage(store, tiny["a"])
    published = store.publish_staged(staged)           # what the validating worker reads
    assert published == f"s3://{BUCKET}/rt/prefix/.staging/{staged.name}"
    assert _keys(s3, "rt/prefix/.staging/") == [f"rt/prefix/.staging/{staged.name}/{n}"
                                                for n in ALLOWED_FILES]
    sha, size = digest_dir(tiny["a"])
    uri = store.commit(staged, sha)
    assert uri == f"s3://{BUCKET}/rt/prefix/{sha}"
    assert not staged.exists() and _keys(s3, "rt/prefix/.staging/") == []
    assert _keys(s3, "rt/prefix/") == [f"rt/prefix/{sha}/{n}" for n in ALLOWED_FILES]
    dst = tmp_path / "cache" / sha                      # a worker elsewhere: by URI alone
    store_of(uri).fetch(uri, dst)
    assert digest_dir(dst) == (sha, size)
    for n in ALLOWED_FILES:
        assert (dst / n).read_bytes() == (tiny["a"] / n).read_bytes()
    store.delete(uri)
    assert _keys(s3, "rt/prefix/") == []
    with pytest.raises(AdapterStoreError, match="no adapter files there"):
        store_of(uri).fetch(uri, tmp_path / "again")


def test_uris_outside_the_store_are_refused(s3):
    store = store_for(f"s3://{BUCKET}/p")
    for uri in (f"s3://other-bucket/p/{'0' * 64}", f"s3://{BUCKET}/q/x", f"s3://{BUCKET}/p"):
        with pytest.raises(InvalidAdapter, match="outside the store"):
            store.delete(uri)
    with pytest.raises(InvalidAdapter, match="bucket name"):
        store_of("s3://Bad_Bucket/p/x")


def _host(cache: Path, model: Path | None = None):
    """What ``AdapterHost._fetch``/``_validate`` use of a worker: its disk cache, config and
    the base model's shape (no engine)."""
    shape = None
    if model is not None:
        from transformers import AutoConfig

        from prefill_worker.adapters.base import BaseModelShape

        shape = BaseModelShape.from_hf_config(AutoConfig.from_pretrained(model))
    cfg = SimpleNamespace(max_lora_rank=16, max_adapter_bytes=512 << 20)
    return SimpleNamespace(cache_dir=cache, base_shape=shape, cfg=cfg)


def _ref(uri: str, sha: str):
    from cluster.messages import AdapterRef

    return AdapterRef(name="a", version=1, sha256=sha, uri=uri, kind="lora_p")


def test_worker_fetches_verifies_and_caches(s3, tiny, tmp_path):
    from prefill_worker.adapter_host import AdapterHost

    uri, sha = _commit(store_for(f"s3://{BUCKET}/fetch"), tiny["a"])
    host = _host(tmp_path)
    path, tier = AdapterHost._fetch(host, _ref(uri, sha))
    assert (path, tier) == (tmp_path / sha, "store") and digest_dir(path)[0] == sha
    assert AdapterHost._fetch(host, _ref(uri, sha)) == (tmp_path / sha, "disk")


def test_corrupted_object_fails_the_sha256_check_and_caches_nothing(s3, tiny, tmp_path):
    from prefill_worker.adapter_host import AdapterHost

    uri, sha = _commit(store_for(f"s3://{BUCKET}/corrupt"), tiny["a"])
    s3.client("s3", s3.key, s3.secret).put_object(
        Bucket=BUCKET, Key=f"corrupt/{sha}/adapter_model.safetensors", Body=b"not the adapter")
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(InvalidAdapter) as ei:
        AdapterHost._fetch(_host(cache), _ref(uri, sha))
    msg = str(ei.value)
    got = digest_dir(_download(s3, f"corrupt/{sha}", tmp_path / "check"))[0]
    assert uri in msg and sha in msg and got in msg and "sha256" in msg, msg
    assert list(cache.iterdir()) == []                 # nothing cached, nothing half-fetched


def _download(s3, prefix: str, dst: Path) -> Path:
    dst.mkdir()
    c = s3.client("s3", s3.key, s3.secret)
    for n in ALLOWED_FILES:
        c.download_file(BUCKET, f"{prefix}/{n}", str(dst / n))
    return dst


def test_worker_validates_a_published_upload_and_removes_its_scratch(s3, tiny, tmp_path):
    from prefill_worker.adapter_host import AdapterHost

    store = store_for(f"s3://{BUCKET}/validate")
    staged = _stage(store, tiny["b"])
    published = store.publish_staged(staged)
    spec = AdapterHost._validate(_host(tmp_path, tiny["model"]), published, None)
    assert spec.kind == "lora_p" and spec.sha256 == digest_dir(tiny["b"])[0]
    assert list(tmp_path.iterdir()) == []
    store.discard_staged(staged)
    assert _keys(s3, "validate/") == [] and not staged.exists()


def test_missing_bucket_is_named(s3, tiny, tmp_path):
    store = store_for("s3://no-such-bucket-here/p")
    with pytest.raises(AdapterStoreError, match="bucket 'no-such-bucket-here' does not exist"):
        _commit(store, tiny["a"])
    uri = f"s3://no-such-bucket-here/p/{'0' * 64}"
    with pytest.raises(AdapterStoreError, match="does not exist") as ei:
        store_of(uri).fetch(uri, tmp_path / "x")
    assert uri in str(ei.value) and s3.endpoint in str(ei.value)


def test_unreachable_endpoint_is_named(moto, monkeypatch, tmp_path):
    from s3_server import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    _env(monkeypatch, closed, moto.key, moto.secret)
    uri = f"s3://{BUCKET}/p/{'0' * 64}"
    t0 = time.monotonic()
    with pytest.raises(StoreUnreachable) as ei:
        store_of(uri).fetch(uri, tmp_path / "x")
    assert time.monotonic() - t0 < 30
    msg = str(ei.value)
    assert f"cannot reach the adapter store at {closed}" in msg and uri in msg, msg
    assert ei.value.grpc_code == "UNAVAILABLE"


@pytest.mark.parametrize("which", ["secret", "key"])
def test_wrong_credentials_are_refused_without_echoing_them(moto, monkeypatch, tiny, which):
    key, secret = (moto.key, SECRET_MARK) if which == "secret" else ("AKIAWRONGKEY0000", SECRET_MARK)
    _env(monkeypatch, moto.endpoint, key, secret)
    store = store_for(f"s3://{BUCKET}/creds")
    with pytest.raises(AdapterStoreError, match="refused the credentials") as ei:
        _commit(store, tiny["a"])
    msg = str(ei.value)
    assert f"s3://{BUCKET}/creds" in msg and SECRET_MARK not in msg and key not in msg, msg
    assert ("SignatureDoesNotMatch" if which == "secret" else "InvalidAccessKeyId") in msg
    assert ei.value.grpc_code == "FAILED_PRECONDITION"


def test_no_credentials_says_where_they_come_from(moto, monkeypatch, tmp_path):
    _env(monkeypatch, moto.endpoint, "x", "y")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    uri = f"s3://{BUCKET}/p/{'0' * 64}"
    with pytest.raises(AdapterStoreError, match="no credentials for the adapter store") as ei:
        store_of(uri).fetch(uri, tmp_path / "x")
    assert "AWS_ACCESS_KEY_ID" in str(ei.value) and uri in str(ei.value)


@pytest.mark.parametrize("uri, why", [
    ("s3://ab/p", "bucket name 'ab' is invalid"),
    ("s3://Upper/p", "bucket name 'Upper' is invalid"),
    ("s3://under_score/p", "is invalid"),
    ("s3://192.168.1.1/p", "IP address"),
    ("s3://a..b/p", "no '..'"),
    ("s3://key:secret@bucket/p", "without credentials"),
    ("s3://bucket/p/../q", "prefix segment"),
    ("s3://bucket/p?x=1", "without credentials, query"),
    ("gs://bucket/p", "unknown store scheme 'gs'"),
])
def test_bad_store_urls_fail_at_config_time_naming_the_field(uri, why):
    from cluster.config import ClusterConfig, ConfigError, DecodeConfig, EngineConfig, PrefillConfig

    eng = EngineConfig(model="m")
    with pytest.raises(ConfigError) as ei:
        ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                      store_uri=uri)
    assert "ClusterConfig.store_uri=" in str(ei.value) and why in str(ei.value), str(ei.value)
    assert "secret" not in str(ei.value)


def test_good_store_urls_pass_config():
    from cluster.config import ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig

    eng = EngineConfig(model="m")
    for uri in ("s3://my-bucket", "s3://my.bucket-1/a/b", "file:///tmp/store", "/tmp/store"):
        ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                      store_uri=uri)
