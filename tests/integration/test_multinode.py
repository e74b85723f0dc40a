"""Two Ray nodes in two network namespaces: KV crosses a veth pair, output stays exact.

The test builds namespaces ``preft-mn-a`` (10.77.0.1) and ``preft-mn-b`` (10.77.0.2) joined
by a veth pair (traffic never leaves the machine), starts a Ray head + Redis (password
protected) in A and a second Ray node in B, and runs ``tests/multinode_driver.py`` in A:
the prefill worker lands on A's node and the decode worker on B's (Ray resources
``prefill_node`` / ``decode_node``), so every prompt's KV goes over the veth pair. Greedy
outputs must equal the single-process reference; the veth counters must show at least the
KV bytes. Everything created is removed afterwards (processes by namespace, then the
namespaces, which takes the veth pair with them).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NS_A, NS_B = "preft-mn-a", "preft-mn-b"
IP_A, IP_B = "10.77.0.1", "10.77.0.2"
RAY_PORT, REDIS_PORT, REDIS_PW = 6380, 6391, "mn-secret"
GAP_TOL = 1e-3


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def teardown() -> None:
    for ns in (NS_A, NS_B):
        r = sh("ip", "netns", "pids", ns, check=False)
        for pid in r.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    time.sleep(0.5)
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "del", ns, check=False)


def veth_tx_bytes(ns: str, dev: str) -> int:
    return int(sh(*in_ns(ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes")).stdout)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the multi-node test needs root and iproute2 (ip netns) on this machine")
    teardown()  # leftovers of an interrupted run
    sh("ip", "netns", "add", NS_A)
    sh("ip", "netns", "add", NS_B)
    sh("ip", "link", "add", "preft-va", "type", "veth", "peer", "name", "preft-vb")
    for ns, dev, ip in ((NS_A, "preft-va", IP_A), (NS_B, "preft-vb", IP_B)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    tmp = tmp_path_factory.mktemp("multinode")
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Ray's token authentication between the nodes and the driver, as on a real cluster.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    procs, ray_tmp = [], None
    try:
        procs.append(subprocess.Popen(in_ns(
            NS_A, "redis-server", "--bind", IP_A, "--port", str(REDIS_PORT), "--requirepass",
            REDIS_PW, "--save", "", "--appendonly", "no", "--dir", str(tmp)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ray_tmp = tempfile.mkdtemp(prefix="pmn", dir="/tmp")   # AF_UNIX paths: <= 107 bytes
        common = ["--num-cpus", "8", "--disable-usage-stats", "--temp-dir", ray_tmp,
                  "--include-dashboard", "false"]
        r = subprocess.run(in_ns(NS_A, ray_bin, "start", "--head", "--node-ip-address", IP_A,
                                 "--port", str(RAY_PORT), "--resources", '{"prefill_node": 4}',
                                 *common), capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(in_ns(NS_B, ray_bin, "start", "--address", f"{IP_A}:{RAY_PORT}",
                                 "--node-ip-address", IP_B, "--resources", '{"decode_node": 4}',
                                 *common[:2], "--disable-usage-stats"),
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        yield tmp, env
    finally:
        for p in procs:
            p.kill()
        teardown()
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_prefill_and_decode_on_different_nodes_exact(two_nodes, assets, reference):
    import yaml

    tmp, env = two_nodes
    eng = {"model": assets["model"], "max_model_len": 1024}
    cfg = {
        "ray_address": f"{IP_A}:{RAY_PORT}", "name": "mn", "run_dir": str(tmp / "run"),
        "redis_url": f"redis://:{REDIS_PW}@{IP_A}:{REDIS_PORT}/0",
        "adapters": {"ada": assets["adapters"]["ada"], "bea": assets["adapters"]["bea"]},
        # "auto": each worker advertises its own Ray node's IP (A's or B's)
        "prefill": {"engine": eng, "resources": {"prefill_node": 1},
                    "transfer": {"kv_host": "auto"}},
        "decode": {"engine": eng, "resources": {"decode_node": 1},
                   "transfer": {"kv_host": "auto"}},
        "router": {"port": 0},
    }
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    ids = [[5 + (7 * i + 3 * k) % 500 for i in range(n)] for k, n in enumerate((3, 129, 300))]
    reqs = [{"adapter": a, "ids": p, "max_tokens": 24}
            for a in ("ada", "bea", None) for p in ids]
    (tmp / "requests.json").write_text(json.dumps(reqs))
    tx_before = veth_tx_bytes(NS_A, "preft-va")
    r = subprocess.run(in_ns(NS_A, sys.executable, str(ROOT / "tests" / "multinode_driver.py"),
                             str(tmp / "cluster.yaml"), str(tmp / "requests.json"),
                             str(tmp / "out.json")),
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    tx = veth_tx_bytes(NS_A, "preft-va") - tx_before
    out = json.loads((tmp / "out.json").read_text())

    place = out["placement"]
    assert place["mn-prefill-0"] == IP_A and place["mn-decode-0"] == IP_B, place
    kv_total = sum(o["kv_bytes"] for o in out["outputs"])
    assert all(o["kv_bytes"] > 0 for o in out["outputs"])
    # one /dev/shm, two network namespaces: counted as two hosts, KV over the network
    assert {o["kv_transport"] for o in out["outputs"]} == {"gloo"}, out["outputs"]
    assert tx >= kv_total, f"veth sent {tx} bytes, less than the {kv_total} KV bytes"
    compared = 0
    for q, o in zip(reqs, out["outputs"]):
        adapter_dir = assets["adapters"][q["adapter"]] if q["adapter"] else None
        ref = reference.generate(q["ids"], adapter_dir, q["max_tokens"])
        k = ref.comparable_prefix(GAP_TOL)
        assert o["tokens"][:k] == list(ref.tokens[:k]), (q["adapter"], len(q["ids"]))
        compared += k
    assert compared >= 0.9 * sum(q["max_tokens"] for q in reqs)
    print(f"\nMULTINODE {len(reqs)} requests exact across nodes; KV {kv_total} bytes over "
          f"veth (tx {tx} bytes)")
