"""Layer-wise KV staging on the prefill side, driven the way vLLM drives our connector:
the scheduler side plans each step's blocks, the worker side stages each layer as the
"forward" writes it, and the decode side pulls through a real transport (both paths)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from kv_transfer.connector import PreftConnectorScheduler, PreftConnectorWorker
from kv_transfer.endpoint import KVEndpoint
from kv_transfer.layout import KVLayout
from kv_transfer.transport import TorchDistTransport

SHAPE = (2, 16, 64)            # kv_heads, block_size, 2*head_size
BS, N_LAYERS, N_BLOCKS = SHAPE[1], 3, 24
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(N_LAYERS)]


class Prefill:
    """A prefill "engine": caches, our connector's two sides on one endpoint."""

    def __init__(self, layerwise: bool, staging_bytes: int = 1 << 30) -> None:
        self.ep = KVEndpoint("prefill-s", "kv_producer", hold_ttl_s=60, timeout_s=5,
                             layerwise=layerwise, staging_bytes=staging_bytes, secret="s")
        self.layers = [torch.zeros((N_BLOCKS, *SHAPE)) for _ in range(N_LAYERS)]
        self.sched = PreftConnectorScheduler(self.ep, BS)
        self.worker = PreftConnectorWorker(self.ep, BS)
        self.worker.register_kv_caches(dict(zip(NAMES, self.layers)))
        self.gen = torch.Generator().manual_seed(7)

    def admit(self, rid: str, prompt_tokens: int):
        req = SimpleNamespace(request_id=rid, num_prompt_tokens=prompt_tokens,
                              kv_transfer_params={"do_remote_decode": True},
                              num_computed_tokens=0, status=None, is_finished=lambda: True)
        assert self.sched.get_num_new_matched_tokens(req, 0) == (0, False)
        return req

    def step(self, req, block_ids: list[int], new: bool, computed: int, scheduled: int,
             layers_saved: int = N_LAYERS):
        """One engine step computing tokens [computed, computed + scheduled) of ``req``,
        in vLLM's order: metadata bound, the forward writes layer by layer (each followed
        by save_kv_layer), start_load_kv after the forward (no sync loads), wait_for_save."""
        rid = req.request_id
        cached = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[],
                                 num_computed_tokens=[])
        news = []
        if new:
            news = [SimpleNamespace(req_id=rid, block_ids=(block_ids,),
                                    num_computed_tokens=computed)]
        else:
            cached = SimpleNamespace(req_ids=[rid], resumed_req_ids=set(),
                                     new_block_ids=[(block_ids,)],
                                     num_computed_tokens=[computed])
        out = SimpleNamespace(scheduled_new_reqs=news, scheduled_cached_reqs=cached,
                              num_scheduled_tokens={rid: scheduled})
        meta = self.sched.build_connector_meta(out)
        self.blocks = getattr(self, "blocks", {})
        ids = self.blocks[rid] = (self.blocks.get(rid, []) if not new else []) + block_ids
        written = ids[computed // BS: -(-(computed + scheduled) // BS)]
        with torch.inference_mode():      # as vLLM runs its forward
            for i, (name, layer) in enumerate(zip(NAMES, self.layers)):
                layer[written] = torch.randn((len(written), *SHAPE), generator=self.gen)
                if i < layers_saved:
                    self.worker.save_kv_layer(name, meta)
        self.worker.start_load_kv(meta)
        self.worker.wait_for_save()
        req.num_computed_tokens = computed + scheduled

    def finish(self, req, status):
        from vllm.v1.request import RequestStatus

        req.status = getattr(RequestStatus, status)
        return self.sched.request_finished(req, self.blocks[req.request_id])

    def close(self):
        self.worker.shutdown()


def _decode(shared_memory: bool):
    layers = [torch.zeros((N_BLOCKS, *SHAPE)) for _ in range(N_LAYERS)]
    t = TorchDistTransport(layers, KVLayout.from_tensors(layers, BS), local_host="127.0.0.1",
                           timeout_s=5, engine_name="decode-s", shared_memory=shared_memory,
                           secret="s")
    return t, layers


def _chunked_prefill(p: Prefill, rid: str, blocks: list[int], prompt: int, chunk: int):
    req = p.admit(rid, prompt)
    done, k = 0, 0
    while done < prompt:
        n = min(chunk, prompt - done)
        new_ids = blocks[-(-done // BS): -(-(done + n) // BS)]
        p.step(req, new_ids, new=k == 0, computed=done, scheduled=n)
        done, k = done + n, k + 1
    return req


@pytest.mark.parametrize("path", ["shm", "gloo"])
def test_pipelined_transfer_equals_the_unpipelined_one_byte_for_byte(path):
    """A 5-block prompt prefilled in three chunks: staged layer by layer, its blocks freed
    (and overwritten, as a reused block would be) before decode pulls; what lands equals
    what an unpipelined transfer of the same prompt lands, and the prefill's own KV."""
    blocks, prompt = [9, 1, 4, 7, 2], 4 * BS + 5          # last block partly filled
    landed, source = {}, {}
    for layerwise in (False, True):
        p, (cons, c_layers) = Prefill(layerwise), _decode(path == "shm")
        try:
            req = _chunked_prefill(p, "r1", blocks, prompt, chunk=2 * BS - 3)
            source[layerwise] = [layer[blocks].clone() for layer in p.layers]
            held, params = p.finish(req, "FINISHED_LENGTH_CAPPED")
            assert held is not layerwise              # staged: the engine frees the blocks now
            if layerwise:
                for layer in p.layers:                # ... and may reuse them at once
                    layer[blocks] = -1.0
            host, port = p.ep.address
            rec = cons.pull(host, port, params["transfer_id"], 1, [20, 3, 5, 11])
            assert rec.ok and rec.pipelined is layerwise and rec.transport == path
            landed[layerwise] = [layer[[20, 3, 5, 11]].clone() for layer in c_layers]
            if layerwise:
                assert _settled(p.ep) == {"staging": 0, "lent": 0}   # reusable, not leaked
        finally:
            cons.close()
            p.close()
    assert all(torch.equal(a, b) for a, b in zip(source[False], source[True]))   # same "forward"
    for want, got in zip(source[True], landed[True]):
        assert torch.equal(got, want[1:])
    assert all(torch.equal(a, b) for a, b in zip(landed[False], landed[True]))


def _settled(ep: KVEndpoint, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = ep.staging.stats()
        got = {"staging": st["staging"], "lent": st["lent"]}
        if got == {"staging": 0, "lent": 0} or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_a_prefill_that_fails_halfway_leaves_nothing_held_or_staged():
    """Aborted after the first of three chunks: no offer, no staged buffer in use, nothing
    for vLLM to keep (it frees the request's blocks), and the pool's buffer is reused."""
    p = Prefill(layerwise=True)
    try:
        req = p.admit("r-abort", 3 * BS)
        p.step(req, [3, 4], new=True, computed=0, scheduled=BS + 4)
        assert p.ep.staging.stats()["staging"] == 1            # it was being staged
        assert p.finish(req, "FINISHED_ABORTED") == (False, None)
        assert len(p.ep.offers) == 0 and p.ep.take_finished() == set()
        st = p.ep.staging.stats()
        assert (st["staging"], st["lent"], st["idle"]) == (0, 0, 1)
        # the next prompt reuses the idle buffer instead of making another
        before = p.ep.staging.stats()["bytes"]
        req2 = _chunked_prefill(p, "r-next", [5, 6], 2 * BS, chunk=2 * BS)
        held, params = p.finish(req2, "FINISHED_STOPPED")
        assert not held and params["num_blocks"] == 2
        assert p.ep.staging.stats()["bytes"] == before
        assert p.ep.release(params["transfer_id"]) is True     # released now...
        assert p.ep.take_finished() == set()                   # ...with no blocks to free
        assert len(p.ep.offers) == 0 and p.ep.staging.stats()["lent"] == 0
    finally:
        p.close()


def test_a_prompt_over_the_staging_cap_takes_the_held_path():
    p = Prefill(layerwise=True, staging_bytes=1)
    cons, c_layers = _decode(True)
    try:
        req = _chunked_prefill(p, "r-big", [2, 8], 2 * BS, chunk=2 * BS)
        held, params = p.finish(req, "FINISHED_LENGTH_CAPPED")
        assert held and p.ep.staging.stats()["skipped"] == 1
        rec = cons.pull(*p.ep.address, params["transfer_id"], 0, [0, 1])
        assert not rec.pipelined
        assert all(torch.equal(c[[0, 1]], s[[2, 8]]) for c, s in zip(c_layers, p.layers))
    finally:
        cons.close()
        p.close()


def test_layerwise_off_stages_nothing():
    p = Prefill(layerwise=False)
    try:
        req = _chunked_prefill(p, "r", [1], BS, chunk=BS)
        assert p.ep.staging is None
        held, _ = p.finish(req, "FINISHED_LENGTH_CAPPED")
        assert held
    finally:
        p.close()


def test_a_step_that_did_not_save_every_layer_is_never_served_as_staged():
    """If the engine skipped save_kv_layer for a layer (say, an attention path without
    vLLM's hook), that layer's staged copy is stale: the prompt must take the held path."""
    p = Prefill(layerwise=True)
    try:
        req = p.admit("r-partial", 2 * BS)
        p.step(req, [3], new=True, computed=0, scheduled=BS)
        p.step(req, [4], new=False, computed=BS, scheduled=BS, layers_saved=N_LAYERS - 1)
        held, params = p.finish(req, "FINISHED_LENGTH_CAPPED")
        assert held and params["num_blocks"] == 2
        assert p.ep.staging.stats()["staging"] == 0 and p.ep.staging.stats()["lent"] == 0
    finally:
        p.close()


class Decode:
    """A decode "engine": caches and our connector's two sides on one consumer endpoint."""

    def __init__(self) -> None:
        self.ep = KVEndpoint("decode-s", "kv_consumer", timeout_s=5, layerwise=True, secret="s")
        self.layers = [torch.zeros((N_BLOCKS, *SHAPE)) for _ in range(N_LAYERS)]
        self.sched = PreftConnectorScheduler(self.ep, BS)
        self.worker = PreftConnectorWorker(self.ep, BS)
        self.worker.register_kv_caches(dict(zip(NAMES, self.layers)))

    def admit(self, rid: str, p: Prefill, params: dict):
        from cluster.messages import KVHandle

        h = KVHandle(params["transfer_id"], *p.ep.address, "prefill-s", params["num_tokens"],
                     params["num_blocks"], p.ep.layout_fingerprint, staged=params["staged"])
        n = params["num_tokens"] + 1   # the engine prompt: the prompt, then the first token
        return SimpleNamespace(request_id=rid, kv_transfer_params=h.to_params(),
                               num_prompt_tokens=n, num_tokens=n)

    def matched(self, req, timeout: float = 5.0):
        """vLLM asks again while we answer None (the claim is in flight)."""
        deadline = time.monotonic() + timeout
        while (got := self.sched.get_num_new_matched_tokens(req, 0))[0] is None:
            assert time.monotonic() < deadline, "claim never answered"
            time.sleep(0.01)
        return got

    def schedule(self, req, dst: list[int], count: int):
        blocks = SimpleNamespace(get_block_ids=lambda: (dst,), get_unhashed_block_ids=lambda: dst)
        self.sched.update_state_after_alloc(req, blocks, count)
        empty = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                scheduled_cached_reqs=None)
        return self.sched.build_connector_meta(empty)

    def form_pair(self, p: Prefill) -> None:
        """The pair's first transfer forms it; it is pulled before its request runs."""
        first = _chunked_prefill(p, "r0", [0], BS, chunk=BS)
        _, params0 = p.finish(first, "FINISHED_LENGTH_CAPPED")
        req0 = self.admit("d0", p, params0)
        assert self.sched.get_num_new_matched_tokens(req0, 0) == (BS, True)
        self.worker.start_load_kv(self.schedule(req0, [9], BS))

    def close(self):
        self.worker.shutdown()


def test_layerwise_load_copies_the_tail_first_and_each_layer_before_its_attention():
    """Staged same-host KV is claimed (no copy) before the request is scheduled, then
    loaded during its forward: the block the first token's KV goes into before the forward
    starts, each other layer before that layer's attention reads it."""
    p, d = Prefill(layerwise=True), Decode()
    try:
        d.form_pair(p)   # the pair's first transfer forms it (pulled before it runs) ...
        # ... later ones on a same-host pair load layer by layer
        req = _chunked_prefill(p, "r1", [2, 6, 4], 2 * BS + 5, chunk=BS)
        src = [layer[[2, 6, 4]].clone() for layer in p.layers]
        _, params = p.finish(req, "FINISHED_STOPPED")
        dreq = d.admit("d1", p, params)
        assert d.matched(dreq) == (2 * BS + 5, False)              # sync: during the forward
        meta = d.schedule(dreq, [11, 3, 7], 2 * BS + 5)
        assert meta.recvs[0].claim is not None
        with torch.inference_mode():
            d.worker.start_load_kv(meta)
            for i, name in enumerate(NAMES):                        # tail first, every layer
                assert torch.equal(d.layers[i][7], src[i][2])
            for i, name in enumerate(NAMES):
                d.worker.wait_for_layer_load(name)
                assert torch.equal(d.layers[i][[11, 3, 7]], src[i]), f"layer {i}"
            d.worker.wait_for_save()
        assert d.worker.get_block_ids_with_load_errors() == set()
        rec = [r for r in d.ep.records() if r.transfer_id == params["transfer_id"]][0]
        assert rec.ok and rec.pipelined and rec.exposed_s is not None
        assert rec.exposed_s <= rec.seconds
        assert _settled(p.ep) == {"staging": 0, "lent": 0}         # prefill reuses its copy
    finally:
        d.close()
        p.close()


def test_a_layerwise_load_the_forward_did_not_wait_for_fails_its_blocks():
    """If a layer's attention ran without waiting for its load (no per-layer hook on that
    path), the request's blocks are reported invalid: vLLM fails it rather than serve KV
    that may be half-copied."""
    p, d = Prefill(layerwise=True), Decode()
    try:
        d.form_pair(p)
        req = _chunked_prefill(p, "r1", [2, 6], 2 * BS, chunk=2 * BS)
        _, params = p.finish(req, "FINISHED_STOPPED")
        dreq = d.admit("d1", p, params)
        assert d.matched(dreq) == (2 * BS, False)
        with torch.inference_mode():
            d.worker.start_load_kv(d.schedule(dreq, [12, 13], 2 * BS))
            for name in NAMES[:-1]:
                d.worker.wait_for_layer_load(name)
            d.worker.wait_for_save()
        assert d.worker.get_block_ids_with_load_errors() == {12, 13}
        assert _settled(p.ep) == {"staging": 0, "lent": 0}
    finally:
        d.close()
        p.close()


def test_a_failed_claim_fails_the_request_without_pulling_again():
    """The claim is the transfer: if its round trip fails (here the offer was released),
    the request fails (retriable) instead of trying a second pull of KV already gone."""
    p, d = Prefill(layerwise=True), Decode()
    try:
        d.form_pair(p)
        req = _chunked_prefill(p, "r1", [2, 6], 2 * BS, chunk=2 * BS)
        _, params = p.finish(req, "FINISHED_STOPPED")
        assert p.ep.release(params["transfer_id"])
        dreq = d.admit("d1", p, params)
        assert d.matched(dreq) == (2 * BS, True)           # claim failed: not a sync load
        meta = d.schedule(dreq, [12, 13], 2 * BS)
        assert meta.recvs[0].claim is None and "unknown or expired" in meta.recvs[0].failed
        d.worker.start_load_kv(meta)
        res = d.worker.get_transfer_results()
        assert res.failed_recving == {"d1"} and "d1" in res.finished_recving
        assert d.ep.transport.pair_mode(*p.ep.address) == "shm"   # an error answer: pair kept
    finally:
        d.close()
        p.close()


def test_a_full_dev_shm_means_the_held_path_not_a_crash(monkeypatch):
    """Segments allocate their pages up front: with shared memory full the prompt is held
    (never a sparse file whose first write past the limit kills the worker with SIGBUS)."""
    import errno
    import os

    from kv_transfer import shm

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = shm.held_segments()
    p = Prefill(layerwise=True)
    try:
        monkeypatch.setattr(os, "posix_fallocate", full)
        with pytest.raises(OSError):
            shm.Segment.create(1024, torch.float32)
        req = _chunked_prefill(p, "r-full", [1, 2], 2 * BS, chunk=2 * BS)
        held, _ = p.finish(req, "FINISHED_LENGTH_CAPPED")
        assert held and p.ep.staging.stats()["skipped"] == 1
        monkeypatch.undo()
        assert shm.held_segments() == before        # nothing half-made is held
    finally:
        p.close()


def test_staging_is_for_cpu_caches_only():
    """On a GPU the copy thread's stream would not be ordered after the forward's KV
    writes: an endpoint on non-CPU caches never stages (its prompts take the held path)."""
    ep = KVEndpoint("prefill-meta", "kv_producer", timeout_s=5, layerwise=True, secret="s")
    layers = [torch.zeros((N_BLOCKS, *SHAPE), device="meta") for _ in range(N_LAYERS)]
    try:
        ep.open(layers, BS)
    except Exception:
        pass   # a meta-device transport may refuse to serve; staging is decided first
    finally:
        ep.close()
    assert ep.staging is None
    # ... and its connector plans no staging for a handed-over prompt (it would have
    # nowhere to stage it)
    sched = PreftConnectorScheduler(ep, BS)
    req = SimpleNamespace(request_id="r", num_prompt_tokens=BS, num_computed_tokens=0,
                          kv_transfer_params={"do_remote_decode": True})
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    out = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(
        req_id="r", block_ids=([1],), num_computed_tokens=0)], num_scheduled_tokens={"r": BS},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], resumed_req_ids=set(),
                                              new_block_ids=[], num_computed_tokens=[]))
    assert sched.build_connector_meta(out).saves == []


def test_an_idle_buffer_is_reused_by_its_capacity_not_its_last_prompt():
    """A buffer made for a long prompt, then lent to a short one, still takes a long one:
    the pool reuses by what the buffer holds, not by the view its last prompt used."""
    p = Prefill(layerwise=True)
    try:
        pool = p.ep.staging
        for rid, n in (("long", 6), ("short", 1), ("long-again", 6)):
            assert pool.begin(rid, n) is not None
            pool.drop(rid)
        assert pool.stats()["idle"] == 1                  # one buffer served all three
    finally:
        p.close()
