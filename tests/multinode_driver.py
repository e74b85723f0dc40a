"""Driver run inside network namespace A by tests/integration/test_multinode.py.

Joins the two-node Ray cluster (head in namespace A, second node in namespace B), starts a
PreFT cluster on it with the decode pool pinned to A (resource ``decode_node``) and the
prefill pool to B (``prefill_node``); the adapter store is ``s3://`` on an S3-compatible
server in A. It uploads the job's late adapters through the SDK after start-up, sends
greedy requests and writes what happened as JSON: tokens, KV bytes, the node IP of each
worker actor, the adapter store's object keys and what the prefill worker's disk cache
holds (on B's private directory), with the registry's sha256 of each adapter.

    python tests/multinode_driver.py CONFIG.yaml JOB.json OUT.json

JOB.json: ``{"endpoint": S3 endpoint, "bucket": name, "uploads": {name: dir},
"requests": [{"adapter", "ids", "max_tokens"}]}``.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path


def wait_store(endpoint: str, bucket: str, timeout: float = 60) -> None:
    """The S3 server (started in A with the test) answers; create the bucket."""
    import boto3

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    boto3.client("s3").create_bucket(Bucket=bucket)   # the node's ~/.aws: endpoint, key


def where(cluster, cfg) -> tuple[dict, list]:
    """Each worker actor's node IP, and the prefill worker's disk cache entries."""
    import ray

    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    placement, cache = {}, []
    for w in cluster.pool.all():   # ask each actor which node it runs on
        node = ray.get(w.actor.__ray_call__.remote(
            lambda self: __import__("ray").get_runtime_context().get_node_id()))
        placement[f"{cfg.name}-{w.worker_id}"] = nodes.get(node)
        if w.worker_id.startswith("prefill"):
            cache = ray.get(w.actor.__ray_call__.remote(lambda self: sorted(
                p for p in __import__("os").listdir(self.adapters.cache_dir)
                if not p.startswith("."))))
    return placement, cache


def main(cfg_path: str, job_path: str, out_path: str) -> int:
    import boto3
    import ray
    import yaml

    from cluster.config import ClusterConfig, from_dict
    from app.launcher import LocalCluster
    from preft_client import PreftClient

    cfg = from_dict(ClusterConfig, yaml.safe_load(Path(cfg_path).read_text()))
    job = json.loads(Path(job_path).read_text())
    wait_store(job["endpoint"], job["bucket"])
    cluster = LocalCluster(cfg)
    try:
        cluster.start_in_thread(lambda m: print(m, flush=True))
        outs = []
        with PreftClient(cluster.address, timeout=120) as c:
            for name, path in job["uploads"].items():   # after start-up: staged through S3
                c.register_adapter(name, path)
            for r in job["requests"]:
                done = c.generate(r["adapter"], prompt_token_ids=r["ids"],
                                  max_tokens=r["max_tokens"])
                outs.append({"tokens": list(done.token_ids), "kv_bytes": done.kv_bytes,
                             "kv_transport": done.kv_transport})
            shas = {n: a.sha256 for n, a in c.list_adapters().items()}
        placement, cache = where(cluster, cfg)
        page = boto3.client("s3").list_objects_v2(Bucket=job["bucket"])
        keys = sorted(o["Key"] for o in page.get("Contents", ()))
        Path(out_path).write_text(json.dumps({"outputs": outs, "placement": placement,
                                              "store_keys": keys, "prefill_cache": cache,
                                              "sha256": shas}))
        return 0
    finally:
        cluster.stop()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
