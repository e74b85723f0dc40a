"""The KV transport without engines: two "engines" in one process, over both of its paths:
a real gloo pair group and the same-host shared-memory segment."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kv_transfer import shm
from kv_transfer.layout import KVLayout, LayoutMismatch
from kv_transfer.transport import Offer, OfferTable, TorchDistTransport, TransferError

SHAPE = (2, 16, 64)   # kv_heads, block_size, 2*head_size
N_LAYERS, N_BLOCKS = 3, 12


def _engine(dtype=torch.float32, shape=SHAPE, seed=0, name="e", secret="kv-test-secret", timeout_s=5,
            shared_memory=True):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn((N_BLOCKS, *shape), generator=g).to(dtype) for _ in range(N_LAYERS)]
    layout = KVLayout.from_tensors(layers, block_size=shape[1])
    records = []
    t = TorchDistTransport(layers, layout, local_host="127.0.0.1", timeout_s=timeout_s,
                           engine_name=name, on_record=records.append, secret=secret,
                           shared_memory=shared_memory)
    return t, layers, records


def _finished(offers, timeout=5.0):
    """The prefill side frees after its send completes, a moment after decode has the bytes."""
    deadline, got = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        got |= offers.take_finished()
        if got:
            return got
        time.sleep(0.01)
    return got


@pytest.fixture(params=["shm", "gloo"])
def pair(request):
    """A prefill and a decode transport; ``shm``: same host (the default), ``gloo``: the
    decode side does not offer shared memory, as a peer on another host cannot."""
    prod, p_layers, p_rec = _engine(seed=1, name="prefill")
    cons, c_layers, c_rec = _engine(seed=2, name="decode",
                                    shared_memory=request.param == "shm")
    offers = OfferTable()
    host, port = prod.serve(offers)
    yield dict(prod=prod, cons=cons, p_layers=p_layers, c_layers=c_layers, offers=offers,
               host=host, port=port, p_rec=p_rec, c_rec=c_rec, path=request.param)
    cons.close()
    prod.close()


def test_pull_copies_whole_blocks_into_other_ids(pair):
    offers = pair["offers"]
    offers.add(Offer(7, "req-7", [3, 5, 9], num_tokens=40, expires_at=time.monotonic() + 60))
    rec = pair["cons"].pull(pair["host"], pair["port"], 7, 1, [0, 11])
    for src, dst in zip(pair["p_layers"], pair["c_layers"]):
        assert torch.equal(dst[0], src[5]) and torch.equal(dst[11], src[9])
    per_block = N_LAYERS * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
    assert rec.bytes == 2 * per_block and rec.ok
    assert rec.transport == pair["path"]                 # the path the pair chose
    assert _finished(offers) == {"req-7"}                # prefill may free its blocks now
    deadline = time.monotonic() + 5                      # prefill records after it frees
    while not pair["p_rec"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.transport for r in pair["p_rec"]] == [pair["path"]]
    assert len(offers) == 0


def test_second_pull_reuses_the_pair_and_unknown_transfer_fails_cleanly(pair):
    offers = pair["offers"]
    offers.add(Offer(1, "r1", [0], 16, time.monotonic() + 60))
    pair["cons"].pull(pair["host"], pair["port"], 1, 0, [4])
    with pytest.raises(TransferError, match="unknown or expired"):
        pair["cons"].pull(pair["host"], pair["port"], 999, 0, [4])   # waits claim timeout
    offers.add(Offer(2, "r2", [6], 16, time.monotonic() + 60))
    pair["cons"].pull(pair["host"], pair["port"], 2, 0, [8])
    assert torch.equal(pair["c_layers"][0][8], pair["p_layers"][0][6])


def test_release_frees_without_sending(pair):
    offers = pair["offers"]
    offers.add(Offer(3, "r3", [1, 2], 20, time.monotonic() + 60))
    before = [t.clone() for t in pair["c_layers"]]
    pair["cons"].release(pair["host"], pair["port"], 3)
    assert _finished(offers) == {"r3"}
    assert all(torch.equal(a, b) for a, b in zip(before, pair["c_layers"]))


def test_offer_that_arrives_after_the_pull_is_still_served(pair):
    threading.Timer(0.3, lambda: pair["offers"].add(
        Offer(4, "r4", [2], 16, time.monotonic() + 60))).start()
    pair["cons"].pull(pair["host"], pair["port"], 4, 0, [3])
    assert torch.equal(pair["c_layers"][2][3], pair["p_layers"][2][2])


def test_unpulled_offers_expire():
    offers = OfferTable()
    offers.add(Offer(5, "r5", [1], 16, expires_at=time.monotonic() - 1))
    assert offers.take_finished() == {"r5"} and offers.expired == 1


def test_mismatched_layouts_refuse_to_pair():
    prod, _, _ = _engine(name="prefill")
    cons, _, _ = _engine(dtype=torch.bfloat16, name="decode")
    offers = OfferTable()
    host, port = prod.serve(offers)
    try:
        with pytest.raises(TransferError, match="refusing to pair"):
            cons.pull(host, port, 1, 0, [0])
    finally:
        cons.close()
        prod.close()


def test_layout_fingerprint_and_check():
    a = KVLayout(4, 128, (2, 128, 64), "float32", 4)
    assert a.fingerprint() == "L4/B128/2x128x64/float32"
    assert a.bytes_per_block == 4 * 2 * 128 * 64 * 4
    a.check_compatible("L4/B128/2x128x64/float32", local="p", remote="d")
    with pytest.raises(LayoutMismatch, match="block size"):
        a.check_compatible("L4/B16/2x16x64/float32", local="p", remote="d")


def test_pairs_are_torn_down_when_the_other_side_leaves(pair):
    prod, cons, offers = pair["prod"], pair["cons"], pair["offers"]
    offers.add(Offer(11, "r11", [1], 16, time.monotonic() + 60))
    cons.pull(pair["host"], pair["port"], 11, 0, [2])
    assert prod.peers() == ["decode"]
    prod.prune(live_peers={"some-other-decode"})           # decode left the membership
    deadline = time.monotonic() + 5
    while prod.peers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert prod.peers() == []
    cons.prune(live_addresses=set())                        # prefill left, from decode's view
    assert cons._clients == {}
    offers.add(Offer(12, "r12", [3], 16, time.monotonic() + 60))   # a new pair forms on demand
    cons.pull(pair["host"], pair["port"], 12, 0, [4])
    assert torch.equal(pair["c_layers"][1][4], pair["p_layers"][1][3])
    assert prod.peers() == ["decode"]


def test_shm_segments_have_no_name_and_go_with_their_holders():
    """Memfd segments: nothing under /dev/shm; the descriptor is this pair's only handle,
    and closing both ends drops every one of them."""
    before = shm.held_segments()
    dev_shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    prod, p_layers, _ = _engine(seed=1, name="prefill")
    cons, c_layers, c_rec = _engine(seed=2, name="decode")
    offers = OfferTable()
    host, port = prod.serve(offers)
    offers.add(Offer(1, "r1", [2], 16, time.monotonic() + 60))
    cons.pull(host, port, 1, 0, [7])
    offers.add(Offer(2, "r2", list(range(N_BLOCKS)), 16 * N_BLOCKS, time.monotonic() + 60))
    # a transfer larger than the first segment: a new one, its descriptor sent first
    cons.pull(host, port, 2, 0, list(reversed(range(N_BLOCKS))))
    for src, dst in zip(p_layers, c_layers):
        assert torch.equal(dst, src.flip(0))
    assert [r.transport for r in c_rec] == ["shm", "shm"]
    assert shm.held_segments() > before                   # held by descriptor only
    if dev_shm or os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) <= dev_shm      # no name anywhere
    cons.close()
    prod.close()
    import gc
    gc.collect()
    assert shm.held_segments() == before


def test_a_peer_that_cannot_reach_the_abstract_socket_gets_the_network_path():
    server = shm.FdServer()
    try:
        token = server.offer(7)
        with pytest.raises(OSError):
            shm.FdChannel("preft-kv-" + "0" * 24, token, 1.0)    # not this endpoint's name
        wrong = shm.FdChannel(server.name, "f" * 32, 1.0)         # reached it, wrong token
        assert server.channel(7, 0.5) is None
        wrong.close()
        right = shm.FdChannel(server.name, token, 1.0)
        assert server.channel(7, 2.0) is not None
        right.close()
    finally:
        server.close()


def test_a_segment_smaller_than_announced_is_refused():
    seg = shm.Segment.create(4, torch.float32)
    fd = os.dup(seg.fd)
    with pytest.raises(ValueError, match="announced"):
        shm.Segment.adopt(shm.SegmentHeader(seg.id, seg.nbytes * 2), fd, torch.float32)
    seg.close()


def test_chunked_shm_handover_equals_the_whole_transfer_byte_for_byte(monkeypatch):
    """Large same-host transfers are handed over in layer chunks (scatter overlaps gather);
    the bytes that land are exactly those of a transfer handed over at once."""
    from kv_transfer import transport

    landed = {}
    for min_bytes in (1 << 62, 0):      # never chunked, always chunked
        monkeypatch.setattr(transport, "_SHM_CHUNK_MIN_BYTES", min_bytes)
        prod, p_layers, _ = _engine(seed=1, name="prefill")
        cons, c_layers, c_rec = _engine(seed=2, name="decode")
        offers = OfferTable()
        host, port = prod.serve(offers)
        offers.add(Offer(1, "r1", [9, 1, 4, 7, 2], 80, time.monotonic() + 60))
        cons.pull(host, port, 1, 1, [0, 3, 5, 11])
        assert c_rec[-1].transport == "shm"
        landed[min_bytes] = [t.clone() for t in c_layers]
        for src, dst in zip(p_layers, c_layers):
            assert torch.equal(dst[[0, 3, 5, 11]], src[[1, 4, 7, 2]])
        cons.close()
        prod.close()
    assert all(torch.equal(a, b) for a, b in zip(*landed.values()))
    assert shm.layer_chunks(3, 4) == [(0, 1), (1, 2), (2, 3)]   # at most one per layer
    assert shm.layer_chunks(24, 4) == [(0, 6), (6, 12), (12, 18), (18, 24)]


def test_a_copy_that_fails_halfway_frees_the_blocks_and_the_pair_keeps_serving(monkeypatch):
    from kv_transfer import transport

    monkeypatch.setattr(transport, "_SHM_CHUNK_MIN_BYTES", 0)
    prod, p_layers, p_rec = _engine(seed=1, name="prefill")
    cons, c_layers, _ = _engine(seed=2, name="decode")
    offers = OfferTable()
    host, port = prod.serve(offers)
    real, calls = torch.index_select, []

    def failing(*a, **kw):   # the prefill side's gather of the second layer fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected copy failure")
        return real(*a, **kw)

    try:
        monkeypatch.setattr(torch, "index_select", failing)
        offers.add(Offer(1, "r1", [0, 1], 32, time.monotonic() + 60))
        with pytest.raises(TransferError, match="injected copy failure"):
            cons.pull(host, port, 1, 0, [4, 5])
        monkeypatch.setattr(torch, "index_select", real)
        assert _finished(offers) == {"r1"} and len(offers) == 0   # nothing held on prefill
        assert not p_rec[-1].ok
        offers.add(Offer(2, "r2", [3], 16, time.monotonic() + 60))
        cons.pull(host, port, 2, 0, [6])                          # same pair, next request
        assert torch.equal(c_layers[2][6], p_layers[2][3])
    finally:
        cons.close()
        prod.close()


def test_a_segment_the_peer_dropped_is_sent_again(monkeypatch):
    """Decode keeps a few segments mapped; a staged copy in one it dropped is still served
    (each pull says what the peer holds, and prefill sends the descriptor again)."""
    from kv_transfer import transport
    from kv_transfer.staging import Staged

    monkeypatch.setattr(transport, "_MAPPED_SEGMENTS", 1)
    prod, p_layers, _ = _engine(seed=1, name="prefill")
    cons, c_layers, _ = _engine(seed=2, name="decode")
    offers = OfferTable()
    host, port = prod.serve(offers)
    shape = (N_LAYERS, 2, *SHAPE)
    segs = [shm.Segment.create(int(torch.Size(shape).numel()), torch.float32) for _ in range(2)]
    try:
        for tid, seg in zip((1, 2, 3), (segs[0], segs[1], segs[0])):
            buf = seg.view(shape)
            buf.copy_(torch.stack([layer[[tid, tid + 1]] for layer in p_layers]))
            offers.add(Offer(tid, f"r{tid}", [], 32, time.monotonic() + 60,
                             staged=Staged(f"r{tid}", 2, buf, seg.flat, seg)))
            assert cons.pull(host, port, tid, 0, [8, 9]).pipelined
            for src, dst in zip(p_layers, c_layers):
                assert torch.equal(dst[[8, 9]], src[[tid, tid + 1]])
    finally:
        cons.close()
        prod.close()
        for seg in segs:
            seg.close()
