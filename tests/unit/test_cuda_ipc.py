"""The same-host GPU path (``mode: cuda_ipc``) without a GPU: the pairing, the pull and the
hold/take-back protocol run over a real TCPStore between two transports in one process,
with CUDA's two calls (export handles, map them) replaced at their seam by the prefill
engine's own tensors. The mapping itself runs in tests/gpu/test_cuda_ipc_transport.py."""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer import cuda_ipc
from kv_transfer.layout import KVLayout
from kv_transfer.control import BadMessage, Join, decode_request, encode
from kv_transfer.transport import Offer, OfferTable, TorchDistTransport, TransferError

SHAPE = (2, 16, 64)   # kv_heads, block_size, 2*head_size
N_LAYERS, N_BLOCKS = 3, 12


def _engine(seed, name, timeout_s=5.0):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn((N_BLOCKS, *SHAPE), generator=g) for _ in range(N_LAYERS)]
    records = []
    t = TorchDistTransport(layers, KVLayout.from_tensors(layers, SHAPE[1]),
                           local_host="127.0.0.1", timeout_s=timeout_s, engine_name=name,
                           on_record=records.append, secret="ipc-test-secret")
    t.same_host_mode = "cuda_ipc"      # as on a GPU; the bytes stay on the CPU here
    return t, layers, records


class _Slow:
    """A mapped peer layer whose reads take ``delay`` seconds (a stalled decode copy)."""

    def __init__(self, t, delay):
        self.t, self.delay, self.shape = t, delay, t.shape

    def __getitem__(self, key):
        time.sleep(self.delay)
        return self.t[key]


@pytest.fixture
def ipc_pair(monkeypatch):
    """Prefill and decode on one host with GPU-mode caches: ``export`` yields a marker and
    ``open_layers`` the prefill engine's tensors (what CUDA would map)."""
    prod, p_layers, p_rec = _engine(1, "prefill", timeout_s=1.0)
    cons, c_layers, c_rec = _engine(2, "decode", timeout_s=1.0)
    opened = {"layers": p_layers, "calls": 0}

    def open_layers(desc, **kw):
        opened["calls"] += 1
        assert desc == {"exported": "prefill"} and kw["num_layers"] == N_LAYERS
        if isinstance(opened["layers"], Exception):
            raise opened["layers"]
        return opened["layers"]

    monkeypatch.setattr(cuda_ipc, "export", lambda layers: {"exported": "prefill"})
    monkeypatch.setattr(cuda_ipc, "open_layers", open_layers)
    offers = OfferTable()
    host, port = prod.serve(offers)
    yield dict(prod=prod, cons=cons, p_layers=p_layers, c_layers=c_layers, offers=offers,
               host=host, port=port, p_rec=p_rec, c_rec=c_rec, opened=opened)
    cons.close()
    prod.close()


def _finished(offers, timeout=5.0):
    deadline, got = time.monotonic() + timeout, set()
    while time.monotonic() < deadline and not got:
        got |= offers.take_finished()
        time.sleep(0.01)
    return got


