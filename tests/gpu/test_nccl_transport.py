"""The same KV transport code path on GPUs: NCCL pair groups between two devices.

Skipped without CUDA (and without two GPUs: NCCL does not pair a device with itself).
Run on a GPU machine: ``bash scripts/test.sh tests/gpu``.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

pytestmark = pytest.mark.gpu

SHAPE = (8, 128, 256)   # kv_heads, block_size, 2*head_size (Llama-3.1-8B-like)


def _layers(device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((16, *SHAPE), generator=g).to(device) for _ in range(4)]


def _producer(q, done):
    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import Offer, OfferTable, TorchDistTransport

    torch.cuda.set_device(0)
    layers = _layers("cuda:0", 1)
    t = TorchDistTransport(layers, KVLayout.from_tensors(layers, SHAPE[1]), local_host="127.0.0.1",
                           timeout_s=60, engine_name="prefill", secret="s")
    offers = OfferTable()
    q.put(t.serve(offers))
    offers.add(Offer(1, "r1", [2, 7, 9], 3 * SHAPE[1], time.monotonic() + 600))
    q.put([x[[2, 7, 9]].cpu() for x in layers])
    done.wait(120)
    t.close()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_nccl_pull_between_two_gpus():
    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import TorchDistTransport

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_producer, args=(q, done))
    p.start()
    host, port = q.get(timeout=120)
    expected = q.get(timeout=120)
    torch.cuda.set_device(1)
    layers = [torch.zeros((16, *SHAPE), device="cuda:1") for _ in range(4)]
    t = TorchDistTransport(layers, KVLayout.from_tensors(layers, SHAPE[1]), local_host="127.0.0.1",
                           timeout_s=60, engine_name="decode", secret="s")
    rec = t.pull(host, port, 1, 0, [0, 5, 11])
    done.set()
    p.join(60)
    assert rec.ok and rec.bytes == 3 * 4 * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
    for got, want in zip(layers, expected):
        assert torch.equal(got[[0, 5, 11]].cpu(), want)
    t.close()
