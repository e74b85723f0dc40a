#!/usr/bin/env bash
# The GPU variant of `preft bench`, as one prepared command for a machine with >= 2 GPUs:
# vLLM GPU engines (pip `vllm`), KV over NCCL between the prefill and decode GPUs,
# Llama-3.1-8B architecture with random (dummy) weights, bf16, rank-8 q/k/v/o adapters,
# N = 1, 8, 64, 512, PreFT (GPUS/2 prefill + GPUS/2 decode workers) vs vLLM multi-LoRA
# and base with --data-parallel-size GPUS on the same GPUs, one system after the other.
#   bash bench/gpu_bench.sh            # GPUS defaults to the number of visible GPUs
# Writes bench/results/gpu/e2e_llama-3.1-8b_r8.json and PNGs. Not yet run by us: no GPU
# machine was available when it was written (docs/benchmarks.md says so).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
(( GPUS >= 2 )) || { echo "needs >= 2 GPUs (prefill and decode on different GPUs)" >&2; exit 2; }
bash scripts/setup.sh --gpu
.venv/bin/python -m pytest -q -m gpu tests/gpu            # NCCL pull between two GPUs
exec .venv/bin/preft bench --model llama-3.1-8b --dtype bfloat16 --gpus "$GPUS" \
  --systems preft,multi_lora,base --adapters 1,8,64,512 --rank 8 \
  --num-requests 1024 --prompt-len 256:1024 --output-len 128 --rate 16 \
  --popularity zipf --max-loras 64 --max-num-seqs 256 --out-dir bench/results/gpu "$@"
