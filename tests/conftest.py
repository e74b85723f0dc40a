"""Shared fixtures. Engines are expensive (~15 s, ~1.7 GiB each): one cluster per session.

Tiers: tests/unit (no engine), tests/integration (real vLLM on a tiny local model, real Ray,
gRPC on port 0), tests/gpu (skipped without CUDA).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# The s3:// adapter store's settings reach Ray's worker processes as they reach a real
# node's: from AWS config files (a node's ~/.aws/config and ~/.aws/credentials). Ray's node
# processes keep the environment they started with, and the first cluster of the session
# starts them, so the files' paths are set here, before any node starts; the s3:// tests
# (tests/s3_server.py: aws_profile) write the files while their S3 server runs and remove
# them afterwards. This also keeps the suite off the developer's own ~/.aws.
AWS_DIR = Path(tempfile.mkdtemp(prefix="preft-aws-"))
os.environ["AWS_CONFIG_FILE"] = str(AWS_DIR / "config")
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(AWS_DIR / "credentials")

ADAPTER_SEEDS = {"ada": 11, "bea": 22, "cid": 33, "dov": 44}
# ReFT-P adapters (app.tiny.make_reft_adapter keyword arguments), registered at startup.
REFT_ADAPTERS = {
    "rlo": dict(seed=51, intervention="loreft", layers=(1, 3), rank=4, positions="all"),
    "rdi": dict(seed=52, intervention="direft", layers=(0, 2), rank=8, positions="all"),
    "rfl": dict(seed=53, intervention="loreft", layers=(1, 2), rank=4, positions="f3+l3"),
    "rdf": dict(seed=54, intervention="direft", layers=(1, 2), rank=4, positions="f4"),
}
# Activated-LoRA adapters (app.tiny.make_alora_adapter), one per shape of target modules;
# both are invoked by the same token ids, so two adapters can share one context's prefix.
ALORA_INVOCATION = (5, 6, 7)
ALORA_ADAPTERS = {
    "ala": dict(seed=61, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "alm": dict(seed=62, targets=("gate_proj", "up_proj", "down_proj"), rank=4),
}


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tiny model (GQA: 8 query heads, 2 KV heads, head size 32; its own context length is
    1024 tokens), four LoRA-P adapters, four ReFT-P adapters and two aLoRA adapters."""
    from app.tiny import (TinyModelSpec, make_alora_adapter, make_lora_adapter, make_reft_adapter,
                          make_tiny_model)

    root = tmp_path_factory.mktemp("assets")
    model = make_tiny_model(root / "model", TinyModelSpec(max_position_embeddings=1024))
    adapters = {n: make_lora_adapter(root / n, model, seed=s) for n, s in ADAPTER_SEEDS.items()}
    # A replacement version of "ada" (different weights), registered during a test.
    adapters["ada_v2"] = make_lora_adapter(root / "ada_v2", model, seed=99)
    adapters.update({n: make_reft_adapter(root / n, model, **kw) for n, kw in REFT_ADAPTERS.items()})
    adapters.update({n: make_alora_adapter(root / n, model, invocation=ALORA_INVOCATION, **kw)
                     for n, kw in ALORA_ADAPTERS.items()})
    return {"model": str(model), "adapters": {k: str(v) for k, v in adapters.items()},
            "root": root}


class DemoHome(NamedTuple):
    home: Path                  # $PREFT_HOME; the demo is under home / "demo"
    model: str
    adapters: dict[str, str]    # alice, bob, carol -> adapter directory
    rec: dict                   # demo.json
    ticks: list                 # the build's (what, done, total) progress calls


@pytest.fixture(scope="session")
def demo_home():
    """The embedded demo (trainer/demo.py: base model + alice, bob, carol; ~3-4 CPU minutes),
    built once per session into ``$PREFT_HOME`` (scripts/test.sh points it at a fresh temp
    dir; unset, a temp dir here, exported), where ``preft up`` without ``--model`` finds it,
    in this process and in subprocesses. ``ticks``: the build's progress calls (empty when
    ``$PREFT_HOME`` already held this demo)."""
    import fcntl

    from trainer.demo import build

    home = Path(os.environ.get("PREFT_HOME") or tempfile.mkdtemp(prefix="preft-home-"))
    os.environ["PREFT_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    ticks: list[tuple[str, int, int]] = []
    with open(home / ".demo.lock", "w") as lock:   # another session on the same home waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        model, adapters, rec = build(home, progress=lambda w, d, t: ticks.append((w, d, t)))
    return DemoHome(home, str(model), {k: str(v) for k, v in adapters.items()}, rec, ticks)


@pytest.fixture(scope="session")
def reference(assets):
    from reference import Reference

    return Reference(assets["model"])


@pytest.fixture(scope="session")
def single_engine(assets):
    """One plain vLLM engine on the base model (``vllm.LLM``, in this process): what a
    single engine does with stop strings, ``min_tokens`` and seeds. One per session: the
    prefill/decode and colocated tests compare against the same engine."""
    import gc

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    llm = LLM(model=assets["model"], enforce_eager=True, distributed_executor_backend="uni",
              dtype="float32", max_model_len=1024, max_num_seqs=4,
              enable_prefix_caching=False, seed=0)
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def cluster(assets):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)
    from app.launcher import LocalCluster

    # No max_model_len: the engines take the model's own 1024 (tests/integration/
    # test_model_limits.py), so the whole suite runs on the default.
    eng = EngineConfig(model=assets["model"])
    adapters = tuple((n, assets["adapters"][n]) for n in [*ADAPTER_SEEDS, *REFT_ADAPTERS])
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        router=RouterConfig(port=0), adapters=adapters,
                        run_dir=str(assets["root"] / "run"))
    c = LocalCluster(cfg).start_in_thread()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def gateway(cluster):
    """The OpenAI-compatible HTTP gateway of the session cluster, in the router's process
    (``preft up --http-port``'s shape: Generate called in-process)."""
    gw = cluster.start_http(timeout=120)
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def client(cluster):
    from preft_client import PreftClient

    with PreftClient(cluster.address, timeout=120) as c:
        yield c


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)
