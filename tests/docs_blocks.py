"""The code blocks of README.md and docs/*.md, and how the docs-examples test runs each.

Every fenced block has a language. ``bash`` and ``python`` blocks are examples a reader
types; each runs in tests/integration/test_docs_examples.py unless the HTML comment on the
line before it says otherwise:

* (no comment): **run** as written, in document order, against the servers started so far;
  the block must exit 0.
* ``<!-- docs-test: servers -->``: each command starts a long-running server (``preft up``,
  ``python -m http_gateway``); the test starts it as written, waits until every port its
  command names accepts connections, and keeps it running for the blocks after it.
* ``<!-- docs-test: parse -->``: too long to run in the suite (benchmark and study runs,
  clusters of their own): every command is run with its program's argument parser only, so a
  flag or value the program no longer accepts fails the test.
* ``<!-- docs-test: skip: REASON -->``: not run, for the REASON given (hardware or services
  this machine lacks); the reason is required.

Other languages (``text`` for diagrams and sample output, ``yaml`` fragments) are not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = {"bash", "python"}
LANGUAGES = RUNNABLE | {"text", "yaml"}
MODES = {"run", "servers", "parse", "skip"}
_MARK = re.compile(r"<!--\s*docs-test:\s*(\w+)(?::\s*(.*?))?\s*-->")


@dataclass(frozen=True)
class Block:
    file: str        # relative to the repository root
    line: int        # of the opening fence, 1-based
    lang: str
    mode: str        # run | servers | parse | skip | text (not a runnable language)
    reason: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _mode(lang: str, prev: str, where: str) -> tuple[str, str]:
    m = _MARK.search(prev)
    if m is None:
        return ("run" if lang in RUNNABLE else "text"), ""
    mode, reason = m.group(1), (m.group(2) or "").strip()
    if lang not in RUNNABLE or mode not in MODES:
        raise ValueError(f"{where}: docs-test marker {mode!r} on a {lang!r} block")
    if mode == "skip" and not reason:
        raise ValueError(f"{where}: docs-test skip needs a reason")
    return mode, reason


def blocks(path: Path) -> list[Block]:
    """Every fenced block of one markdown file, with its mode."""
    lines = path.read_text().split("\n")
    out, i, rel = [], 0, str(path.relative_to(ROOT))
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang, start = lines[i][3:].strip(), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        where = f"{rel}:{start + 1}"
        if lang not in LANGUAGES:
            raise ValueError(f"{where}: code block language {lang!r} (one of {sorted(LANGUAGES)})")
        mode, reason = _mode(lang, prev, where)
        out.append(Block(rel, start + 1, lang, mode, reason, "\n".join(lines[start + 1:end])))
        i = end + 1
    return out


def all_blocks() -> list[Block]:
    return [b for f in doc_files() for b in blocks(f)]


def commands(code: str) -> list[str]:
    """The shell commands of a bash block: continuations joined, comment lines dropped."""
    out, cur = [], ""
    for line in code.split("\n"):
        if not cur and line.lstrip().startswith("#"):
            continue
        cur += line.strip() if cur else line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip() + " "
            continue
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out
