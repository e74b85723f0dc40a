"""KV-transfer microbenchmark: GB/s vs transfer size over our torch.distributed transport,
next to a same-process copy of the same blocks (gather + scatter: the ceiling on one host).

Two processes play prefill and decode engines with a KV layout shaped like a real model
(default: Qwen2.5-0.5B — 24 layers, 2 KV heads, head size 64, block 128, float32), and the
decode side pulls N blocks through ``TorchDistTransport`` exactly as the connector does.

    .venv/bin/python -m bench.kv_transfer --blocks 1,4,16,64 --repeats 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from bench.report import report

LAYOUTS = {
    "qwen2.5-0.5b": dict(layers=24, kv_heads=2, head=64),
    "llama-3.2-1b": dict(layers=16, kv_heads=8, head=64),
    "tiny": dict(layers=4, kv_heads=2, head=32),
}


def _layers(spec, num_blocks, block, dtype):
    import torch

    shape = (num_blocks, spec["kv_heads"], block, 2 * spec["head"])
    return [torch.randn(shape).to(getattr(torch, dtype)) for _ in range(spec["layers"])]


def _producer(spec, num_blocks, block, dtype, plan, q_addr, done):
    import torch  # noqa: F401

    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import Offer, OfferTable, TorchDistTransport

    layers = _layers(spec, num_blocks, block, dtype)
    layout = KVLayout.from_tensors(layers, block)
    t = TorchDistTransport(layers, layout, local_host="127.0.0.1", timeout_s=60, engine_name="p")
    offers = OfferTable()
    q_addr.put(t.serve(offers))
    for tid, n in plan:
        offers.add(Offer(tid, f"r{tid}", list(range(n)), n * block, time.monotonic() + 3600))
    done.wait()
    t.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="qwen2.5-0.5b", choices=sorted(LAYOUTS))
    ap.add_argument("--blocks", default="1,4,16,64", help="transfer sizes in blocks")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/kv_transfer.json")
    args = ap.parse_args(argv)

    import torch

    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import TorchDistTransport

    spec = LAYOUTS[args.layout]
    sizes = [int(x) for x in args.blocks.split(",")]
    cap = max(sizes) * 2 + 1
    plan, tid = [], 1
    for n in sizes:
        for _ in range(args.repeats + 1):  # +1 warm-up
            plan.append((tid, n))
            tid += 1
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_producer, args=(spec, cap, args.block_size, args.dtype, plan, q, done))
    proc.start()
    host, port = q.get(timeout=120)
    dst = _layers(spec, cap, args.block_size, args.dtype)
    layout = KVLayout.from_tensors(dst, args.block_size)
    cons = TorchDistTransport(dst, layout, local_host="127.0.0.1", timeout_s=60, engine_name="d")
    src = _layers(spec, cap, args.block_size, args.dtype)
    rows = []
    it = iter(plan)
    for n in sizes:
        xfer, copy = [], []
        for r in range(args.repeats + 1):
            t_id, _ = next(it)
            rec = cons.pull(host, port, t_id, 0, list(range(cap - n, cap)))
            t0 = time.perf_counter()
            idx_s = torch.arange(n)
            idx_d = torch.arange(cap - n, cap)
            for s, d in zip(src, dst):
                d.index_copy_(0, idx_d, s.index_select(0, idx_s))
            c = time.perf_counter() - t0
            if r:  # skip warm-up (pair formation)
                xfer.append(rec.seconds)
                copy.append(c)
        nbytes = n * layout.bytes_per_block
        tx, cp = statistics.median(xfer), statistics.median(copy)
        rows.append({"blocks": n, "bytes": nbytes, "transfer_ms": tx * 1e3,
                     "transfer_gb_s": nbytes / tx / 1e9, "memcpy_ms": cp * 1e3,
                     "memcpy_gb_s": nbytes / cp / 1e9, "transfer_vs_memcpy": cp / tx})
    done.set()
    cons.close()
    proc.join(30)
    report(f"KV transfer, {args.layout} layout, {args.dtype}, block {args.block_size} "
           f"(medians of {args.repeats})", rows, args.out, config=vars(args), layout=spec,
           transport="torch_dist (gloo on CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
