"""Heavy imports stay in the worker packages; decode never imports adapter code."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("stmt", ["import router.server", "import preft_client",
                                  "import app.cli, app.launcher, cluster.config"])
def test_router_client_cli_import_neither_torch_nor_vllm(stmt):
    mods = _loaded_after(stmt)
    assert not {"torch", "vllm"} & mods


def test_decode_worker_never_imports_adapter_code():
    mods = _loaded_after("import decode_worker.worker, kv_transfer.connector, "
                         "worker_runtime.engine_loop")
    assert not any(m.startswith(("prefill_worker", "peft")) for m in mods)


def test_decode_request_has_no_adapter_field():
    from dataclasses import fields

    from cluster.messages import DecodeRequest

    assert not any("adapter" in f.name or "lora" in f.name for f in fields(DecodeRequest))


def test_router_adapter_kinds_match_the_prefill_registry():
    from cluster.messages import ADAPTER_KINDS
    from prefill_worker.adapters import KINDS

    assert set(ADAPTER_KINDS) == set(KINDS)
