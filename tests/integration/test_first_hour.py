"""A new user's first hour (issue 25), as the README has it: `preft up --require-auth` on
the embedded default (the demo model and its adapters alice, bob, carol), then the client
commands against it, every one a real `preft` process with its output piped.

* `preft up --require-auth` uploads its own adapters with an admin key it keeps in the run
  directory (mode 0600), and prints where that key and the cluster's Redis are;
* `preft generate` authenticates with `--api-key` and with `$PREFT_API_KEY` (and without a
  key is refused in one line);
* `preft keys create --tenant acme` (no Redis URL, as in the README) makes a key that works;
* piped `preft status` / `adapters list` / `adapters show` print whole rows and ISO 8601
  times; `preft top` without a terminal prints a view every interval.

One cluster for the module (colocated only: one engine), started with `python -m app.cli up`
in a scratch directory (its `.preft/run` the run directory), stopped with SIGTERM.
"""

from __future__ import annotations

import json
import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFT_API_KEY", "REDIS_URL")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


def preft(*argv: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "app.cli", *argv], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


@pytest.fixture(scope="module")
def up(demo_home, tmp_path_factory):
    """`preft up --require-auth` on the embedded default; its ready lines and address."""
    cwd = tmp_path_factory.mktemp("first-hour")
    log = open(cwd / "up.stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up", "--require-auth", "--colocated-workers", "1",
         "--port", "0", "--name", "firsthour"], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
        stderr=log, text=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, q), daemon=True).start()
    out: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while not any(line.startswith("admin API key") for line in out):
            line = q.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, f"preft up exited {proc.wait()}: " \
                                     f"{(cwd / 'up.stderr').read_text()[-3000:]}"
            out.append(line.rstrip("\n"))
        address = re.search(r"router listening on (\S+)", "\n".join(out)).group(1)
        yield {"cwd": cwd, "out": out, "address": address, "run": cwd / ".preft" / "run",
               "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def admin_key(up) -> str:
    return (up["run"] / "admin.key").read_text().strip()


def test_up_says_where_the_admin_key_and_redis_are(up, admin_key):
    text = "\n".join(up["out"])
    key_file = up["run"].resolve() / "admin.key"
    assert f"admin API key (tenant admin) in {key_file} (mode 0600)" in text, text
    assert f"export PREFT_API_KEY=$(cat {key_file})" in text
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(admin_key) >= 32
    url = re.search(r"cluster state in (redis://127\.0\.0\.1:\d+/0)", text)
    assert url, text
    assert json.loads((up["run"] / "cluster.json").read_text())["redis_url"] == url.group(1)


def test_startup_uploads_succeeded_with_the_admin_key(up, admin_key):
    r = preft("adapters", "list", "--output", "json", "--address", up["address"],
              "--api-key", admin_key, cwd=up["cwd"])
    assert r.returncode == 0, r.stderr
    kinds = {a["name"]: a["kind"] for a in json.loads(r.stdout)}
    assert kinds == {"alice": "lora_p", "bob": "reft_p", "carol": "reft_p"}


def _generate(up, *flags: str, env: dict | None = None):
    from trainer.demo import DEMO_PROMPTS

    return preft("generate", "--address", up["address"], "--adapter", "carol", *flags,
                 "--max-tokens", "40", DEMO_PROMPTS[0], cwd=up["cwd"], env=env)


def test_generate_with_api_key_flag_and_env(up, admin_key):
    flag = _generate(up, "--api-key", admin_key)
    assert flag.returncode == 0 and flag.stdout.strip(), (flag.stdout, flag.stderr)
    assert "completion tokens" in flag.stderr
    env = _generate(up, env=_env(PREFT_API_KEY=admin_key))
    assert env.returncode == 0 and env.stdout == flag.stdout, (env.stdout, env.stderr)  # greedy
    r = _generate(up)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr and "Traceback" not in r.stderr
    assert "--api-key or $PREFT_API_KEY" in r.stderr and len(r.stderr.splitlines()) == 1


def test_keys_create_finds_the_cluster_without_a_redis_url(up):
    r = preft("keys", "create", "--tenant", "acme", cwd=up["cwd"])   # the README's line
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert re.fullmatch(r"\S{32,}", key) and "tenant acme: key created" in r.stderr
    g = _generate(up, "--api-key", key)   # carol is public: any tenant may use it
    assert g.returncode == 0 and g.stdout.strip(), g.stderr


def test_piped_status_and_adapters_are_whole_with_iso_times(up, admin_key):
    auth = ("--address", up["address"], "--api-key", admin_key)
    st = preft("status", *auth, cwd=up["cwd"])
    assert st.returncode == 0, st.stderr
    header = next(line for line in st.stdout.splitlines() if "worker" in line and "role" in line)
    assert re.search(r"resident adapters\s*[┃│|]\s*adapter slots", header), st.stdout
    row = next(line for line in st.stdout.splitlines() if "colocated-0" in line)
    assert re.search(r"\d+ decoding, \d+/\d+ prefilling, \d+ wide", row), st.stdout
    ls = preft("adapters", "list", *auth, cwd=up["cwd"])
    assert ls.returncode == 0, ls.stderr
    rows = [line for line in ls.stdout.splitlines() if re.search(r"\b(alice|bob|carol)\b", line)]
    assert len(rows) == 3 and all(re.search(ISO, line) for line in rows), ls.stdout
    show = preft("adapters", "show", "bob", *auth, cwd=up["cwd"])
    assert re.search(rf"^\s*created: {ISO}$", show.stdout, re.M), show.stdout


def test_top_without_a_terminal_prints_every_interval(up, admin_key):
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "top", "--address",
                             up["address"], "--api-key", admin_key, "--interval", "0.5"],
                            cwd=up["cwd"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, q), daemon=True).start()
    views, deadline = [], time.monotonic() + 60
    try:
        while len(views) < 2:
            line = q.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, proc.stderr.read()
            if re.match(rf"--- {ISO}$", line.strip()):
                views.append(line)
            elif "colocated-0" in line:
                assert views, "a worker row before the view's time line"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert len(views) == 2


