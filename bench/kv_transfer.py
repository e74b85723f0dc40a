"""KV-transfer microbenchmark: GB/s vs transfer size over both paths of our transport,
side by side in one run: the same-host shared-memory segment (``shm``) and the pair's
torch.distributed group (``gloo``: what pairs across hosts use), next to a same-process
copy of the same blocks (gather + scatter, no second process) and one thread's memcpy of
the same bytes (one contiguous ``copy_``: the floor any copy can reach on this machine).

Two processes play prefill and decode engines with a KV layout shaped like a real model
(default: Qwen2.5-0.5B — 24 layers, 2 KV heads, head size 64, block 128, float32); the
decode side pulls N blocks through ``TorchDistTransport`` exactly as the connector does,
once with shared memory offered and once without.

    .venv/bin/python -m bench.kv_transfer --blocks 1,4,16,64 --repeats 5

``--device cuda`` (a GPU machine) puts both caches on the GPU: the same-host path is then
CUDA IPC (``cuda_ipc``: decode copies straight out of the prefill cache), the same-process
copy and the floor run on the device (``memcpy``: one device-to-device ``copy_``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

from tqdm import tqdm

from bench.report import report

LAYOUTS = {
    "qwen2.5-0.5b": dict(layers=24, kv_heads=2, head=64),
    "llama-3.2-1b": dict(layers=16, kv_heads=8, head=64),
    "llama-3.1-8b": dict(layers=32, kv_heads=8, head=128),
    "tiny": dict(layers=4, kv_heads=2, head=32),
}


def _layers(spec, num_blocks, block, dtype, device="cpu"):
    import torch

    shape = (num_blocks, spec["kv_heads"], block, 2 * spec["head"])
    return [torch.randn(shape).to(getattr(torch, dtype)).to(device)
            for _ in range(spec["layers"])]


def _sync(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def _producer(spec, num_blocks, block, dtype, plan, q_addr, done, device="cpu"):
    import torch  # noqa: F401

    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import Offer, OfferTable, TorchDistTransport

    layers = _layers(spec, num_blocks, block, dtype, device)
    layout = KVLayout.from_tensors(layers, block)
    t = TorchDistTransport(layers, layout, local_host="127.0.0.1", timeout_s=60, engine_name="p",
                          secret="bench-kv")
    offers = OfferTable()
    q_addr.put(t.serve(offers))
    for tid, n in plan:
        offers.add(Offer(tid, f"r{tid}", list(range(n)), n * block, time.monotonic() + 3600))
    done.wait()
    t.close()


def _consumer(spec, cap, args, path: str):
    from kv_transfer.layout import KVLayout
    from kv_transfer.transport import TorchDistTransport

    dst = _layers(spec, cap, args.block_size, args.dtype, args.device)
    layout = KVLayout.from_tensors(dst, args.block_size)
    return TorchDistTransport(dst, layout, local_host="127.0.0.1", timeout_s=60,
                              engine_name=f"d-{path}", secret="bench-kv",
                              shared_memory=path in ("shm", "cuda_ipc")), dst, layout


def _same_process_copy(src, dst, n, cap) -> float:
    import torch

    device = str(src[0].device)
    _sync(device)
    t0 = time.perf_counter()
    idx_s = torch.arange(n, device=src[0].device)
    idx_d = torch.arange(cap - n, cap, device=src[0].device)
    for s, d in zip(src, dst):
        d.index_copy_(0, idx_d, s.index_select(0, idx_s))
    _sync(device)
    return time.perf_counter() - t0


def _memcpy(nbytes: int, repeats: int, device: str = "cpu") -> float:
    """One contiguous copy of ``nbytes`` (median seconds, buffers pre-touched): one CPU
    thread's, or on a GPU one device-to-device copy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.ones(nbytes, dtype=torch.uint8, device=device)
    b = torch.zeros_like(a)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="qwen2.5-0.5b", choices=sorted(LAYOUTS))
    ap.add_argument("--blocks", default="1,4,16,64", help="transfer sizes in blocks")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where both caches live (cuda: the same-host path is CUDA IPC)")
    ap.add_argument("--out", default="bench/results/kv_transfer.json")
    args = ap.parse_args(argv)

    spec = LAYOUTS[args.layout]
    sizes = [int(x) for x in args.blocks.split(",")]
    cap = max(sizes) * 2 + 1
    # One GPU cannot pair with itself over NCCL: on cuda the network path is left out.
    paths = ("shm", "gloo") if args.device == "cpu" else ("cuda_ipc",)
    plan = [(1 + i, n) for i, n in enumerate(
        n for n in sizes for _ in paths for _ in range(args.repeats + 1))]  # +1: warm-up
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_producer, args=(spec, cap, args.block_size, args.dtype, plan,
                                               q, done, args.device))
    proc.start()
    host, port = q.get(timeout=120)
    cons = {p: _consumer(spec, cap, args, p) for p in paths}
    src = _layers(spec, cap, args.block_size, args.dtype, args.device)
    rows, it = [], iter(plan)
    for n in tqdm(sizes, desc="transfer sizes", unit="size"):
        secs = {p: [] for p in (*paths, "copy")}
        for p in paths:
            t, dst, layout = cons[p]
            for r in range(args.repeats + 1):
                rec = t.pull(host, port, next(it)[0], 0, list(range(cap - n, cap)))
                assert rec.transport == p, (rec.transport, p)
                if r:  # skip warm-up (pair formation, first touch)
                    secs[p].append(rec.seconds)
                    secs["copy"].append(_same_process_copy(src, dst, n, cap))
        rows.append(_row(n, layout.bytes_per_block, secs, _memcpy(
            n * layout.bytes_per_block, args.repeats, args.device), paths))
    done.set()
    for t, _, _ in cons.values():
        t.close()
    proc.join(30)
    report(f"KV transfer, {args.layout} layout, {args.dtype}, block {args.block_size} "
           f"(medians of {args.repeats})", rows, args.out, config=vars(args), layout=spec,
           transport=("shm (same host) and torch_dist (gloo on CPU), one run"
                      if args.device == "cpu" else "cuda_ipc (same host, GPU caches)"),
           device=args.device)
    return 0


def _row(n: int, bytes_per_block: int, secs: dict, memcpy_s: float,
         paths=("shm", "gloo")) -> dict:
    nbytes = n * bytes_per_block
    med = {k: statistics.median(v) for k, v in secs.items()}
    gbs = {k: nbytes / v / 1e9 for k, v in med.items()}
    row = {"blocks": n, "bytes": nbytes}
    for p in paths:
        row |= {f"{p}_ms": med[p] * 1e3, f"{p}_gb_s": gbs[p]}
    row |= {"copy_gb_s": gbs["copy"], "memcpy_gb_s": nbytes / memcpy_s / 1e9,
            f"{paths[0]}_vs_memcpy": memcpy_s / med[paths[0]]}
    if len(paths) > 1:
        row[f"{paths[0]}_vs_{paths[1]}"] = med[paths[1]] / med[paths[0]]
    return row


if __name__ == "__main__":
    raise SystemExit(main())
