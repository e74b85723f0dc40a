"""The local redis-server (app/redis_proc.py) ends with the cluster process, even one killed
by SIGKILL, and is started without running Python between fork and exec."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_OWNER = """
import sys, threading, time
sys.path.insert(0, {root!r})
from app.redis_proc import RedisServer
for _ in range(4):   # threads running while the server is started, as in a cluster process
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
r = RedisServer(sys.argv[1]).start()
print(r.proc.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in status


def test_redis_server_dies_with_its_owner_killed_by_sigkill(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", _OWNER.format(root=str(ROOT)), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    pid = int(owner.stdout.readline())
    assert _alive(pid) and "redis-server" in Path(f"/proc/{pid}/cmdline").read_text()
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, 9)
        raise AssertionError("redis-server outlived the process that started it")


def test_no_python_runs_between_fork_and_exec():
    src = (ROOT / "app" / "redis_proc.py").read_text()
    assert "preexec_fn" not in src.replace("``preexec_fn``", "")
