"""Run lm-evaluation-harness against an OpenAI-compatible /v1/completions server, offline.

Evaluates the two local tasks in ``bench/evalkit/tasks`` (``preft_mc``: multiple choice by
loglikelihood, ``preft_gen``: short greedy generation by exact match) through lm_eval's
``local-completions`` model, one request at a time, with the tokenizer read from a local model
directory. Writes one JSON file: each task's metrics, the lm_eval version, the settings, and a
per-item digest (the loglikelihoods and generated strings) so that two servers can be compared
item by item, not only by their accuracies.

    python -m bench.evalkit.run --base-url http://127.0.0.1:8011/v1/completions \
        --model tiny --tokenizer /tmp/lmeval_model --out results.json [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = ("preft_mc", "preft_gen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True,
                   help="full completions URL, e.g. http://127.0.0.1:8011/v1/completions")
    p.add_argument("--model", required=True, help="model name sent in each request body")
    p.add_argument("--tokenizer", required=True, help="local model dir holding the tokenizer")
    p.add_argument("--out", required=True, help="where to write the results JSON")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    p.add_argument("--max-length", type=int, default=1024,
                   help="context window lm_eval truncates to (the server's max-model-len)")
    p.add_argument("--string-prompts", action="store_true",
                   help="send prompts as strings (tokenized_requests=False), not token ids")
    return p.parse_args(argv)


def go_offline() -> None:
    """Make sure neither datasets nor transformers try the model hub."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_args(args: argparse.Namespace) -> dict:
    """Arguments for lm_eval's ``local-completions`` model (api_models.TemplateAPI)."""
    return {
        "model": args.model,
        "base_url": args.base_url,
        "tokenizer": args.tokenizer,
        "tokenizer_backend": "huggingface",
        "tokenized_requests": not args.string_prompts,
        "num_concurrent": 1,
        "max_retries": 3,
        "max_length": args.max_length,
        "timeout": 120,
    }


def evaluate(args: argparse.Namespace) -> dict:
    """Run lm_eval.simple_evaluate on the local tasks; returns its raw result dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args(args),
        tasks=args.tasks.split(","), task_manager=manager, limit=args.limit,
        batch_size=1, log_samples=True, bootstrap_iters=0, random_seed=0,
        numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)


def _clean(value):
    """JSON-safe copy of lm_eval metric values (numpy scalars, 'N/A' stderrs)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def digest(samples: list[dict]) -> list[dict]:
    """Per-item record: the doc id, the model's (filtered) responses and the item's metrics."""
    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        row = {"doc_id": s["doc_id"], "target": s.get("target"),
               "resps": _clean(s.get("filtered_resps"))}
        row.update({k: _clean(s[k]) for k in ("acc", "acc_norm", "exact_match") if k in s})
        rows.append(row)
    return rows


def summarize(raw: dict, args: argparse.Namespace, seconds: float) -> dict:
    """The JSON this tool writes: metrics per task plus enough context to compare runs."""
    import lm_eval

    metrics = {task: {k: _clean(v) for k, v in vals.items() if k != "alias"}
               for task, vals in raw["results"].items()}
    return {
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "base_url": args.base_url, "model": args.model, "tokenizer": args.tokenizer,
        "limit": args.limit, "tokenized_requests": not args.string_prompts,
        "wall_seconds": round(seconds, 2),
        "n_samples": {t: raw["n-samples"][t]["effective"] for t in raw.get("n-samples", {})},
        "metrics": metrics,
        "samples": {t: digest(rows) for t, rows in raw.get("samples", {}).items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    go_offline()
    start = time.perf_counter()
    raw = evaluate(args)
    report = summarize(raw, args, time.perf_counter() - start)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for task, vals in report["metrics"].items():
        shown = {k: v for k, v in vals.items() if "stderr" not in k}
        print(f"{task}: {shown}")
    print(f"wrote {args.out} ({report['wall_seconds']} s, lm_eval {report['lm_eval_version']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