def _wait_records(recs, n=1, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(recs) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return recs


def test_same_host_gpu_pair_copies_straight_from_the_prefill_cache(ipc_pair):
    p = ipc_pair
    p["offers"].add(Offer(7, "req-7", [3, 5, 9], 40, time.monotonic() + 60))
    rec = p["cons"].pull(p["host"], p["port"], 7, 1, [0, 11])
    for src, dst in zip(p["p_layers"], p["c_layers"]):
        assert torch.equal(dst[0], src[5]) and torch.equal(dst[11], src[9])
    assert rec.ok and rec.transport == "cuda_ipc"
    assert _finished(p["offers"]) == {"req-7"}      # held until decode said done
    assert [r.transport for r in _wait_records(p["p_rec"])] == ["cuda_ipc"]
    assert p["p_rec"][0].ok
    p["offers"].add(Offer(8, "req-8", [1], 16, time.monotonic() + 60))
    p["cons"].pull(p["host"], p["port"], 8, 0, [4])
    assert torch.equal(p["c_layers"][2][4], p["p_layers"][2][1])
    assert p["opened"]["calls"] == 1                 # mapped once per pair


def test_a_copy_slower_than_the_prefill_timeout_is_refused_not_served(ipc_pair):
    """Prefill takes its blocks back at its timeout (void first); the late copy fails."""
    p = ipc_pair
    p["opened"]["layers"] = [_Slow(t, 0.3) for t in p["p_layers"]]   # 3 layers x 2: 1.8 s
    p["offers"].add(Offer(3, "req-3", [2, 4], 32, time.monotonic() + 60))
    with pytest.raises(TransferError, match="took its blocks back"):
        p["cons"].pull(p["host"], p["port"], 3, 0, [6, 7])
    assert _finished(p["offers"]) == {"req-3"}       # freed on the prefill side
    rec = _wait_records(p["p_rec"])[0]
    assert not rec.ok and "taken back" in rec.error


def test_a_decode_that_cannot_map_the_handles_pairs_over_the_network(ipc_pair):
    p = ipc_pair
    p["opened"]["layers"] = cuda_ipc.IpcError("CUDA could not open the peer's cache")
    p["offers"].add(Offer(1, "r1", [0, 1], 32, time.monotonic() + 60))
    rec = p["cons"].pull(p["host"], p["port"], 1, 0, [2, 3])   # the request still runs
    assert p["cons"].ipc_refused and p["opened"]["calls"] == 1
    assert rec.ok and rec.transport == "gloo"
    assert torch.equal(p["c_layers"][1][3], p["p_layers"][1][1])
    assert _finished(p["offers"]) == {"r1"}


def test_a_join_asking_for_cuda_ipc_must_say_so_with_a_boolean():
    import msgspec

    body = {"type": "join", "peer": "d", "layout": "L1", "cuda_ipc": "yes"}
    with pytest.raises(BadMessage, match="cuda_ipc"):
        decode_request(msgspec.msgpack.encode(body))
    ok = decode_request(encode(Join("d", "L1", cuda_ipc=True)))
    assert ok.cuda_ipc


def _desc(**layer):
    view = {"storage": 0, "offset": 0, "shape": [N_BLOCKS, *SHAPE],
            "stride": [SHAPE[0] * SHAPE[1] * SHAPE[2], SHAPE[1] * SHAPE[2], SHAPE[2], 1]}
    nbytes = N_BLOCKS * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
    return {"dtype": "float32", "storages": [{"handle": "AA==", "size": nbytes, "offset": 0,
                                                 "rc_offset": 0}],
            "layers": [{**view, **layer}] * N_LAYERS}


@pytest.mark.parametrize("desc,why", [
    (_desc(), None),
    ({**_desc(), "dtype": "bfloat16"}, "dtype"),
    ({**_desc(), "layers": _desc()["layers"][:1]}, "layers: expected 3"),
    (_desc(shape=[N_BLOCKS, 2, 16, 32]), "is not \\[blocks"),
    (_desc(offset=1), "reaches past its storage"),
    (_desc(stride=[1 << 30, 1024, 64, 1]), "reaches past its storage"),
    (_desc(storage=1), "storage="),
    ({**_desc(), "storages": [{"handle": "AA==", "size": 4096, "offset": 1 << 62,
                                  "rc_offset": 0}]},
     "past the device"),                                       # an offset torch would add
    ({**_desc(), "storages": [{"handle": "AA==", "size": 1 << 20, "offset": 0,
                                  "rc_offset": 1 << 40}]},
     "rc_offset"),
    (_desc(shape="x"), "shape="),
    ("not a dict", "JSON object"),
])
def test_a_peer_description_is_checked_before_cuda_sees_it(desc, why):
    kw = dict(num_layers=N_LAYERS, block_shape=SHAPE, dtype=torch.float32,
              device_bytes=80 << 30)
    if why is None:
        assert len(cuda_ipc.check(desc, **kw)) == N_LAYERS
    else:
        with pytest.raises(cuda_ipc.IpcError, match=why):
            cuda_ipc.check(desc, **kw)


@pytest.mark.parametrize("dst,src,runs", [
    ([4, 5, 6], [0, 1, 2], 1),
    ([0, 11], [5, 9], 2),
    ([3, 4, 9, 10, 1], [7, 8, 0, 1, 2], 3),
    (list(range(N_BLOCKS))[::-1], list(range(N_BLOCKS)), N_BLOCKS),   # many runs: gather
])
def test_block_copy_by_runs_equals_the_gather_and_scatter(dst, src, runs):
    from kv_transfer.cuda_ipc import block_runs, copy_blocks

    g = torch.Generator().manual_seed(3)
    a = [torch.randn((N_BLOCKS, *SHAPE), generator=g) for _ in range(N_LAYERS)]
    b = [torch.zeros((N_BLOCKS, *SHAPE)) for _ in range(N_LAYERS)]
    want = [x.clone() for x in b]
    for w, s in zip(want, a):
        w.index_copy_(0, torch.tensor(dst), s.index_select(0, torch.tensor(src)))
    assert len(block_runs(dst, src)) == runs
    copy_blocks(b, dst, a, src)
    assert all(torch.equal(x, y) for x, y in zip(b, want))
