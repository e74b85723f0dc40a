"""The same-host GPU path on a real GPU: the prefill process exports CUDA IPC handles of its
cache, the decode process maps them and copies blocks device to device (one GPU: both on
it; two: prefill on 0, decode on 1, over peer access). Skipped without CUDA.
Run on a GPU machine: ``bash scripts/test.sh tests/gpu``.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA")]

SHAPE = (8, 16, 256)   # kv_heads, block_size, 2*head_size
N_LAYERS, N_BLOCKS = 4, 64


def _layers(device, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((N_BLOCKS, *SHAPE), generator=g).to(dtype).to(device)
            for _ in range(N_LAYERS)]


def _producer(q, done, shared_storage):
    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import Offer, OfferTable, TorchDistTransport

    torch.cuda.set_device(0)
    layers = _layers("cuda:0", 1)
    if shared_storage:   # one allocation, layers as views of it (vLLM's newer allocator)
        flat = torch.stack(layers)
        layers = list(flat.unbind(0))
    t = TorchDistTransport(layers, KVLayout.from_tensors(layers, SHAPE[1]),
                           local_host="127.0.0.1", timeout_s=60, engine_name="prefill",
                           secret="s")
    offers = OfferTable()
    q.put(t.serve(offers))
    offers.add(Offer(1, "r1", [2, 7, 9], 3 * SHAPE[1], time.monotonic() + 600))
    offers.add(Offer(2, "r2", list(range(N_BLOCKS)), N_BLOCKS * SHAPE[1], time.monotonic() + 600))
    q.put([x.cpu() for x in layers])
    finished, deadline = set(), time.monotonic() + 120
    while finished != {"r1", "r2"} and time.monotonic() < deadline:
        finished |= offers.take_finished()
        time.sleep(0.01)
    q.put(sorted(finished))
    done.wait(120)
    t.close()


@pytest.mark.parametrize("shared_storage", [False, True])
def test_cuda_ipc_pull_copies_device_to_device(shared_storage):
    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import TorchDistTransport

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_producer, args=(q, done, shared_storage))
    p.start()
    try:
        host, port = q.get(timeout=120)
        src = q.get(timeout=120)
        dev = torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0)
        torch.cuda.set_device(dev)
        layers = [torch.zeros((N_BLOCKS, *SHAPE), dtype=torch.bfloat16, device=dev)
                  for _ in range(N_LAYERS)]
        t = TorchDistTransport(layers, KVLayout.from_tensors(layers, SHAPE[1]),
                               local_host="127.0.0.1", timeout_s=60, engine_name="decode",
                               secret="s")
        rec = t.pull(host, port, 1, 0, [0, 5, 11])
        assert rec.ok and rec.transport == "cuda_ipc"
        assert rec.bytes == 3 * N_LAYERS * SHAPE[0] * SHAPE[1] * SHAPE[2] * 2
        for got, want in zip(layers, src):
            assert torch.equal(got[[0, 5, 11]].cpu(), want[[2, 7, 9]])
        rec = t.pull(host, port, 2, 0, list(range(N_BLOCKS))[::-1])   # the whole cache
        assert rec.ok and rec.transport == "cuda_ipc"
        for got, want in zip(layers, src):
            assert torch.equal(got.cpu().flip(0), want)
        assert q.get(timeout=60) == ["r1", "r2"]   # prefill freed both once decode was done
        t.close()
    finally:
        done.set()
        p.join(60)
