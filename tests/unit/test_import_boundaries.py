"""The floors hold: every import of the project's modules, read from the source.

Each module of the packages ``pyproject.toml`` installs is parsed with ``ast``: module-level
imports and those inside functions alike, relative imports resolved. The floors, top to
bottom (docs/architecture.md, "Floors"):

    the program          app
    front doors, bench   router, http_gateway, preft_client, bench, trainer
    the pools            worker_runtime, prefill_worker, decode_worker, colocated_worker,
                         lora_kernel
    KV connector         kv_transfer
    the ground floor     cluster, proto

A module imports its own floor and those below, never one above (one named exception);
no circle among the modules; the router, the SDK and the HTTP gateway reach neither torch
nor vLLM through anything they import; the decode worker reaches no adapter code. Each
failure lists the offending imports as ``module:line -> module``. The checks at the end
import for real, in a fresh interpreter, as a second opinion.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FLOORS: tuple[tuple[str, frozenset[str]], ...] = (
    ("the ground floor", frozenset({"cluster", "proto"})),
    ("the KV connector and transport", frozenset({"kv_transfer"})),
    ("the pools", frozenset({"worker_runtime", "prefill_worker", "decode_worker",
                             "colocated_worker", "lora_kernel"})),
    ("the front doors and the benchmarks", frozenset({"router", "http_gateway", "preft_client",
                                                     "bench", "trainer"})),
    ("the program", frozenset({"app"})),
)
# (importer package, imported package) -> why it may go up a floor.
UPWARD_ALLOWED = {
    ("bench", "app"): "the benchmarks start local clusters with the program's launcher on "
                      "its locally built assets; the program reaches bench only for "
                      "`preft bench` (bench.e2e), and no module circle forms",
}
HEAVY = ("torch", "vllm")
LIGHT_PACKAGES = ("router", "preft_client", "http_gateway")   # no torch, no vLLM, ever
ADAPTER_CODE = ("prefill_worker", "colocated_worker", "lora_kernel", "peft")


@dataclass(frozen=True)
class Edge:
    src: str      # importing module
    line: int
    dst: str      # imported module (a project module, or an outside top-level name)

    def __str__(self) -> str:
        return f"{self.src}:{self.line} -> {self.dst}"


def _package_dirs() -> dict[str, Path]:
    """Top-level package -> directory, as pyproject.toml installs them."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool.get("package-dir", {})
    tops = {p.split(".")[0] for p in tool["packages"]}
    return {t: ROOT / dirs.get(t, t) for t in sorted(tops)}


