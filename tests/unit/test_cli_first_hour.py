"""A new user's first hour with the `preft` CLI, where no engine is needed (issue 25).

Range errors name the flag; `--adapter NAME:KIND=PATH` keeps its kind and an all-token kind
without colocated workers is refused naming `--colocated-workers`; `deploy/local-cpu.yaml`
is `preft up --port 50053` from YAML; a missing config, a port in use and a bad adapter path
each end in one line, before anything starts; output that is not a terminal gets whole
table rows, ISO 8601 times, one `preft top` view per interval and progress lines.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--top-k", "-5", "hi"], "argument --top-k: must be >= 0 (0 = off), got -5"),
    (["generate", "--top-p", "0", "hi"], "argument --top-p: must be in (0, 1], got 0"),
    (["generate", "--n", "17", "hi"], "argument --n: must be in [1, 16], got 17"),
    (["generate", "--max-tokens", "0", "hi"], "argument --max-tokens: must be >= 1, got 0"),
    (["generate", "--temperature", "x", "hi"], "argument --temperature: expected a number"),
    (["generate", "--repetition-penalty", "0", "hi"], "argument --repetition-penalty: must be in (0, 10]"),
    (["up", "--port", "70000"], "argument --port: must be in [0, 65535] (0 = any free port)"),
    (["up", "--kv-cache-gib", "0"], "argument --kv-cache-gib: must be > 0, got 0"),
    (["up", "--prefill-workers", "-1"], "argument --prefill-workers: must be >= 0, got -1"),
    (["status", "--timeout", "0"], "argument --timeout: must be > 0, got 0"),
])
def test_range_errors_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.make_parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_every_client_command_takes_an_api_key(monkeypatch):
    for argv in (["generate", "hi"], ["status"], ["top"], ["adapters", "list"],
                 ["adapters", "show", "a"], ["adapters", "add", "a", "p"], ["adapters", "rm", "a"]):
        args = cli.make_parser().parse_args([*argv, "--api-key", "k1"])
        assert cli._client(args)._api_key == "k1", argv
        monkeypatch.setenv("PREFT_API_KEY", "k2")
        assert cli._client(cli.make_parser().parse_args(argv))._api_key == "k2", argv
        monkeypatch.delenv("PREFT_API_KEY")


def _adapter_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


@pytest.mark.parametrize("kind", ["lora", "alora"])
def test_adapter_kind_is_kept_and_all_token_needs_colocated_workers(tmp_path, kind):
    from cluster.config import ConfigError

    a = _adapter_dir(tmp_path, "old")
    up = ["up", "--model", str(tmp_path), "--adapter", f"old:{kind}={a}", "--adapter", f"new={a}"]
    with pytest.raises(ConfigError, match=rf"adapter_kinds='old:{kind}'.*--colocated-workers"):
        cli.build_config(cli.make_parser().parse_args(up))
    cfg = cli.build_config(cli.make_parser().parse_args([*up, "--colocated-workers", "1"]))
    assert cfg.adapter_kinds == (("old", kind),) and cfg.colocated_workers == 1
    assert cfg.adapters == (("old", str(a)), ("new", str(a)))


class _Recorder:
    """Stands in for the SDK client and the progress bar: records the uploads."""

    def __init__(self):
        self.calls = []

    def register_adapter(self, name, path, *, public, kind, progress):
        from preft_client.types import AdapterInfo

        self.calls.append((name, path, public, kind))
        return AdapterInfo(name, 1, kind or "lora_p", 8, (), 0, "0" * 64, "", public, 0.0)

    def add_task(self, *a, **kw):
        return 0

    def update(self, *a, **kw):
        pass


def test_startup_uploads_register_the_kind_given(tmp_path):
    a = _adapter_dir(tmp_path, "old")
    cfg = cli.build_config(cli.make_parser().parse_args(
        ["up", "--model", str(tmp_path), "--colocated-workers", "1",
         "--adapter", f"old:lora={a}", "--adapter", f"p={a}"]))
    rec = _Recorder()
    infos = cli.upload_adapters(rec, cfg, rec)
    assert rec.calls == [("old", str(a), True, "lora"), ("p", str(a), True, None)]
    assert [i.kind for i in infos] == ["lora", "lora_p"]


def test_local_cpu_yaml_is_preft_up_from_yaml(tmp_path, monkeypatch):
    """No model in deploy/local-cpu.yaml: the embedded default's model and adapters, as
    `preft up --port 50051` (the demo build itself stubbed out: ~3-4 CPU minutes)."""
    from app import assets

    model = tmp_path / "demo-model"
    model.mkdir()
    demo = {n: _adapter_dir(tmp_path, n) for n in assets.DEMO_ADAPTERS}
    monkeypatch.setattr(assets, "default_assets", lambda home=None: (model, demo))
    y = cli.build_config(cli.make_parser().parse_args(
        ["up", "--config", str(ROOT / "deploy" / "local-cpu.yaml")]))
    f = cli.build_config(cli.make_parser().parse_args(["up", "--port", "50051"]))
    for get in (lambda c: c.prefill.engine.model, lambda c: c.decode.engine.model,
                lambda c: (c.prefill_workers, c.decode_workers, c.colocated_workers),
                lambda c: dict(c.adapters), lambda c: c.adapter_kinds,
                lambda c: (c.router.host, c.router.port, c.router.require_auth),
                lambda c: (c.prefill.max_lora_rank, c.prefill.engine.kv_cache_gib),
                lambda c: (c.prefill.engine.dtype, c.prefill.engine.max_model_len), lambda c: c.run_dir):
        assert get(y) == get(f)
    assert y.prefill.engine.model == str(model) and sorted(dict(y.adapters)) == ["alice", "bob", "carol"]
    colo = cli.build_config(cli.make_parser().parse_args(
        ["up", "--config", str(ROOT / "deploy" / "local-colocated.yaml")]))
    assert colo.colocated_cfg.engine.model == str(model) and colo.colocated_workers == 1


def _preft(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "app.cli", *argv], cwd=cwd, capture_output=True,
                       text=True, timeout=120, env={**__import__("os").environ,
                                                    "PYTHONPATH": str(ROOT)})
    return r, time.monotonic() - t0


def test_start_up_mistakes_fail_at_once_in_one_line(tmp_path):
    """From another directory, as a subprocess: one line naming the flag, exit 2, before
    Redis, Ray or an engine starts (the model directory here has no weights at all)."""
    a = _adapter_dir(tmp_path, "a")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            "--config deploy/local-cpu.yaml": (["up", "--config", "deploy/local-cpu.yaml"],
                                               "No such file"),
            f"--port {port}": (["up", "--model", str(tmp_path), "--port", str(port)], "in use"),
            f"--http-port {port}": (["up", "--model", str(tmp_path), "--port", "0",
                                     "--http-port", str(port)], "in use"),
            "--adapter": (["up", "--model", str(tmp_path), "--adapter", f"x={a}-missing"],
                          "is not a directory"),
            "--colocated-workers": (["up", "--model", str(tmp_path), "--adapter", f"x:lora={a}"],
                                    "only colocated workers serve"),
        }
        for flag, (argv, why) in cases.items():
            r, took = _preft(*argv, cwd=tmp_path)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, (flag, r.stderr)
            assert lines[0].startswith("preft up: error: ") and flag in lines[0], lines
            assert why in lines[0] and "Traceback" not in r.stderr, lines
            assert took < 15, (flag, took)   # ~1-2 s of imports; nothing started
    assert not (tmp_path / ".preft").exists()   # no Redis data, no run directory


def test_keys_create_without_a_cluster_says_so_in_one_line(tmp_path):
    r, _ = _preft("keys", "create", "--tenant", "acme", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no cluster found" in r.stderr and "cluster.json" in r.stderr
    port = __import__("app.redis_proc", fromlist=["free_port"]).free_port()
    r, _ = _preft("keys", "create", "--tenant", "acme", "--redis-url",
                  f"redis://127.0.0.1:{port}/0", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot reach the cluster's Redis" in r.stderr and "--redis-url" in r.stderr


def _worker(wid: str, resident: dict):
    from preft_client.types import WorkerStatus
    from dataclasses import fields

    vals = {f.name: 0 for f in fields(WorkerStatus)}
    vals.update(worker_id=wid, role="prefill", healthy=True, resident=resident,
                tensor_parallel_size=1)
    return WorkerStatus(**vals)


def _status() -> dict:
    resident = {f"tenant-adapter-{i:02d}": "v1" for i in range(12)}
    return {"adapters": 12, "router_inflight": 0, "state_stale": False, "slots": {},
            "workers": [_worker("prefill-0-of-a-long-named-cluster", resident)]}


def test_piped_tables_are_whole(capsys):
    """stdout is not a terminal here (capsys), as in `preft status | less`."""
    cli.out_console().print(cli._status_table(_status()))
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "worker" in line and "role" in line)
    for col in ("worker", "role", "TP", "healthy", "outstanding", "KV blocks used",
                "held transfers", "KV sent", "resident adapters", "adapter slots"):
        assert col in header, header
    row = next(line for line in out.splitlines() if "prefill-0-of-a-long-named-cluster" in line)
    assert ", ".join(f"tenant-adapter-{i:02d}:v1" for i in range(12)) in row


def test_times_are_iso_8601():
    from datetime import datetime

    from preft_client.types import AdapterInfo

    ts = 1796648310.57
    a = cli.adapter_dict(AdapterInfo("x", 2, "lora_p", 8, ("q_proj",), 10, "0" * 64, "", True, ts))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", a["created"]), a
    assert datetime.fromisoformat(a["created"]).timestamp() == int(ts)
    assert a["target_modules"] == ["q_proj"]


class _StatusClient:
    def cluster_status(self):
        return _status()


def test_top_without_a_terminal_prints_every_interval():
    from rich.console import Console

    from app.top import run

    console = Console(record=True, width=300, force_terminal=False)
    run(_StatusClient(), "127.0.0.1:1", None, interval=0.01, iterations=3, console=console)
    out = console.export_text()
    assert len(re.findall(r"^--- \d{4}-\d\d-\d\dT", out, re.M)) == 3, out
    assert out.count("prefill-0-of-a-long-named-cluster") == 3


def test_progress_lines_when_not_a_terminal(capsys, monkeypatch):
    from app.assets import progress_lines

    clock = iter([0.0, 1.0, 2.0, 3.0, 15.0, 16.0, 17.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    tick = progress_lines("training the demo", every_s=10.0)
    for what, done in (("base model", 1), ("base model", 2), ("alice", 3), ("alice", 4),
                       ("alice", 5), ("alice", 10)):
        tick(what, done, 10)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["training the demo: base model 1/10 (10%, 1 s)",
                     "training the demo: alice 3/10 (30%, 3 s)",
                     "training the demo: alice 4/10 (40%, 15 s)",   # 12 s after the last
                     "training the demo: alice 10/10 (100%, 17 s)"], lines
