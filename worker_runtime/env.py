"""Process environment for an in-process vLLM engine; call before ``import vllm``."""

from __future__ import annotations

import math
import os


def configure_engine_process(kv_cache_gib: float, cpu_cores: str | None) -> None:
    """In-process engine (no engine-core subprocess), fixed KV space, bound OpenMP threads.

    ``cpu_cores`` is a vLLM binding string ("0", "0-3", "0,2"); on a small machine the
    prefill and decode engines get disjoint cores so neither starves the other.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d store idle-wait chatter
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu_cores:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
        n = _count_cores(cpu_cores)
        os.environ["OMP_NUM_THREADS"] = str(n)
    else:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")


def _count_cores(spec: str) -> int:
    n = 0
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            n += int(b) - int(a) + 1
        elif part:
            n += 1
    return max(1, n)


def resolve_kv_host(kv_host: str) -> str:
    """``"auto"``: the IP of the Ray node this worker runs on (what peers on other nodes
    reach; e.g. a KubeRay pod IP); anything else is used as given."""
    if kv_host != "auto":
        return kv_host
    import ray

    return ray.util.get_node_ip_address()