@cache
def _modules() -> dict[str, Path]:
    out = {}
    for top, d in _package_dirs().items():
        for f in sorted(d.rglob("*.py")):
            parts = [top, *f.relative_to(d).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _imported_names(mod: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def _graph() -> tuple[dict[str, set[Edge]], dict[str, set[Edge]]]:
    """(project edges, outside edges) per module; outside edges name the top-level package."""
    modules = _modules()
    inner: dict[str, set[Edge]] = {m: set() for m in modules}
    outer: dict[str, set[Edge]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for line, name in _imported_names(mod, path):
            target = _resolve(name, modules)
            if target is None:
                outer[mod].add(Edge(mod, line, name.split(".")[0]))
            elif target != mod:
                inner[mod].add(Edge(mod, line, target))
    for edges in (inner, outer):   # one edge per (src, dst): the first line
        for mod, es in edges.items():
            first: dict[str, Edge] = {}
            for e in sorted(es, key=lambda e: e.line):
                first.setdefault(e.dst, e)
            edges[mod] = set(first.values())
    return inner, outer


def _floor(mod: str) -> int:
    top = mod.split(".")[0]
    return next(i for i, (_, pkgs) in enumerate(FLOORS) if top in pkgs)


def _reach(start: str) -> dict[str, Edge | None]:
    """Every project module ``start`` imports, directly or not: module -> the edge that
    first reached it (None for ``start``)."""
    inner, _ = _graph()
    seen: dict[str, Edge | None] = {start: None}
    todo = [start]
    while todo:
        for e in sorted(inner[todo.pop()], key=str):
            if e.dst not in seen:
                seen[e.dst] = e
                todo.append(e.dst)
    return seen


def _path_to(seen: dict[str, Edge | None], mod: str) -> list[str]:
    chain = []
    while (e := seen[mod]) is not None:
        chain.append(str(e))
        mod = e.src
    return chain[::-1]


def _report(title: str, lines) -> str:
    return f"{title}:\n  " + "\n  ".join(str(x) for x in lines)


# ----------------------------------------------------------------------------- the floors


def test_every_installed_package_has_one_floor():
    tops = set(_package_dirs())
    placed = [p for _, pkgs in FLOORS for p in pkgs]
    assert len(placed) == len(set(placed)), "a package on two floors"
    assert tops == set(placed), _report("packages without a floor / floors without a package",
                                        sorted(tops ^ set(placed)))
    assert len(_modules()) > 50   # the parser found the project


def test_the_ground_floor_imports_nothing_above_it():
    inner, _ = _graph()
    bad = [e for m, es in inner.items() if _floor(m) == 0 for e in es if _floor(e.dst) > 0]
    assert not bad, _report("cluster/ or proto/ importing the floors above", sorted(bad, key=str))


def test_the_sdk_imports_only_itself_and_proto():
    inner, _ = _graph()
    bad = [e for m, es in inner.items() if m.startswith("preft_client") for e in es
           if e.dst.split(".")[0] not in ("preft_client", "proto")]
    assert not bad, _report("the SDK importing the server side", sorted(bad, key=str))


def test_no_module_imports_a_floor_above_its_own():
    inner, _ = _graph()
    bad = [e for m, es in inner.items() for e in es if _floor(e.dst) > _floor(m)
           and (m.split(".")[0], e.dst.split(".")[0]) not in UPWARD_ALLOWED]
    assert not bad, _report("imports going up a floor", sorted(bad, key=str))


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph (lazy imports too)."""
    inner, _ = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for e in inner[v]:
            if e.dst not in index:
                visit(e.dst)
                low[v] = min(low[v], low[e.dst])
            elif e.dst in stack:
                low[v] = min(low[v], index[e.dst])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                cycles.append(sorted([v, *comp]))

    for v in sorted(inner):
        if v not in index:
            visit(v)
    edges = [e for c in cycles for m in c for e in sorted(inner[m], key=str) if e.dst in c]
    assert not cycles, _report(f"import circles {cycles}, through", edges)


# ----------------------------------------------------------------------------- heavy imports


@pytest.mark.parametrize("package", LIGHT_PACKAGES)
def test_router_sdk_and_gateway_reach_neither_torch_nor_vllm(package):
    _, outer = _graph()
    bad = []
    for mod in sorted(m for m in _modules() if m.split(".")[0] == package):
        seen = _reach(mod)
        for m in seen:
            for e in sorted(outer[m], key=str):
                if e.dst in HEAVY:
                    bad.append(" / ".join([*_path_to(seen, m), str(e)]))
    assert not bad, _report(f"{package} reaching torch or vLLM", sorted(set(bad)))


def test_decode_worker_reaches_no_adapter_code():
    _, outer = _graph()
    bad = []
    for mod in sorted(m for m in _modules() if m.startswith("decode_worker")):
        seen = _reach(mod)
        bad += [" / ".join(_path_to(seen, m)) for m in seen if m.startswith(ADAPTER_CODE)]
        bad += [" / ".join([*_path_to(seen, m), str(e)]) for m in seen
                for e in outer[m] if e.dst == "peft"]
    assert not bad, _report("decode_worker reaching adapter code", sorted(set(bad)))


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    """The checks above would pass vacuously if imports inside functions or relative ones
    were missed: a known lazy import and a synthetic relative one are found."""
    inner, _ = _graph()
    assert any(e.dst == "bench.e2e" for e in inner["app.cli"])          # inside cmd_bench
    f = tmp_path / "__init__.py"
    f.write_text("def f():\n    from .sib import x\n    from .. import y\n")
    assert _imported_names("pkg.sub", f) == [(2, "pkg.sub.sib"), (2, "pkg.sub.sib.x"),
                                              (3, "pkg"), (3, "pkg.y")]


# ----------------------------------------------------------------------------- at run time


def _loaded_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.parametrize("stmt", ["import router.server", "import preft_client",
                                  "import app.cli, app.launcher, cluster.config"])
def test_router_client_cli_import_neither_torch_nor_vllm(stmt):
    mods = _loaded_after(stmt)
    assert not {"torch", "vllm"} & mods


def test_decode_worker_never_imports_adapter_code():
    mods = _loaded_after("import decode_worker.worker, kv_transfer.connector, "
                         "worker_runtime.engine_loop, lora_kernel.vllm_plugin")
    assert not any(m.startswith(("prefill_worker", "peft", "lora_kernel.grouped_lora"))
                   for m in mods)


def test_decode_request_has_no_adapter_field():
    from dataclasses import fields

    from cluster.messages import DecodeRequest

    assert not any("adapter" in f.name or "lora" in f.name for f in fields(DecodeRequest))


def test_router_adapter_kinds_match_the_prefill_registry():
    from cluster.messages import ADAPTER_KINDS
    from prefill_worker.adapters import KINDS

    assert set(ADAPTER_KINDS) == set(KINDS)
