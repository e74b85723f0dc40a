"""Functions short enough to read at once: no function in product code is longer than 60
lines, from its ``def`` line to the last line of its body (docstring and comments count).

Product code is every package ``pyproject.toml`` installs except ``bench`` (the benchmarks
are scripts); ``tests/`` is not installed. Generated gRPC stubs count too: they are short.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 60
NOT_PRODUCT = {"bench"}


def _product_files() -> list[Path]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool.get("package-dir", {})
    tops = sorted({p.split(".")[0] for p in tool["packages"]} - NOT_PRODUCT)
    return [f for t in tops for f in sorted((ROOT / dirs.get(t, t)).rglob("*.py"))]


def function_lengths() -> list[tuple[int, str]]:
    """(lines, 'path:line name') of every def / async def, longest first."""
    out = []
    for f in _product_files():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1,
                            f"{f.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def test_no_product_function_is_longer_than_60_lines():
    lengths = function_lengths()
    assert len(lengths) > 300   # the walk found the project
    long = [f"{n} lines  {where}" for n, where in lengths if n > LIMIT]
    assert not long, f"functions over {LIMIT} lines (split them into steps):\n  " + "\n  ".join(long)
