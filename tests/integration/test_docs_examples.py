"""Every example in README.md and docs/*.md runs as written (tests/docs_blocks.py: modes).

The blocks run in document order, README.md first, each file after the one before, in a
scratch directory that looks like a checkout (every top-level entry of the repository linked
in; files the examples write stay there) with the virtual environment's bin first on PATH, as
after ``source .venv/bin/activate``, and ``$PREFT_HOME`` holding the embedded demo (built once
per session by the ``demo_home`` fixture). Servers started by a ``servers`` block (the
README's ``preft up``: the embedded default on ports 50051, 8000 and 9464) serve every block
after it and are stopped (SIGTERM) at the end. ``parse`` blocks run in a second scratch
directory whose ``.venv/bin`` holds shims that only parse arguments
(tests/docs_parse_only.py), so ``.venv/bin/preft bench ...`` inside a script is checked too.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from docs_blocks import ROOT, all_blocks, commands

pytestmark = pytest.mark.integration

BLOCKS = [b for b in all_blocks() if b.mode not in ("text", "skip")]
VENV = ROOT / ".venv" / "bin"
SERVER_READY_S = 420
BLOCK_TIMEOUT_S = 600
READY_LINE = "router listening on"


def _checkout_like(dest: Path, venv: Path) -> Path:
    dest.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", ".git", ".preft"):
            (dest / entry.name).symlink_to(entry)
    (dest / ".venv").symlink_to(venv)
    return dest


def _shims(dest: Path) -> Path:
    """A fake venv: bin/{preft,python,python3,flock} that only parse their arguments."""
    bin_ = dest / "bin"
    bin_.mkdir(parents=True)
    py, parse = VENV / "python", ROOT / "tests" / "docs_parse_only.py"
    shims = {
        "preft": f'exec "{py}" "{parse}" --entry app.cli:main "$@"',
        "python": (f'[ "$1" = -m ] || {{ echo "parse mode runs only python -m" >&2; exit 3; }}\n'
                   f'shift; exec "{py}" "{parse}" -m "$@"'),
        "flock": 'shift; exec "$@"',   # the lock is for real runs only
    }
    shims["python3"] = shims["python"]
    for name, body in shims.items():
        (bin_ / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    return dest


class Docs:
    def __init__(self, tmp: Path, home: Path) -> None:
        self.work = _checkout_like(tmp / "work", VENV.parent)
        self.parse_work = _checkout_like(tmp / "parse", _shims(tmp / "shim-venv"))
        self.tmp = tmp
        env = dict(os.environ, PREFT_HOME=str(home), PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.env = dict(env, PATH=f"{VENV}:{env['PATH']}")
        self.parse_env = dict(env, PATH=f"{self.parse_work / '.venv' / 'bin'}:{env['PATH']}")
        self.servers: list[tuple[subprocess.Popen, Path]] = []

    def stop(self) -> None:
        for proc, _ in self.servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in self.servers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def docs(demo_home, tmp_path_factory):
    d = Docs(tmp_path_factory.mktemp("docs"), Path(demo_home[0]))
    yield d
    d.stop()


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def _ports(argv: list[str]) -> list[int]:
    flags = {"--port", "--http-port", "--metrics-port"}
    return [int(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in flags]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_server(docs: Docs, cmd: str, where: str) -> None:
    argv = shlex.split(cmd.rstrip("& "), comments=True)
    log = docs.tmp / f"server-{len(docs.servers)}.log"
    proc = subprocess.Popen(argv, cwd=docs.work, env=docs.env, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    docs.servers.append((proc, log))
    is_up = "up" in argv[1:2]
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{where}: `{cmd}` exited {proc.returncode}:\n{_tail(log.read_text())}")
        ready = (not is_up or READY_LINE in log.read_text())
        if ready and all(_listening(p) for p in _ports(argv)):
            return
        time.sleep(1.0)
    pytest.fail(f"{where}: `{cmd}` not serving after {SERVER_READY_S} s:\n"
                f"{_tail(log.read_text())}")


def _run(argv: list[str], cwd: Path, env: dict, where: str) -> str:
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=BLOCK_TIMEOUT_S)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{where} exited {r.returncode}:\n{_tail(out)}"
    return out


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_docs_block_runs_as_written(docs, block):
    if block.mode == "servers":
        for cmd in commands(block.code):
            _start_server(docs, cmd, block.where)
        return
    if block.mode == "parse":
        out = _run(["bash", "-euo", "pipefail", "-c", block.code], docs.parse_work,
                   docs.parse_env, block.where)
        programs = [c for c in commands(block.code) if not c.startswith(("for ", "done", "wait"))]
        assert out.count("parsed: ") >= len(programs), f"{block.where}: a command never parsed:\n{out}"
        return
    if block.lang == "python":
        _run([str(VENV / "python"), "-c", block.code], docs.work, docs.env, block.where)
    else:
        _run(["bash", "-euo", "pipefail", "-c", block.code], docs.work, docs.env, block.where)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
