"""Benchmarks (on the floor of the front doors): each prints a table and writes JSON and
plots under ``bench/results/``. ``e2e.py`` is ``preft bench`` (PreFT cluster vs vLLM
multi-LoRA vs the base model); the others measure KV transfer, TTFT, routing, the prefill
LoRA kernel, a soak run and the dashboard render. They start local clusters with the
program's launcher and assets (:mod:`app`), the one import allowed to go up a floor.
"""
