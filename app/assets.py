"""The assets the program serves when given none, all built on this machine (nothing
downloaded): the embedded demo (a small character-level base model and the adapters alice,
bob and carol, trained by :mod:`trainer.demo`) and the random-weight tiny model with three
random LoRA-P adapters (:mod:`app.tiny`) the benchmarks use. They live under
``$PREFT_HOME`` (default ``~/.cache/preft``) and are reused once built.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path(os.environ.get("PREFT_HOME", Path.home() / ".cache" / "preft"))
DEMO_ADAPTERS = ("alice", "bob", "carol")


def default_assets(home: Path | None = None) -> tuple[Path, dict[str, Path]]:
    """The embedded default: a small base model and the adapters alice, bob and carol, all
    trained here with ``preft train`` (trainer/demo.py; ~3-4 min the first time, with a
    progress bar, then reused from $PREFT_HOME/demo)."""
    model, adapters, _ = demo_assets(home)
    return model, adapters


def demo_assets(home: Path | None = None):
    """(model dir, {name: adapter dir}, demo.json record) of the trained embedded demo."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from trainer.demo import build

    home = Path(home) if home is not None else DEFAULT_HOME
    marker = home / "demo" / "demo.json"
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
                  disable=marker.exists()) as bar:
        task = bar.add_task("training the demo model and adapters (first run only)", total=None)

        lines = None if bar.console.is_terminal else progress_lines("training the demo")

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=f"training the demo: {what}", completed=done,
                       total=total)
            if lines is not None:   # no terminal, no bar drawn: a line now and then
                lines(what, done, total)

        return build(home, progress)


def progress_lines(title: str, every_s: float = 10.0):
    """A ``progress(what, done, total)`` callback for output that is not a terminal (a log,
    a pipe): one line on stderr when ``what`` changes, every ``every_s`` seconds, and at the
    end, e.g. ``training the demo: base model 400/3400 (12%, 31 s)``."""
    import sys
    import time

    t0, last = time.monotonic(), {"at": -every_s, "what": None}

    def tick(what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if what == last["what"] and now - last["at"] < every_s and done < total:
            return
        last.update(at=now, what=what)
        pct = f"{done / total:.0%}, " if total else ""
        print(f"{title}: {what} {done}/{total} ({pct}{now - t0:.0f} s)", file=sys.stderr,
              flush=True)
    return tick


def tiny_assets(home: Path | None = None) -> tuple[Path, dict[str, Path]]:
    """Random-weight tiny model (BPE tokenizer, 4k context) and three random LoRA-P adapters:
    built in seconds, for benchmarks that need long prompts rather than meaningful text."""
    from app.tiny import make_lora_adapter, make_tiny_model

    home = Path(home) if home is not None else DEFAULT_HOME
    model = make_tiny_model(home / "tiny-llama")
    adapters = {}
    for i, name in enumerate(DEMO_ADAPTERS):
        path = home / "adapters" / name
        if not (path / "adapter_model.safetensors").exists():
            make_lora_adapter(path, model, seed=100 + i)
        adapters[name] = path
    return model, adapters
