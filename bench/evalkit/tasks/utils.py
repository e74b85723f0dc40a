"""Dataset loader for the local PreFT eval tasks: JSONL files next to this module.

``datasets.load_dataset("json", data_files=...)`` resolves relative paths against the
current directory; the task YAMLs name their files relative to this folder and hand them to
:func:`load_local` (the task's ``custom_dataset``), which makes them absolute first, so the
tasks run from any cwd and never touch the network.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _resolve(files):
    if isinstance(files, dict):
        return {split: _resolve(f) for split, f in files.items()}
    if isinstance(files, (list, tuple)):
        return [_resolve(f) for f in files]
    path = Path(files)
    return str(path if path.is_absolute() else HERE / path)


def load_local(data_files=None, **_metadata):
    """Load the task's JSONL split(s) from this folder (extra metadata kwargs are ignored)."""
    import datasets

    return datasets.load_dataset("json", data_files=_resolve(data_files))
