"""Two Ray nodes in two network namespaces: KV crosses a veth pair, adapters come from S3.

The test builds namespaces ``preft-mn-a`` (10.77.0.1) and ``preft-mn-b`` (10.77.0.2) joined
by a veth pair (traffic never leaves the machine), starts a Ray head, Redis (password
protected) and an S3-compatible server (moto) in A, and a second Ray node in B whose run
directory is a private tmpfs (its own mount namespace): the nodes share no directory the
cluster writes. ``tests/multinode_driver.py`` runs in A: the decode worker lands on A's node
and the prefill worker on B's (Ray resources ``decode_node`` / ``prefill_node``), so every
prompt's KV goes over the veth pair, and every adapter, including one uploaded through the
SDK after start-up, reaches B only through the ``s3://`` store. Greedy outputs must equal
the single-process reference; the veth counters must show at least the KV bytes; B's disk
cache holds the adapters' sha256 entries that A cannot see. Everything created is removed
afterwards (processes by namespace, then the namespaces, which takes the veth pair).
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

from s3_server import MotoServer, aws_profile

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NS_A, NS_B = "preft-mn-a", "preft-mn-b"
IP_A, IP_B = "10.77.0.1", "10.77.0.2"
RAY_PORT, REDIS_PORT, REDIS_PW = 6380, 6391, "mn-secret"
BUCKET = "preft-mn"
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
        moto = MotoServer(tmp, host=IP_A).start(wait=False, prefix=tuple(in_ns(NS_A)))
        procs.append(moto.proc)
        ray_tmp = tempfile.mkdtemp(prefix="pmn", dir="/tmp")   # AF_UNIX paths: <= 107 bytes
        common = ["--num-cpus", "8", "--disable-usage-stats", "--temp-dir", ray_tmp,
                  "--include-dashboard", "false"]
        r = subprocess.run(in_ns(NS_A, ray_bin, "start", "--head", "--node-ip-address", IP_A,
                                 "--port", str(RAY_PORT), "--resources", '{"decode_node": 4}',
                                 *common), capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        # B: its own mount namespace, the run directory a private tmpfs there (Ray's
        # processes on B keep the namespace after `ray start` returns)
        run = tmp / "run"
        run.mkdir()
        start_b = " ".join([ray_bin, "start", "--address", f"{IP_A}:{RAY_PORT}",
                            "--node-ip-address", IP_B, "--resources", "'{\"prefill_node\": 4}'",
                            *common[:2], "--disable-usage-stats"])
        r = subprocess.run(in_ns(NS_B, "unshare", "--mount", "--propagation", "private", "sh",
                                 "-c", f"mount -t tmpfs preft-mn-b {run} && exec {start_b}"),
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        with aws_profile(moto.endpoint, "mn-key", "mn-secret-key"):
            yield tmp, env, moto
    finally:
        for p in procs:
            p.kill()
        teardown()
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_prefill_and_decode_on_different_nodes_exact(two_nodes, assets, reference):
    import yaml

    tmp, env, moto = two_nodes
    eng = {"model": assets["model"], "max_model_len": 1024}
    cfg = {
        "ray_address": f"{IP_A}:{RAY_PORT}", "name": "mn", "run_dir": str(tmp / "run"),
        "redis_url": f"redis://:{REDIS_PW}@{IP_A}:{REDIS_PORT}/0",
        "store_uri": f"s3://{BUCKET}/adapters",
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
            for a in ("ada", "bea", "cid", None) for p in ids]
    # "cid" is uploaded through the SDK after start-up: the router in A stages it in the
    # bucket, the prefill worker in B fetches it from there
    (tmp / "job.json").write_text(json.dumps({
        "endpoint": moto.endpoint, "bucket": BUCKET, "requests": reqs,
        "uploads": {"cid": assets["adapters"]["cid"]}}))
    tx_before = veth_tx_bytes(NS_B, "preft-vb")
    r = subprocess.run(in_ns(NS_A, sys.executable, str(ROOT / "tests" / "multinode_driver.py"),
                             str(tmp / "cluster.yaml"), str(tmp / "job.json"),
                             str(tmp / "out.json")),
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    tx = veth_tx_bytes(NS_B, "preft-vb") - tx_before
    out = json.loads((tmp / "out.json").read_text())

    place = out["placement"]
    assert place["mn-prefill-0"] == IP_B and place["mn-decode-0"] == IP_A, place
    kv_total = sum(o["kv_bytes"] for o in out["outputs"])
    assert all(o["kv_bytes"] > 0 for o in out["outputs"])
    # one /dev/shm, two network namespaces: counted as two hosts, KV over the network
    assert {o["kv_transport"] for o in out["outputs"]} == {"gloo"}, out["outputs"]
    assert tx >= kv_total, f"veth sent {tx} bytes, less than the {kv_total} KV bytes"
    _adapters_came_through_s3(out, tmp)
    compared = 0
    for q, o in zip(reqs, out["outputs"]):
        adapter_dir = assets["adapters"][q["adapter"]] if q["adapter"] else None
        ref = reference.generate(q["ids"], adapter_dir, q["max_tokens"])
        k = ref.comparable_prefix(GAP_TOL)
        assert o["tokens"][:k] == list(ref.tokens[:k]), (q["adapter"], len(q["ids"]))
        compared += k
    assert compared >= 0.9 * sum(q["max_tokens"] for q in reqs)
    print(f"\nMULTINODE {len(reqs)} requests exact across nodes; KV {kv_total} bytes over "
          f"veth (tx {tx} bytes); adapters {out['prefill_cache']} fetched from s3:// on B")


def _adapters_came_through_s3(out: dict, tmp: Path) -> None:
    """Each adapter's files are in the bucket under its sha256, B's disk cache holds those
    entries, and A (this process's view of the run directory) sees none of them."""
    want = {out["sha256"][n] for n in ("ada", "bea", "cid")}
    in_bucket = {k.split("/")[1] for k in out["store_keys"]}
    assert want <= in_bucket, (want, out["store_keys"])
    assert want <= set(out["prefill_cache"]), (want, out["prefill_cache"])
    assert not (tmp / "run" / "cache" / "prefill-0").exists(), "B's cache is visible from A"
