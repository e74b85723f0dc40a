"""`preft bench` must not report stock LoRA numbers under the grouped kernel's name (issue 12,
item 9): the grouped server proves its kernel from its engine log, the plugin refuses a
kernel it cannot install. No vLLM server or engine is started here."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from bench.e2e import GROUPED_KERNEL_MARKER, BenchConfig, VllmSystem

ROOT = Path(__file__).resolve().parents[2]


def _system(name: str, tmp_path: Path, log: str) -> VllmSystem:
    s = VllmSystem(name, BenchConfig(), tmp_path / "model", "dummy", [], tmp_path)
    s.log_path.write_text(log)
    return s


ENGINE_LOG = "INFO ... Loading model\nINFO ... Starting vLLM API server\n"
GROUPED_LOG = ENGINE_LOG + f"INFO [grouped_lora.py] {GROUPED_KERNEL_MARKER} (pid 42)\n"


def test_grouped_server_without_the_kernel_fails(tmp_path):
    s = _system("multi_lora_grouped", tmp_path, ENGINE_LOG)
    with pytest.raises(RuntimeError, match="did not load the grouped LoRA kernel"):
        s.check_lora_kernel()
    assert s.lora_kernel is None


def test_grouped_server_with_the_kernel_passes(tmp_path):
    s = _system("multi_lora_grouped", tmp_path, GROUPED_LOG)
    s.check_lora_kernel()
    assert s.lora_kernel == "grouped"


def test_stock_server_running_the_grouped_kernel_fails(tmp_path):
    s = _system("multi_lora", tmp_path, GROUPED_LOG)
    with pytest.raises(RuntimeError, match="runs the grouped LoRA kernel"):
        s.check_lora_kernel()
    s = _system("multi_lora", tmp_path, ENGINE_LOG)
    s.check_lora_kernel()
    assert s.lora_kernel == "stock"


def test_base_server_has_no_kernel_to_check(tmp_path):
    s = _system("base", tmp_path, GROUPED_LOG)
    s.check_lora_kernel()
    assert s.lora_kernel is None


def test_the_marker_is_what_the_grouped_wrapper_logs():
    src = (ROOT / "lora_kernel" / "grouped_lora.py").read_text()
    assert f'"{GROUPED_KERNEL_MARKER} (pid %d)"' in src


def test_grouped_system_refused_on_gpus():
    with pytest.raises(ValueError, match="multi_lora_grouped needs CPU engines"):
        BenchConfig(gpus=2)
    BenchConfig(gpus=2, systems=("preft", "multi_lora", "base"))


# ----------------------------------------------------------------------------- the plugin


def _fake_vllm(monkeypatch, is_cpu: bool) -> list:
    """``vllm.platforms.current_platform`` and ``install_grouped_lora`` without vLLM."""
    installs: list = []
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = type("CudaPlatform" if not is_cpu else "CpuPlatform", (), {
        "is_cpu": lambda self: is_cpu})()
    vllm = types.ModuleType("vllm")
    vllm.platforms = platforms
    grouped = types.ModuleType("lora_kernel.grouped_lora")
    grouped.install_grouped_lora = lambda **kw: installs.append(kw)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setitem(sys.modules, "lora_kernel.grouped_lora", grouped)
    return installs


@pytest.mark.parametrize("value", [None, "", "stock"])
def test_plugin_does_nothing_unless_asked(monkeypatch, value):
    from lora_kernel.vllm_plugin import load

    installs = _fake_vllm(monkeypatch, is_cpu=True)
    if value is None:
        monkeypatch.delenv("PREFT_LORA_KERNEL", raising=False)
    else:
        monkeypatch.setenv("PREFT_LORA_KERNEL", value)
    load()
    assert installs == []


def test_plugin_installs_grouped_on_cpu(monkeypatch):
    from lora_kernel.vllm_plugin import load

    installs = _fake_vllm(monkeypatch, is_cpu=True)
    monkeypatch.setenv("PREFT_LORA_KERNEL", "grouped")
    load()
    assert installs == [{"every_process": True}]


def test_plugin_refuses_grouped_off_cpu(monkeypatch):
    from lora_kernel.vllm_plugin import load

    installs = _fake_vllm(monkeypatch, is_cpu=False)
    monkeypatch.setenv("PREFT_LORA_KERNEL", "grouped")
    with pytest.raises(RuntimeError, match="CPU backend.*CudaPlatform"):
        load()
    assert installs == []


def test_plugin_refuses_unknown_values(monkeypatch):
    from lora_kernel.vllm_plugin import load

    _fake_vllm(monkeypatch, is_cpu=True)
    monkeypatch.setenv("PREFT_LORA_KERNEL", "grouped ")
    with pytest.raises(RuntimeError, match="PREFT_LORA_KERNEL='grouped '"):
        load()
