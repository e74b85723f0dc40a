#!/usr/bin/env bash
# The CPU benchmark runs recorded in docs/benchmarks.md. Each `preft bench` runs every
# system on this machine one after the other (same seeded workload). ~35 minutes on
# 2 cores (runs 8 and 9: ~45 more). Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/preft
Q="--model qwen2.5-0.5b --prompt-len 128"
# 1. The issue-7 workload: Qwen2.5-0.5B shape, 64 requests x 128 prompt x 64 output,
#    64 distinct rank-8 q/k/v/o adapters, all four systems.
$P bench $Q --adapters 64 --num-requests 64 --output-len 64 \
  --out-dir bench/results/e2e/qwen-64x128x64
# 2. The same PreFT cluster with 512-token prefill steps (shorter pipeline bubble).
$P bench $Q --systems preft --adapters 64 --num-requests 64 --output-len 64 \
  --preft-prefill-tokens 512 --out-dir bench/results/e2e/qwen-64x128x64-prefill512
# 3. ReFT-P (DiReFT, rank 8, 4 layers) served by the PreFT cluster, same workload.
$P bench $Q --preft-kind reft_p --systems preft --adapters 64 --num-requests 64 \
  --output-len 64 --out-dir bench/results/e2e/qwen-64x128x64
# 4. Adapter-count sweep, smaller workload (32 x 128 x 32), N = 1, 8, 64, 512.
$P bench $Q --adapters 1,8,64,512 --num-requests 32 --output-len 32 \
  --out-dir bench/results/e2e/qwen-sweep
# 5. Llama-3.2-1B shape, 32 x 128 x 32, N = 64.
$P bench --model llama-3.2-1b --systems preft,multi_lora,base --adapters 64 \
  --num-requests 32 --prompt-len 128 --output-len 32 --out-dir bench/results/e2e/llama-32x128x32
# 6. The sweep's PreFT side again with 512-token prefill steps.
$P bench $Q --systems preft --adapters 1,8,64,512 --num-requests 32 --output-len 32 \
  --preft-prefill-tokens 512 --out-dir bench/results/e2e/qwen-sweep-prefill512
# 7. Llama PreFT again after the offer-publication fix (the first run lost 2/32 requests).
$P bench --model llama-3.2-1b --systems preft --adapters 64 --num-requests 32 \
  --prompt-len 128 --output-len 32 --out-dir bench/results/e2e/llama-32x128x32-fix
# 8. Colocated workers (issue 13) beside the P/D cluster and vLLM multi-LoRA (grouped and
#    stock kernels) and base, one invocation: 64 x 128 x 64, N = 1, 8, 64.
$P bench $Q --output-len 64 --num-requests 64 --adapters 1,8,64 \
  --systems preft_colocated,preft,multi_lora_grouped,multi_lora,base \
  --out-dir bench/results/e2e/colocated-64x128x64
# 9. Poisson arrivals (1 req/s): the mixed cluster (1 colocated + 1 prefill + 1 decode)
#    records where the router sent each request, beside each single-shape cluster.
$P bench $Q --output-len 64 --num-requests 64 --rate 1.0 --adapters 64 \
  --systems preft_mixed,preft_colocated,preft,base --out-dir bench/results/e2e/mixed-poisson-64x128x64
# 10. The P/D cluster with split vs shared cores (issue 15), burst and Poisson (1 req/s).
$P bench $Q --output-len 64 --num-requests 64 --adapters 64 \
  --systems preft,preft_shared,multi_lora,base --out-dir bench/results/e2e/pd-cores-64x128x64
$P bench $Q --output-len 64 --num-requests 64 --adapters 64 --rate 1.0 \
  --systems preft,preft_shared,multi_lora,base --out-dir bench/results/e2e/pd-cores-poisson-64x128x64
# 11. Same-host (shared memory) vs gloo KV transfer, and the router's hop breakdown.
.venv/bin/python -m bench.kv_transfer --blocks 1,4,16,64 --repeats 10
.venv/bin/python -m bench.routing --requests 300
.venv/bin/python -m bench.routing --requests 300 --adapters 64 --out bench/results/routing_64.json
# 12. KV staged and loaded layer by layer vs held (issue 15): through the cluster, and end
#     to end beside stock multi-LoRA and base (same shape and workload as run 10).
.venv/bin/python -m bench.ttft --model qwen2.5-0.5b --lengths 512,2048 --repeats 5
$P bench $Q --output-len 64 --num-requests 64 --adapters 64 \
  --systems preft_held,preft_shared,multi_lora,base --out-dir bench/results/e2e/pd-layerwise-64x128x64
