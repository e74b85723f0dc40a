"""Process environment for an in-process vLLM engine; call before ``import vllm``."""

from __future__ import annotations

import math
import os


def configure_engine_process(kv_cache_gib: float, cpu_cores: str | None,
                             tp_size: int = 1) -> None:
    """In-process engine (no engine-core subprocess), fixed KV space, bound OpenMP threads.

    ``cpu_cores`` is a vLLM binding string ("0", "0-3", "0,2"); on a small machine the
    prefill and decode engines get disjoint cores so neither starves the other. A
    tensor-parallel engine's ranks (``tp_size`` > 1, CPU) split them (``rank_cores``).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d store idle-wait chatter
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if tp_size > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = rank_cores(cpu_cores, tp_size)
    elif cpu_cores:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
        n = _count_cores(cpu_cores)
        os.environ["OMP_NUM_THREADS"] = str(n)
    else:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")


def rank_cores(cpu_cores: str | None, tp_size: int) -> str:
    """vLLM's per-rank binding (``"0|1"``): the engine's cores (None: the process's)
    dealt to its ranks in turn; with fewer cores than ranks, ranks share cores."""
    cores = parse_cores(cpu_cores) if cpu_cores else sorted(os.sched_getaffinity(0))
    if len(cores) < tp_size:
        return "|".join(str(cores[r % len(cores)]) for r in range(tp_size))
    return "|".join(",".join(map(str, cores[r::tp_size])) for r in range(tp_size))


def _count_cores(spec: str) -> int:
    return max(1, len(parse_cores(spec)))


def parse_cores(spec: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]``."""
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


def use_engine_cores(cpu_cores: str | None) -> None:
    """On the engine thread, before the engine is built: its OpenMP team gets one thread
    per core in ``cpu_cores``, and the thread (and the OpenMP workers it starts) runs on
    those cores only.

    vLLM's own CPU executor binds the worker *processes* it starts; our in-process engine
    runs in a Ray worker whose ``OMP_NUM_THREADS`` Ray set to its CPU slots (1) before
    torch loaded, so without this every GEMM of a multi-core engine ran on one thread
    (measured: a colocated engine on 2 cores ran at its 1-core speed). ``None``: leave
    the process's threads as they are (clusters where Ray places the workers).
    """
    if not cpu_cores:
        return
    import torch

    cores = parse_cores(cpu_cores)
    os.sched_setaffinity(0, cores)       # Linux: 0 = the calling thread
    torch.set_num_threads(len(cores))    # before vLLM's CPU worker disables set_num_threads


def resolve_kv_host(kv_host: str) -> str:
    """``"auto"``: the IP of the Ray node this worker runs on (what peers on other nodes
    reach; e.g. a KubeRay pod IP); anything else is used as given."""
    if kv_host != "auto":
        return kv_host
    import ray

    return ray.util.get_node_ip_address()


def name_this_thread(name: str) -> None:
    """Give the calling thread an OS name (Linux ``prctl(PR_SET_NAME)``, 15 bytes), so
    ``top -H``, ``py-spy`` and ``bench/stack.py`` tell a worker's engine thread
    (``preft-engine``) from its event loop (``preft-loop``). A no-op where unsupported."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)
    except Exception:
        pass
