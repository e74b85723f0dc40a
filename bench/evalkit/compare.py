"""Compare two ``bench.evalkit.run`` result files (e.g. vLLM's own server vs the gateway).

Prints each task's metrics side by side and, item by item, the largest absolute difference
in the choice loglikelihoods (multiple choice) and the generated strings that differ
(generation). Exits 1 when any metric differs or a loglikelihood differs by more than --atol.

    python -m bench.evalkit.compare vllm.json gateway.json [--atol 1e-3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def loglik_gap(rows_a: list[dict], rows_b: list[dict]) -> float:
    """Largest |loglikelihood difference| over all items and choices (inf if shapes differ)."""
    gap = 0.0
    for a, b in zip(rows_a, rows_b):
        if a["doc_id"] != b["doc_id"] or len(a["resps"]) != len(b["resps"]):
            return float("inf")
        for (la, _), (lb, _) in zip(a["resps"], b["resps"]):
            gap = max(gap, abs(la - lb))
    return gap if len(rows_a) == len(rows_b) else float("inf")


def text_diffs(rows_a: list[dict], rows_b: list[dict]) -> list[tuple[int, str, str]]:
    """(doc_id, text_a, text_b) for every generated string that differs."""
    return [(a["doc_id"], a["resps"][0], b["resps"][0])
            for a, b in zip(rows_a, rows_b) if a["resps"] != b["resps"]]


def compare(a: dict, b: dict, atol: float) -> bool:
    """Print the comparison; True when the two runs agree."""
    ok = True
    for task in sorted(set(a["metrics"]) | set(b["metrics"])):
        ma, mb = a["metrics"].get(task, {}), b["metrics"].get(task, {})
        keys = [k for k in sorted(set(ma) | set(mb)) if "," in k and "stderr" not in k]
        for key in keys:
            same = ma.get(key) == mb.get(key)
            ok &= same
            print(f"{task:10s} {key:18s} {ma.get(key)!s:>10} {mb.get(key)!s:>10}"
                  f"  {'' if same else 'DIFFERS'}")
        rows_a, rows_b = a["samples"].get(task, []), b["samples"].get(task, [])
        if rows_a and isinstance(rows_a[0]["resps"][0], list):
            gap = loglik_gap(rows_a, rows_b)
            ok &= gap <= atol
            print(f"{task:10s} max |loglik diff| {gap:.3g} (atol {atol:g})")
        elif rows_a:
            diffs = text_diffs(rows_a, rows_b)
            ok &= not diffs and len(rows_a) == len(rows_b)
            print(f"{task:10s} generations differing: {len(diffs)}/{len(rows_a)}")
            for doc_id, ta, tb in diffs[:5]:
                print(f"    doc {doc_id}: {ta!r} vs {tb!r}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=float, default=1e-3,
                   help="allowed |loglikelihood| difference per choice")
    args = p.parse_args(argv)
    a, b = (json.loads(Path(x).read_text()) for x in (args.a, args.b))
    ok = compare(a, b, args.atol)
    print("AGREE" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
