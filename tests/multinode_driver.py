"""Driver run inside network namespace A by tests/integration/test_multinode.py.

Joins the two-node Ray cluster (head in namespace A, second node in namespace B), starts a
PreFT cluster on it with the prefill pool pinned to A (resource ``prefill_node``) and the
decode pool to B (``decode_node``), sends greedy requests and writes what happened as JSON:
tokens, KV bytes, and the node IP of each worker actor.

    python tests/multinode_driver.py CONFIG.yaml REQUESTS.json OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(cfg_path: str, requests_path: str, out_path: str) -> int:
    import ray
    import yaml

    from cluster.config import ClusterConfig, from_dict
    from app.launcher import LocalCluster
    from preft_client import PreftClient

    cfg = from_dict(ClusterConfig, yaml.safe_load(Path(cfg_path).read_text()))
    reqs = json.loads(Path(requests_path).read_text())
    cluster = LocalCluster(cfg)
    try:
        cluster.start_in_thread(lambda m: print(m, flush=True))
        outs = []
        with PreftClient(cluster.address, timeout=120) as c:
            for r in reqs:
                done = c.generate(r["adapter"], prompt_token_ids=r["ids"],
                                  max_tokens=r["max_tokens"])
                outs.append({"tokens": list(done.token_ids), "kv_bytes": done.kv_bytes,
                             "kv_transport": done.kv_transport})
        nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        placement = {}
        for w in cluster.pool.all():   # ask each actor which node it runs on
            node = ray.get(w.actor.__ray_call__.remote(
                lambda self: __import__("ray").get_runtime_context().get_node_id()))
            placement[f"{cfg.name}-{w.worker_id}"] = nodes.get(node)
        Path(out_path).write_text(json.dumps({"outputs": outs, "placement": placement}))
        return 0
    finally:
        cluster.stop()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
