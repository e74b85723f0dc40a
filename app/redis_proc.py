"""A local ``redis-server`` for the cluster state, when no ``--redis-url`` is given.

Bound to loopback, data (RDB/AOF) under the run directory, started and stopped with the
cluster. Tests use it too (a real server, never a fake).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _with_parent_death_signal(args: list[str]) -> list[str]:
    """Linux: the server gets SIGTERM if the cluster process dies, even by SIGKILL. Set by
    util-linux's ``setpriv`` before it execs the server: no Python code runs between fork
    and exec (a ``preexec_fn`` in a process with running threads can deadlock or abort)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *args] if setpriv else args


class RedisServer:
    def __init__(self, data_dir: str | Path, port: int | None = None,
                 password: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        from urllib.parse import quote

        # Percent-encoded: a password with '@', '/', ':' or '#' would otherwise break the URL.
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run scripts/setup.sh "
                               "(apt-get install redis-server) or pass --redis-url")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
                "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        # its own session: a terminal's Ctrl-C (SIGINT to the foreground process group)
        # reaches `preft up`, which drains and then stops it, not Redis under its feet
        self.proc = subprocess.Popen(_with_parent_death_signal(args), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        import redis

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited (code {self.proc.returncode}); see "
                                   f"{self.data_dir / 'redis.log'}")
            try:
                if redis.Redis.from_url(self.url, socket_timeout=0.5).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
