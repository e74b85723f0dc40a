"""Hostile input against the live cluster: poisoned adapter uploads, abusive prompts and
sampling, and property-based requests. Every one is refused with a documented status and a
message naming the problem (or served within its bounds); nothing is written outside the
adapter store, nothing refused stays in it, and the cluster keeps serving."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import threading
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from preft_client import InvalidArgument, PreftClient, PreftClientError
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


# ----------------------------------------------------------------------------- helpers


def _tree(root: Path) -> set[str]:
    """Every path under root, except Redis' own files (heartbeats append to its AOF)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if "redis" not in p.relative_to(root).parts}


@pytest.fixture
def untouched(cluster, client, assets):
    """Asserts, after the test, that no file appeared anywhere under the session's assets
    (run dir, store, worker caches, the adapters), that the store holds nothing new and that
    no staging directory is left."""
    _still_serving(client)   # first use of "ada" caches it on the worker's disk: not ours
    root = Path(assets["root"])
    before = _tree(root)
    yield
    after = _tree(root)
    assert after - before == set(), sorted(after - before)[:20]
    assert not list((cluster.store.root / ".staging").glob("*"))


def _still_serving(client):
    c = client.generate("ada", prompt="Hello after the attack", max_tokens=3)
    assert len(c.token_ids) == 3


def _variant(assets, tmp: Path, name: str) -> Path:
    d = tmp / name
    shutil.copytree(assets["adapters"]["ada"], d)
    return d


def _edit(d: Path, fn) -> Path:
    t = load_file(str(d / WEIGHTS))
    fn(t)
    save_file(t, str(d / WEIGHTS))
    return d


def _first(t: dict, kind: str) -> str:
    return next(k for k in sorted(t) if f"lora_{kind}" in k)


