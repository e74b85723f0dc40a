"""Every code block of README.md and docs/*.md is classified for the docs-examples test
(tests/docs_blocks.py): a language, and for bash/python blocks a mode (run, servers, parse,
or skip with a reason), so no example escapes tests/integration/test_docs_examples.py."""

from __future__ import annotations

import pytest

from docs_blocks import all_blocks, blocks, commands

PROGRAMS = ("preft ", ".venv/bin/preft ", "python -m ", "python3 -m ", ".venv/bin/python -m ",
            "flock ", "bash ", "for ", "done", "wait")


def test_every_block_is_classified():
    bs = all_blocks()
    assert len(bs) >= 25
    runnable = [b for b in bs if b.lang in ("bash", "python")]
    assert all(b.mode in ("run", "servers", "parse", "skip") for b in runnable)
    assert sum(b.mode == "run" for b in bs) >= 7          # the examples that can run, run
    assert sum(b.mode == "servers" for b in bs) >= 1      # against a started cluster


def test_skips_give_reasons_and_are_few():
    skips = [b for b in all_blocks() if b.mode == "skip"]
    assert all(len(b.reason) > 10 for b in skips), skips
    assert len(skips) <= 5, [b.where for b in skips]


def test_parse_blocks_run_programs_with_parsers():
    for b in (b for b in all_blocks() if b.mode == "parse"):
        for c in commands(b.code):
            assert c.startswith(PROGRAMS), f"{b.where}: parse mode cannot check `{c}`"


def test_markers_are_checked(tmp_path):
    f = tmp_path / "x.md"
    f.write_text("<!-- docs-test: skip -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        blocks_of(f)
    f.write_text("```sh\nls\n```\n")
    with pytest.raises(ValueError, match="language 'sh'"):
        blocks_of(f)
    f.write_text("<!-- docs-test: parse -->\n```bash\npreft up \\\n  --port 1  # c\n```\n")
    (b,) = blocks_of(f)
    assert b.mode == "parse" and commands(b.code) == ["preft up --port 1  # c"]


def blocks_of(path):
    import docs_blocks

    root = docs_blocks.ROOT
    try:
        docs_blocks.ROOT = path.parent
        return blocks(path)
    finally:
        docs_blocks.ROOT = root
