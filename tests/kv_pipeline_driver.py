"""Driver run in its own process by tests/integration/test_kv_pipelining.py.

One real vLLM prefill engine with our connector (vLLM keeps one KV connector per process,
hence a process of its own) prefilling long prompts in several chunks, and two decode-side
transports pulling from it (same-host shared memory, and gloo as across hosts). Writes what
happened as JSON: whether each prompt was staged, whether the pulled bytes equal the
engine's own cache blocks, and what stayed held after a prompt aborted halfway.

    python tests/kv_pipeline_driver.py MODEL_DIR OUT.json
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

CHUNK = 64                  # tokens per engine step: a 300-token prompt takes 5 steps
PROMPT = 300


def _engine(model_dir: str, endpoint):
    from vllm import EngineArgs
    from vllm.config import KVTransferConfig
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=model_dir, dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
        max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, max_model_len=1024,
        kv_transfer_config=KVTransferConfig(
            kv_connector="PreftKVConnector", kv_connector_module_path="kv_transfer.connector",
            kv_role="kv_producer", engine_id=endpoint.engine_id, kv_load_failure_policy="fail",
            kv_connector_extra_config={"endpoint": endpoint}))
    return LLMEngine.from_engine_args(args)


def _decode_side(layout, shared_memory: bool):
    import torch

    from kv_transfer.transport import TorchDistTransport

    layers = [torch.zeros((16, *layout.block_shape)) for _ in range(layout.num_layers)]
    return TorchDistTransport(layers, layout, local_host="127.0.0.1", timeout_s=10,
                              engine_name=f"decode-{'shm' if shared_memory else 'gloo'}",
                              secret="s", shared_memory=shared_memory), layers


def main(model_dir: str, out_path: str) -> int:
    import torch
    from vllm import SamplingParams

    from kv_transfer import connector
    from kv_transfer.endpoint import KVEndpoint

    finished_blocks: dict[str, list[int]] = {}
    real_finished = connector.PreftConnectorScheduler.request_finished

    def request_finished(self, request, block_ids):   # which blocks each prompt had
        finished_blocks[request.request_id] = list(block_ids)
        return real_finished(self, request, block_ids)

    connector.PreftConnectorScheduler.request_finished = request_finished
    ep = KVEndpoint("prefill-drv", "kv_producer", timeout_s=10, hold_ttl_s=60, secret="s")
    eng = _engine(model_dir, ep)
    pool = eng.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    sp = SamplingParams(max_tokens=1, detokenize=False,
                        extra_args={"kv_transfer_params": {"do_remote_decode": True}})

    def run(rid: str, prompt: list[int], abort_after: int | None = None):
        eng.add_request(rid, {"prompt_token_ids": prompt}, sp)
        steps, params = 0, None
        while eng.has_unfinished_requests():
            for o in eng.step():
                params = o.kv_transfer_params or params
            steps += 1
            if abort_after is not None and steps == abort_after:
                eng.abort_request([rid])
        eng.step()   # let vLLM free what the finish released
        return steps, params

    out = {"prompts": []}
    for k, shared_memory in enumerate((True, False)):
        prompt = [(7 * i + 13 * k) % 500 + 3 for i in range(PROMPT)]
        steps, params = run(f"full-{k}", prompt)
        rid = next(r for r in finished_blocks if r.startswith(f"full-{k}"))
        src = finished_blocks[rid][:params["num_blocks"]]
        cons, dst_layers = _decode_side(ep.layout, shared_memory)
        dst = list(range(1, 1 + len(src)))
        rec = cons.pull(*ep.address, params["transfer_id"], 0, dst)
        equal = all(torch.equal(d[dst], s[src]) for d, s in zip(dst_layers, ep.transport.layers))
        cons.close()
        out["prompts"].append({"steps": steps, "blocks": len(src), "pipelined": rec.pipelined,
                               "transport": rec.transport, "bytes_equal": equal,
                               "free_after": pool.get_num_free_blocks()})
    steps, params = run("aborted", [(11 * i) % 500 + 3 for i in range(PROMPT)], abort_after=2)
    out["aborted"] = {"steps": steps, "params": params, "offers": len(ep.offers),
                      "staging": ep.staging.stats(), "finished": sorted(ep.take_finished()),
                      "blocks_free": pool.get_num_free_blocks(),
                      "blocks_total": pool.num_gpu_blocks - 1}
    ep.close()
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
