"""Markdown tables from ``preft bench`` JSON files (for docs/benchmarks.md).

    python -m bench.e2e_md bench/results/e2e/*/e2e_*.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    r = json.loads(open(path).read())
    c, w = r["config"], r["config"]["workload"]
    out = [f"**{c['model']}** ({c['dtype']}), rank {c['rank']} on {', '.join(c['targets'])}, "
           f"PreFT kind {c.get('preft_kind', 'lora_p')}; {w['num_requests']} requests x "
           f"{w['prompt_len'][1]} prompt x {w['output_len'][1]} output tokens, "
           f"{w['popularity']} adapters, all at t=0 — `{path}`", "",
           "| system | N | completed | output tok/s | req/s | TTFT p50 / p99 ms | "
           "TPOT p50 / p99 ms | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        if x.get("adapters", -1) < 0:
            out.append(f"| {x['system']} | - | failed to run: {x.get('failed_to_run')} |||||")
            continue
        out.append(f"| {x['system']} | {x['adapters']} | {x['completed']}/{x['completed'] + x['failed']} "
                   f"| {x['output_tok_s']:.2f} | {x['req_s']:.3f} | {x['ttft_p50_ms']:.0f} / "
                   f"{x['ttft_p99_ms']:.0f} | {x['tpot_p50_ms']:.0f} / {x['tpot_p99_ms']:.0f} | "
                   f"{x['wall_s']:.1f} |")
    if r.get("ratios"):
        out += ["", "| N | PreFT / multi-LoRA | PreFT / multi-LoRA (grouped kernel) | PreFT / base |",
                "|---:|---:|---:|---:|"]
        f = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        for x in r["ratios"]:
            out.append(f"| {x['adapters']} | {f(x['x_multi_lora'])} | "
                       f"{f(x['x_multi_lora_grouped'])} | {f(x['x_base'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
