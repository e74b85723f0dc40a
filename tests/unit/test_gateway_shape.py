"""The HTTP gateway is a client of the router built on the SDK (design rule 11), and both
stay readable: no function over 60 lines in ``http_gateway/`` or ``client/preft_client/``;
the gateway imports neither torch, vLLM nor the router's gRPC code, only the SDK's public
surface."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "http_gateway", ROOT / "client" / "preft_client")
MAX_LINES = 60
# Nothing of the router's process and nothing heavy: the SDK is the gateway's way in.
FORBIDDEN = {"torch", "vllm", "transformers", "grpc", "grpc_health", "proto", "cluster",
             "prefill_worker", "decode_worker", "colocated_worker", "worker_runtime",
             "kv_transfer", "trainer", "bench"}
# The one module of the router package the gateway may read: the process's Prometheus
# registry, served on /metrics when the gateway runs in the router's process.
ROUTER_ALLOWED = {"router.metrics"}


def _files(pkg: Path) -> list[Path]:
    files = sorted(pkg.rglob("*.py"))
    assert files, pkg
    return files


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_no_function_is_longer_than_60_lines(pkg):
    too_long = [f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({n} lines)"
                for path in _files(pkg) for fn in _functions(path)
                if (n := fn.end_lineno - fn.lineno + 1) > MAX_LINES]
    assert not too_long, too_long


def _imports(path: Path):
    """(module, names) of every import, lazy ones inside functions included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module, tuple(a.name for a in node.names)


def test_gateway_imports_only_the_sdks_public_surface():
    import preft_client

    bad = []
    for path in _files(ROOT / "http_gateway"):
        for module, names in _imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}: {module}"
            if top in FORBIDDEN:
                bad.append(where)
            elif top == "router" and module not in ROUTER_ALLOWED:
                bad.append(where)
            elif top == "preft_client" and (module != "preft_client"
                                            or set(names) - set(preft_client.__all__)):
                bad.append(f"{where} {names} (only `from preft_client import <public name>`)")
    assert not bad, bad


def test_importing_the_gateway_loads_no_engine_and_no_router():
    code = "import sys, http_gateway; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    mods = set(out.stdout.split())
    assert not {"torch", "vllm", "transformers"} & mods
    assert not {m for m in mods if m.startswith("router")}, "the gateway loaded the router"


def test_router_package_has_no_gateway_left():
    assert not (ROOT / "router" / "http_gateway.py").exists()
