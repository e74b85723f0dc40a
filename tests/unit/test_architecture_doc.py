"""docs/architecture.md stays true to the tree: the files of its Generate walk exist, and its
floors table places exactly the packages the import-boundary test places."""

from __future__ import annotations

import re
from pathlib import Path

from test_import_boundaries import FLOORS

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _section(title: str) -> str:
    return DOC.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_generate_walk_names_existing_files_in_order():
    rows = re.findall(r"^\| (\d+) \| `([^`]+)` \| (.+) \|$", _section("One Generate, file by file"),
                      re.M)
    assert [int(n) for n, _, _ in rows] == list(range(1, len(rows) + 1))
    assert 10 <= len(rows) <= 14, len(rows)
    for _, path, job in rows:
        assert (ROOT / path).is_file(), f"the walk names {path}, which does not exist"
        assert len(job) > 20, f"{path}: say its job"


def test_the_floors_table_matches_the_boundary_test():
    table = _section("Floors")
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| floor")]
    assert len(rows) == len(FLOORS)
    for row, (_, packages) in zip(rows, reversed(FLOORS)):
        named = {p.split("/")[-1] for p in re.findall(r"`([a-z_/]+)/`", row.split(" | ")[1])}
        assert named == set(packages), (row, sorted(packages))


def test_every_file_the_doc_names_exists():
    """A moved or deleted module leaves no stale name behind (``kv_transfer/runtime.py``
    stayed in the walk's prose after the KV endpoint replaced it)."""
    named = set(re.findall(r"`([\w./-]+\.(?:py|md|yaml|proto|json|sh))`", DOC))
    # paths from the repository root (names relative to a package, like `assets.py`, aside)
    rooted = {p for p in named if (ROOT / p.split("/")[0]).is_dir() and "/" in p}
    assert len(rooted) > 20, sorted(rooted)
    missing = sorted(p for p in rooted if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
