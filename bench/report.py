"""Shared output of the benchmarks: a rich table on stdout and a JSON file with every figure."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def report(title: str, rows: list[dict], out: str | Path, **extra) -> Path:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title)
    for k in rows[0]:
        table.add_column(k)
    for r in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))
    console.print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": title, "machine": platform.platform(),
                                "cpus": os.cpu_count(), **extra, "rows": rows}, indent=2))
    console.print(f"wrote {path}")
    return path
