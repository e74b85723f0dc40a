#!/usr/bin/env bash
# The CPU benchmark runs recorded in docs/benchmarks.md, in the order they were made.
# Each `preft bench` runs every system on this machine one after the other (same seeded
# workload); expect ~30-40 minutes on 2 cores. Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/preft
# 1. The issue-7 workload: Qwen2.5-0.5B shape, 64 requests x 128 prompt x 64 output,
#    64 distinct rank-8 q/k/v/o adapters, all four systems.
$P bench --model qwen2.5-0.5b --adapters 64 --num-requests 64 --prompt-len 128 \
  --output-len 64 --out-dir bench/results/e2e/qwen-64x128x64
# 2. Adapter-count sweep, smaller workload (32 x 128 x 32), N = 1, 8, 64, 512.
$P bench --model qwen2.5-0.5b --adapters 1,8,64,512 --num-requests 32 --prompt-len 128 \
  --output-len 32 --out-dir bench/results/e2e/qwen-sweep
# 3. Llama-3.2-1B shape, same small workload, N = 8, 64.
$P bench --model llama-3.2-1b --adapters 8,64 --num-requests 32 --prompt-len 128 \
  --output-len 32 --out-dir bench/results/e2e/llama-sweep
# 4. ReFT-P (DiReFT, rank 8, 4 layers) on the PreFT side vs the same multi-LoRA baseline.
$P bench --model qwen2.5-0.5b --preft-kind reft_p --systems preft --adapters 64 \
  --num-requests 64 --prompt-len 128 --output-len 64 --out-dir bench/results/e2e/qwen-64x128x64
