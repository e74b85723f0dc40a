"""Benchmark documents match their data (issue 12, item 9).

Every table in the benchmark docs names the results file(s) it comes from (in the text
between the previous heading or table and the table, or in the table itself); each named
file exists under ``bench/results/``; and every number in the table's body is in one of
those files, directly or in a plain unit conversion (ms -> s, fraction -> %, bytes ->
KiB/MiB/GiB/MB), at the precision the table shows. Headline ratios must be in the
``ratios`` of one ``preft bench`` JSON (one invocation), and the README's first sentence
must name its results file and quote figures that are in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/benchmarks.md", "docs/grouped_lora.md")
RESULT_RE = re.compile(r"bench/results/[\w./-]+\.json")
NUMBER_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.]*\w)")
# unit conversions a table may apply to a JSON value
SCALES = (1, 1e-3, 1e3, 100, 1 / 1024, 1 / 2**20, 1 / 2**30, 1e-6)


def _tables(text: str) -> list[tuple[str, list[str]]]:
    """(context, table lines) for every markdown table: context is the text since the last
    heading or the end of the previous table."""
    out, ctx, rows = [], [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
            continue
        if rows:
            out.append(("\n".join(ctx), rows))
            ctx, rows = [], []
        ctx = [] if line.startswith("#") else ctx + [line]
    return out


def _cells(rows: list[str]) -> list[str]:
    body = [r for r in rows[2:]]            # rows[0]: header, rows[1]: |---|
    return [c for r in body for c in r.strip().strip("|").split("|")]


def _numbers(cell: str) -> list[str]:
    cell = re.sub(r"`[^`]*`", "", cell).replace("*", "")
    return NUMBER_RE.findall(cell)


def _json_values(x, out: list[float]) -> list[float]:
    if isinstance(x, dict):
        for k, v in x.items():
            if k != "samples":               # per-request samples: too many to match against
                _json_values(v, out)
    elif isinstance(x, list):
        for v in x:
            _json_values(v, out)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        out.append(float(x))
    return out


def _in(number: str, values: list[float]) -> bool:
    v = float(number)
    tol = 0.5 * 10 ** -(len(number.split(".")[1]) if "." in number else 0) + 1e-9
    return any(abs(x * s - v) <= tol for x in values for s in SCALES)


def _doc_tables():
    for doc in DOCS:
        for i, (ctx, rows) in enumerate(_tables((ROOT / doc).read_text())):
            yield pytest.param(ctx, rows, id=f"{doc}#{i + 1}:{rows[0][:40]}")


@pytest.mark.parametrize("ctx,rows", list(_doc_tables()))
def test_each_table_names_existing_results_and_quotes_them(ctx, rows):
    files = sorted(set(RESULT_RE.findall(ctx + "\n" + "\n".join(rows))))
    assert files, f"table {rows[0]!r} names no bench/results/*.json file"
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f"table {rows[0]!r} names missing results files {missing}"
    values: list[float] = []
    for f in files:
        _json_values(json.loads((ROOT / f).read_text()), values)
    wrong = [n for c in _cells(rows) for n in _numbers(c) if not _in(n, values)]
    assert not wrong, f"table {rows[0]!r}: {wrong} are not in {files}"


def test_benchmarks_doc_has_tables():
    assert len(_tables((ROOT / "docs/benchmarks.md").read_text())) >= 6


def test_every_results_path_in_the_docs_exists():
    for doc in (*DOCS, "README.md"):
        text = (ROOT / doc).read_text()
        for path in re.findall(r"bench/results/[\w./-]+\.(?:json|png)", text):
            assert (ROOT / path).is_file(), f"{doc} names {path}, which does not exist"


def _ratios_of(path: str) -> list[float]:
    res = json.loads((ROOT / path).read_text())
    return [v for r in res["ratios"] for k, v in r.items() if k.startswith("x_") and v]


def _quoted_ratios(text: str) -> list[str]:
    return re.findall(r"(\d+\.\d+)×", text.replace("*", ""))


def test_headline_ratios_come_from_one_invocation():
    text = (ROOT / "docs/benchmarks.md").read_text()
    paras = [p for p in text.split("\n\n") if p.startswith("Headline ratios")]
    assert paras, "docs/benchmarks.md has no 'Headline ratios' paragraph"
    for p in paras:
        files = set(RESULT_RE.findall(p))
        assert len(files) == 1, f"a headline names exactly one run's JSON, got {files}"
        quoted = _quoted_ratios(p)
        assert quoted
        ratios = _ratios_of(files.pop())
        assert all(_in(q, ratios) for q in quoted), (quoted, ratios)


def test_readme_first_sentence_states_what_was_measured():
    text = (ROOT / "README.md").read_text()
    first = text.split("\n\n")[1]           # the paragraph after the title
    sentence = first[:first.index("). ") + 1] if "). " in first else first
    files = RESULT_RE.findall(sentence)
    assert len(files) == 1, "the README's first sentence names its results file"
    quoted = _quoted_ratios(sentence)
    assert quoted, "the README's first sentence quotes measured ratios"
    ratios = _ratios_of(files[0])
    assert all(_in(q, ratios) for q in quoted), (quoted, ratios)
    assert "nearly the throughput" not in first


def test_docs_do_not_claim_identical_tokens():
    for doc in ("docs/benchmarks.md", "README.md"):
        assert "exactly the same tokens" not in (ROOT / doc).read_text(), doc
