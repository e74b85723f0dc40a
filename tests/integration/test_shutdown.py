"""``preft up`` stops cleanly under load (issue 25, item 8): one real ``preft up``
subprocess per scenario (a colocated worker on a locally built tiny model, gRPC and the
in-process HTTP gateway).

SIGTERM during four streams (two SDK, two HTTP): new requests are refused at once (gRPC
UNAVAILABLE, HTTP 503 with an OpenAI-style body), the short streams finish normally inside
the drain period, the long ones end with UNAVAILABLE "shutting down" (HTTP: an error event,
then ``data: [DONE]``), and the process exits 0 leaving none of its processes. A double
Ctrl-C (SIGINT to the process group, as a terminal sends it) exits at once, 130, without a
traceback, and no process of the cluster (raylet, GCS, agents, workers) survives 10 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
READY = "router listening on"
DRAIN_S = 4
LONG_TOKENS = 3500        # seconds of decoding on the tiny model: outlives the drain
SHORT_TOKENS = 12         # well inside it


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The tiny model with a 4096-token context: room for a stream longer than the drain."""
    from app.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("shutdown") / "model")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Up:
    """One ``preft up`` subprocess in its own session (process group), logging to a file."""

    def __init__(self, model: Path, tmp: Path) -> None:
        self.port, self.http = _port(), _port()
        self.log = tmp / "up.log"
        argv = [sys.executable, "-m", "app.cli", "up", "--model", str(model),
                "--colocated-workers", "1", "--max-model-len", "4096", "--kv-cache-gib", "0.25",
                "--port", str(self.port), "--http-port", str(self.http),
                "--run-dir", str(tmp / "run"), "--drain-timeout", str(DRAIN_S)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.tree: list[psutil.Process] = []

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"preft up exited:\n{self.text()[-3000:]}"
            if READY in self.text() and _listening(self.http):
                root = psutil.Process(self.proc.pid)   # the cluster's processes, as they run
                self.tree = [root, *root.children(recursive=True)]
                return
            time.sleep(0.5)
        pytest.fail(f"preft up not ready after {timeout} s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def survivors(self, within: float) -> list[str]:
        """The cluster's processes still running ``within`` s from now (checked until then)."""
        deadline = time.monotonic() + within
        while True:
            alive = [p for p in self.tree if _alive(p)]
            if not alive or time.monotonic() > deadline:
                return [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive if _alive(p)]
            time.sleep(0.25)

    def kill(self) -> None:   # the test's own cleanup, whatever happened
        for p in self.tree:
            if _alive(p):
                p.kill()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _sdk_stream(up: Up, max_tokens: int, out: dict, started: threading.Event) -> None:
    from preft_client import PreftClient, PreftClientError

    with PreftClient(f"127.0.0.1:{up.port}", timeout=120, retries=0) as c:
        n = 0
        try:
            for _ in c.stream(None, prompt="once upon a time", max_tokens=max_tokens,
                              ignore_eos=True):
                n += 1
                started.set()
            out.update(ok=True, deltas=n)
        except PreftClientError as e:
            out.update(ok=False, code=e.code.name, message=e.message, deltas=n)
        started.set()


def _http_stream(up: Up, max_tokens: int, out: dict, started: threading.Event) -> None:
    body = {"model": "base", "prompt": "once upon a time", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "temperature": 0}
    events = []
    with httpx.Client(base_url=f"http://127.0.0.1:{up.http}", timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    out["events"] = events
    started.set()


def _start(fn, up: Up, max_tokens: int) -> tuple[threading.Thread, dict]:
    out: dict = {}
    started = threading.Event()
    t = threading.Thread(target=fn, args=(up, max_tokens, out, started), daemon=True)
    t.start()
    assert started.wait(120), f"{fn.__name__} never streamed:\n{up.text()[-3000:]}"
    return t, out


def _refused_now(up: Up) -> None:
    """While draining: a new SDK request UNAVAILABLE, a new HTTP request 503, both saying so."""
    from preft_client import PreftClient, PreftClientError

    with PreftClient(f"127.0.0.1:{up.port}", timeout=30, retries=0) as c:
        with pytest.raises(PreftClientError) as ei:
            c.generate(None, prompt="hi", max_tokens=2)
    assert ei.value.code.name == "UNAVAILABLE" and "shutting down" in ei.value.message
    r = httpx.post(f"http://127.0.0.1:{up.http}/v1/completions", timeout=30,
                   json={"model": "base", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert "shutting down" in err["message"] and err["type"] == "service_unavailable_error"


def _check_http(out: dict, finished: bool) -> None:
    ev = out["events"]
    assert out["status"] == 200 and ev and ev[-1] == "[DONE]", ev[-3:]
    last = json.loads(ev[-2])
    if finished:
        assert last["choices"][0]["finish_reason"] == "length", last
    else:
        assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"], last


def test_sigterm_drains_streams_then_ends_the_rest(long_model, tmp_path):
    up = Up(long_model, tmp_path)
    try:
        up.wait_ready()
        long = [_start(_sdk_stream, up, LONG_TOKENS), _start(_http_stream, up, LONG_TOKENS)]
        short = [_start(_sdk_stream, up, SHORT_TOKENS), _start(_http_stream, up, SHORT_TOKENS)]
        t0 = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        _refused_now(up)
        for t, _ in long + short:
            t.join(60)
        ended_s = time.monotonic() - t0
        (_, sdk_long), (_, http_long) = long
        (_, sdk_short), (_, http_short) = short
        assert sdk_short["ok"] and sdk_short["deltas"] >= 1, sdk_short
        _check_http(http_short, finished=True)
        assert not sdk_long["ok"] and sdk_long["code"] == "UNAVAILABLE", sdk_long
        assert "shutting down" in sdk_long["message"] and sdk_long["deltas"] > 1, sdk_long
        _check_http(http_long, finished=False)
        assert DRAIN_S - 0.5 < ended_s < DRAIN_S + 8, ended_s
        assert up.proc.wait(90) == 0, up.text()[-3000:]
        assert "Traceback" not in up.text(), up.text()[-3000:]
        assert up.survivors(10) == []
    finally:
        up.kill()


def test_double_sigint_exits_at_once_and_leaves_no_ray_process(long_model, tmp_path):
    up = Up(long_model, tmp_path)
    try:
        up.wait_ready()
        names = " ".join(p.name() + " " + " ".join(p.cmdline()[:1]) for p in up.tree if _alive(p))
        assert "raylet" in names and "gcs_server" in names, names   # what must go
        stream, _ = _start(_sdk_stream, up, LONG_TOKENS)    # the drain would wait on it
        pgid = os.getpgid(up.proc.pid)
        os.killpg(pgid, signal.SIGINT)       # Ctrl-C, twice, as a terminal sends it
        time.sleep(0.5)
        t0 = time.monotonic()
        os.killpg(pgid, signal.SIGINT)
        code = up.proc.wait(30)
        assert time.monotonic() - t0 < 15
        assert code == 130, up.text()[-3000:]
        out = up.text()
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
        assert up.survivors(10) == []
        stream.join(30)
    finally:
        up.kill()