def _preft_memfds(pids) -> set[int]:
    """The shared-memory segments (memfd, kv_transfer.shm) the given processes hold open,
    by inode: one segment held by both ends of a pair is one inode."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:preft-kv"):
                        found.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return found


def test_sigkill_of_every_process_leaves_no_shared_memory(demo_home, tmp_path):
    """`preft up` on the embedded default (prefill -> decode, staging on), KV moved through
    shared memory, then every process of the cluster SIGKILLed. Nothing of ours is left:
    no process holds a segment, nothing is named in /dev/shm (memfds go with their holders;
    the old named segments stayed until a later start swept them)."""
    import psutil

    from preft_client import PreftClient
    from trainer.demo import DEMO_PROMPTS

    dev_shm = lambda: sorted(p for p in os.listdir("/dev/shm") if "preft" in p)  # noqa: E731
    before = dev_shm()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", "0",
                             "--name", "shmkill"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while "router listening" not in line:
            line = proc.stdout.readline()
            assert line, f"preft up exited {proc.wait()}"
        address = re.search(r"router listening on (\S+)", line).group(1)
        with PreftClient(address, timeout=120) as client:
            done = [client.generate("carol", prompt=f"{DEMO_PROMPTS[0]} {i}", max_tokens=8,
                                    ignore_eos=True) for i in range(3)]
        assert {c.kv_transport for c in done} == {"shm"}, [c.kv_transport for c in done]
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        ours = _preft_memfds(p.pid for p in tree)
        assert ours                                     # segments exist, by descriptor
    finally:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)] \
            if proc.poll() is None else []
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(tree, timeout=30)
    # No process holds any of them (other clusters of this test session hold their own).
    assert not ours & _preft_memfds(int(p) for p in os.listdir("/proc") if p.isdigit())
    assert dev_shm() == before                      # nothing named to leak
