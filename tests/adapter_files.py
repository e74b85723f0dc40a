"""Test helpers that edit an adapter directory in place (to make it invalid in one way)."""

from __future__ import annotations

import json


def edit_tensors(path, fn) -> None:
    """Apply ``fn`` to the dict of tensors in ``adapter_model.safetensors`` and write it back."""
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


def edit_config(path, **kv) -> None:
    """Update ``adapter_config.json`` with ``kv``."""
    f = path / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(kv)
    f.write_text(json.dumps(cfg))