def _safetensors_header(path: Path, header: dict, payload: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def _poisoned(assets, tmp: Path):
    """(case, adapter dir, words the refusal must contain)."""
    from app.tiny import make_lora_adapter

    out = []
    d = _variant(assets, tmp, "pickle-bin")
    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    out.append(("pickle .bin", d, "pickle"))

    class Boom:   # what a malicious pickle does; must never be unpickled anywhere
        def __reduce__(self):
            return (exec, ("open('/tmp/preft-pwned', 'w').write('x')",))
    d = _variant(assets, tmp, "pickle-as-safetensors")
    (d / WEIGHTS).write_bytes(pickle.dumps(Boom()))
    out.append(("pickle named .safetensors", d, "not a valid safetensors"))

    t = load_file(str(Path(assets["adapters"]["ada"]) / WEIGHTS))
    key = _first(t, "A")
    d = _variant(assets, tmp, "bomb-offsets")   # declares 2^20 x 2^20 floats (4 TiB), has 64 B
    _safetensors_header(d / WEIGHTS, {key: {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                                            "data_offsets": [0, 1 << 42]}}, b"\0" * 64)
    out.append(("tensor larger than the file", d, "not a valid safetensors"))
    d = _variant(assets, tmp, "bomb-header")    # header length prefix of 2^62 bytes
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    out.append(("header length bomb", d, "not a valid safetensors"))
    d = _variant(assets, tmp, "bomb-shape")     # consistent offsets, absurd rank dimension
    _safetensors_header(d / WEIGHTS, {key: {"dtype": "F32", "shape": [1 << 31, 0],
                                            "data_offsets": [0, 0]}})
    out.append(("absurd shape", d, "shape"))

    d = _edit(_variant(assets, tmp, "shape"), lambda t: t.__setitem__(_first(t, "A"),
                                                                       torch.zeros(3, 5)))
    out.append(("shape mismatch", d, "shape"))
    d = _edit(_variant(assets, tmp, "dtype"), lambda t: t.__setitem__(
        _first(t, "B"), torch.ones_like(t[_first(t, "B")], dtype=torch.int32)))
    out.append(("integer dtype", d, "dtype"))
    d = _edit(_variant(assets, tmp, "nan"), lambda t: t[_first(t, "B")].__setitem__(
        (0, 0), float("nan")))
    out.append(("NaN", d, "NaN"))
    d = _edit(_variant(assets, tmp, "inf"), lambda t: t[_first(t, "A")].__setitem__(
        (0, 0), float("-inf")))
    out.append(("Inf", d, "Inf"))
    d = make_lora_adapter(tmp / "rank32", assets["model"], seed=7, rank=32)
    out.append(("rank above max_lora_rank", d, "max_lora_rank"))
    d = _variant(assets, tmp, "config-lies")    # config says r=8, tensors are rank 4
    _edit(d, lambda t: [t.__setitem__(k, v[:4].contiguous() if "lora_A" in k
                                      else v[:, :4].contiguous()) for k, v in list(t.items())])
    out.append(("rank differs from config", d, "shape"))
    d = _variant(assets, tmp, "config-not-json")
    (d / CONFIG).write_bytes(b"\x80\x04not json")
    out.append(("config not JSON", d, CONFIG))
    return out


# ----------------------------------------------------------------------------- adapters


def test_poisoned_adapters_are_refused(cluster, client, assets, tmp_path, untouched):
    before = client.list_adapters()
    for case, d, why in _poisoned(assets, tmp_path):
        with pytest.raises(InvalidArgument) as ei:
            client.register_adapter("hostile", d)
        assert why in ei.value.message, (case, ei.value.message)
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert client.list_adapters() == before
    assert not Path("/tmp/preft-pwned").exists()
    _still_serving(client)


@pytest.mark.parametrize("name", ["..", "../evil", "../../../../tmp/evil", "a/b", "/abs",
                                  "nul\x00x", "x" * 10_000, "", ".hidden", "é"],
                         ids=["dotdot", "parent", "deep-parent", "slash", "absolute", "nul",
                              "10k", "empty", "dot-start", "non-ascii"])
def test_hostile_adapter_names_are_refused(cluster, client, assets, name, untouched):
    with pytest.raises(InvalidArgument, match="adapter name .* is invalid") as ei:
        client.register_adapter(name, assets["adapters"]["ada"])
    assert len(ei.value.message) < 400      # the name is echoed truncated, not 10 000 chars
    if name:                                 # and nothing of that name can be used
        with pytest.raises(PreftClientError) as ei:
            client.generate(name, prompt="hi", max_tokens=2)
        assert ei.value.code == grpc.StatusCode.NOT_FOUND
        assert len(ei.value.message) < 400


@pytest.mark.parametrize("filename", ["../../escape.safetensors", "/tmp/preft-abs.json",
                                      "adapter_model.safetensors/../../x", "sub/dir/file",
                                      "adapter_model.safetensors\x00.json", "x" * 5000,
                                      "model.pt", "adapter_model.bin"])
def test_upload_file_names_cannot_escape_the_staging_dir(cluster, assets, filename, untouched):
    """A raw client can name chunks anything; only the two PEFT file names are accepted."""
    d = Path(assets["adapters"]["ada"])
    msgs = [pb.AdapterUploadChunk(header=pb.AdapterUploadHeader(name="escapee")),
            pb.AdapterUploadChunk(chunk=pb.AdapterFileChunk(filename=CONFIG,
                                                            data=(d / CONFIG).read_bytes())),
            pb.AdapterUploadChunk(chunk=pb.AdapterFileChunk(filename=filename, data=b"owned")),
            pb.AdapterUploadChunk(chunk=pb.AdapterFileChunk(filename=WEIGHTS,
                                                            data=(d / WEIGHTS).read_bytes()))]
    with grpc.insecure_channel(cluster.address) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            pb_grpc.RouterStub(ch).RegisterAdapter(iter(msgs), timeout=60)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected file" in ei.value.details() or "pickle" in ei.value.details()
    assert len(ei.value.details()) < 400
    assert not Path("/tmp/preft-abs.json").exists()


# ----------------------------------------------------------------------------- prompts


def test_abusive_prompts_and_sampling(cluster, client):
    vocab = cluster.pool.prefill[0].info.vocab_size
    max_len = cluster.pool.prefill[0].info.max_model_len
    cases = [
        (dict(prompt_token_ids=[5] * (max_len + 500)), "prompt"),
        (dict(prompt="word " * (4 * max_len)), "prompt"),
        (dict(prompt_token_ids=[2**32 - 1]), "prompt_token_ids"),
        (dict(prompt_token_ids=[5, vocab]), "prompt_token_ids"),
        (dict(prompt="hi", max_tokens=2**32 - 1), "max_tokens"),
        (dict(prompt="hi", max_tokens=max_len), "max_tokens"),
        (dict(prompt="hi", temperature=float("nan")), "temperature"),
        (dict(prompt="hi", top_p=float("inf")), "top_p"),
        (dict(prompt="hi", seed=2**64 - 1), "seed"),
        (dict(prompt="hi", stop=["ok", ""]), "stop"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidArgument) as ei:
            client.generate("ada", **{"max_tokens": 4, **kwargs})
        assert field in ei.value.message, (kwargs.keys(), ei.value.message)
        assert len(ei.value.message) < 1000
    _still_serving(client)


def test_stop_strings_that_never_match_are_bounded_by_max_tokens(client):
    stops = ["\x00never\x00", "zzzzzzzzzzzzzzzzzzzzzzzz", "🦄" * 8] + [f"#{i}#" for i in range(50)]
    c = client.generate("bea", prompt="Tell me a long story", max_tokens=7, stop=stops,
                        ignore_eos=True)
    assert c.finish_reason == "length" and c.usage.completion_tokens == 7 == len(c.token_ids)


def test_hostile_request_ids(cluster, client):
    """Request ids are the caller's: long, NUL, or reused at the same time by two callers."""
    for rid in ("r" * 10_000, "nul\x00id", "../../x", "dup"):
        c = client.generate("cid", prompt="Hello", max_tokens=3, request_id=rid)
        assert len(c.token_ids) == 3
        assert c.request_id.startswith(rid + "-")   # made unique by the router
    p1, p2 = "The quick brown fox", "Operators watch throughput"
    ref1 = client.generate("ada", prompt=p1, max_tokens=10, ignore_eos=True).token_ids
    ref2 = client.generate("bea", prompt=p2, max_tokens=10, ignore_eos=True).token_ids
    results: dict = {}

    def run(key, adapter, prompt):
        try:
            with PreftClient(cluster.address, timeout=60) as c:
                results[key] = c.generate(adapter, prompt=prompt, max_tokens=10,
                                          ignore_eos=True, request_id="same-id").token_ids
        except PreftClientError as e:
            results[key] = e
    for _ in range(3):
        results.clear()
        ts = [threading.Thread(target=run, args=("a", "ada", p1)),
              threading.Thread(target=run, args=("b", "bea", p2))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(90)
        assert not any(t.is_alive() for t in ts), "a request with a reused id hung"
        # Each caller gets its own tokens, or a clean refusal: never the other's output.
        for key, ref in (("a", ref1), ("b", ref2)):
            r = results[key]
            if isinstance(r, PreftClientError):
                assert r.code in (grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.ALREADY_EXISTS), r
            else:
                assert r == ref, (key, r, ref)
    _still_serving(client)


# ----------------------------------------------------------------------------- property-based


@st.composite
def e2e_requests(draw):
    kw = dict(max_tokens=draw(st.integers(0, 4)), ignore_eos=draw(st.booleans()),
              stop=draw(st.lists(st.text(max_size=6), max_size=3)) or None)
    if draw(st.booleans()):
        kw["temperature"] = draw(st.floats(width=32) | st.sampled_from([0.0, 0.7]))
    if draw(st.booleans()):
        kw["top_p"] = draw(st.floats(width=32) | st.sampled_from([0.5, 1.0]))
    if draw(st.booleans()):
        kw["seed"] = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        kw["prompt"] = draw(st.text(max_size=60))
    else:
        kw["prompt_token_ids"] = draw(st.lists(st.integers(0, 700) | st.integers(0, 2**32 - 1),
                                               max_size=24))
    return draw(st.sampled_from([None, "ada", "bea", "missing", "x" * 300])), kw


@given(req=e2e_requests())
@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_end_to_end(client, req):
    adapter, kw = req
    try:
        c = client.generate(adapter, **kw)
    except PreftClientError as e:
        assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            e.code, e.message[:300])
        assert e.message and len(e.message) < 1000
        return
    assert 1 <= c.usage.completion_tokens <= kw["max_tokens"]
    assert c.finish_reason in ("length", "stop")
    assert len(c.token_ids) == c.usage.completion_tokens


@pytest.fixture(scope="module")
def gateway(cluster):
    from http_gateway import HttpGatewayThread

    gw = HttpGatewayThread(cluster.address, timeout=60)
    gw.start()
    yield gw
    gw.stop()


@given(body=st.fixed_dictionaries(
    {"prompt": st.text(max_size=40) | st.lists(st.integers(-1, 2**32), max_size=12),
     "max_tokens": st.integers(-1, 4)},
    optional={"model": st.sampled_from(["base", "ada", "missing", "x" * 2000]),
              "temperature": st.floats(allow_nan=False, allow_infinity=False),
              "top_p": st.floats(allow_nan=False, allow_infinity=False),
              "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=2),
              "seed": st.integers(-1, 2**64), "stream": st.booleans()}))
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_http_completions_end_to_end(gateway, body):
    import httpx

    resp = httpx.post(f"{gateway.base_url}/v1/completions", json=body, timeout=60)
    assert resp.status_code in (200, 400, 404), (resp.status_code, resp.text[:300])
    if resp.status_code != 200:
        assert resp.json()["error"]["message"]
    elif not body.get("stream"):
        usage = resp.json()["usage"]
        assert 1 <= usage["completion_tokens"] <= body["max_tokens"]


def test_cluster_still_serves_after_all_of_it(client):
    _still_serving(client)
    st_ = client.cluster_status()
    assert all(w.healthy for w in st_["workers"])
