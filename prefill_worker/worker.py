"""The prefill worker: step 3 of the request path.

A Ray actor owning a vLLM engine with LoRA enabled and our KV connector as producer. Per
request it applies the adapter over the prompt, samples the first output token (so that
token *is* produced with the adapter), and keeps the prompt's KV blocks until the decode
worker pulls them (or a TTL frees them). It returns a :class:`~cluster.messages.PrefillResult`
carrying the first token and a :class:`~kv_transfer.handle.KVHandle`.

The KV of a prompt is salted with the adapter's name and version (vLLM's ``cache_salt``), so
prefix caching never serves one adapter's KV to another, or to a replaced version.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from contextvars import ContextVar
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.config import PrefillConfig
from cluster.errors import AdapterNotFound, InvalidAdapter, InvalidRequest, WorkerUnavailable
from cluster.messages import AdapterRef, PrefillRequest, PrefillResult, Sampling, WorkerInfo
from cluster.state import MemberRecord
from prefill_worker.adapters.base import AdapterSpec
from kv_transfer.handle import KVHandle
from prefill_worker.reft_runtime import EXTRA_ARG as REFT_EXTRA_ARG
from worker_runtime.engine_loop import as_request_error
from worker_runtime.env import resolve_kv_host
from worker_runtime.output_stream import OutputStream

# The tier this task's last adapter lookup was served from (engine | disk | store).
_TIER: ContextVar[str] = ContextVar("preft_adapter_tier", default="")


@dataclass(frozen=True)
class _AdapterArgs:
    """What one request's adapter adds to its engine request."""

    namespace: str                  # the prompt KV's cache salt
    lora: object = None             # vLLM LoRARequest (lora_p)
    reft_key: str | None = None     # ReFT-P runtime key (reft_p) and its pinned weights
    reft_weights: object = None
    tier: str = ""                  # engine | disk | store ("" for the base model)
    load_s: float = 0.0


@dataclass(frozen=True)
class AdapterEntry:
    ref: AdapterRef
    path: str            # this worker's disk-tier copy
    lora_int_id: int


BASE_NAMESPACE = "base"
HEARTBEAT_S = 1.0


class PrefillWorker:
    """Ray actor (``ray.remote(PrefillWorker)``); all public methods are async.

    Adapter tiers, fastest first: the engine's own LoRA cache (``max_loras`` slots in the
    batch, ``max_cpu_loras`` in host memory, LRU), this worker's disk cache
    (``<cache_dir>/<sha256>``), the store URI from the registry.
    """

    def __init__(self, cfg: PrefillConfig, worker_id: str, redis_url: str | None = None,
                 cache_dir: str | None = None, actor_name: str = "") -> None:
        from worker_runtime.env import configure_engine_process

        configure_engine_process(cfg.engine.kv_cache_gib, cfg.cpu_cores)
        self.cfg = cfg
        self.worker_id = worker_id
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix=f"preft-{worker_id}-"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._adapters: dict[str, AdapterEntry] = {}
        self._lora_ids = itertools.count(1)
        self._lock = threading.Lock()
        # Mirror of the engine's adapter LRU (max_cpu_loras): which ids vLLM still holds.
        self._engine_loras: OrderedDict[int, None] = OrderedDict()
        self._resolving: dict[str, asyncio.Lock] = {}
        self.tier_hits = {"engine": 0, "disk": 0, "store": 0}
        from worker_runtime.ray_metrics import WorkerMetrics

        self.metrics = WorkerMetrics("prefill", worker_id)
        from prefill_worker.reft_runtime import ReftRuntime

        self.reft = ReftRuntime(cfg.max_cpu_loras)  # ReFT-P: engine hook + host-memory tier
        self._load_base_shape()
        self._install_lora_kernel()
        from kv_transfer.runtime import hooks_for
        from worker_runtime.engine_loop import EngineLoop

        self.hooks = hooks_for(worker_id)
        self.loop = EngineLoop(self._build_engine, f"prefill:{worker_id}", wake=self.hooks.wake)
        self.loop.start()
        self.tokenizer = self.loop.engine.get_tokenizer()
        if not self.hooks.ready.wait(30):
            raise WorkerUnavailable(f"{worker_id}: KV connector did not register its caches")
        self.heartbeat = None
        if redis_url:
            from worker_runtime.heartbeat import Heartbeat

            host, port = self.hooks.address
            self.heartbeat = Heartbeat(redis_url, MemberRecord(
                worker_id, "prefill", actor_name, self.hooks.layout_fingerprint,
                node=socket.gethostname(), kv_address=f"{host}:{port}"), HEARTBEAT_S,
                residency=self.residency, on_members=lambda ms: self.hooks.transport.prune(
                    live_peers={m.worker_id for m in ms.values() if m.role == "decode"}))
            self.heartbeat.start()

    # ------------------------------------------------------------------ setup
    def _load_base_shape(self) -> None:
        from transformers import AutoConfig

        from prefill_worker.adapters.base import BaseModelShape

        hf = AutoConfig.from_pretrained(self.cfg.engine.model)
        self.base_shape = BaseModelShape.from_hf_config(hf)
        self.vocab_size = hf.vocab_size
        self.eos_token_id = hf.eos_token_id if isinstance(hf.eos_token_id, int) else None

    def _install_lora_kernel(self) -> None:
        """Grouped per-adapter GEMMs instead of vLLM's per-token CPU ops (CPU only; GPU
        engines keep vLLM's punica kernels). Must precede engine construction."""
        if self.cfg.lora_kernel != "grouped":
            return
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from prefill_worker.grouped_lora import install_grouped_lora

            install_grouped_lora()

    def _build_engine(self):
        from vllm import EngineArgs
        from vllm.config import KVTransferConfig
        from vllm.v1.engine.llm_engine import LLMEngine

        e, t = self.cfg.engine, self.cfg.transfer
        args = EngineArgs(
            model=e.model, dtype=e.dtype, max_model_len=e.max_model_len, seed=e.seed,
            load_format=e.load_format, max_num_batched_tokens=e.max_num_batched_tokens,
            enforce_eager=e.enforce_eager, distributed_executor_backend="uni",
            enable_prefix_caching=e.enable_prefix_caching, max_num_seqs=e.max_num_seqs,
            enable_lora=True, max_lora_rank=self.cfg.max_lora_rank,
            max_loras=self.cfg.max_loras, max_cpu_loras=self.cfg.max_cpu_loras,
            disable_log_stats=True,
            kv_transfer_config=KVTransferConfig(
                kv_connector="PreftKVConnector",
                kv_connector_module_path="kv_transfer.connector",
                kv_role="kv_producer", engine_id=self.worker_id,
                kv_connector_extra_config={
                    "kv_host": resolve_kv_host(t.kv_host), "transfer_timeout_s": t.timeout_s,
                    "hold_ttl_s": t.hold_ttl_s, "transport": t.transport}))
        engine = LLMEngine.from_engine_args(args)
        self.reft.install(engine)
        return engine

    # ------------------------------------------------------------------ adapters
    async def validate_adapter(self, path: str) -> AdapterSpec:
        """Full validation of a staged upload (the router has no torch)."""
        from prefill_worker.adapters import validate_adapter

        return await asyncio.to_thread(validate_adapter, path, self.base_shape,
                                       max_rank=self.cfg.max_lora_rank,
                                       max_bytes=self.cfg.max_adapter_bytes)

    def _fetch(self, ref: AdapterRef) -> tuple[Path, str]:
        """Disk tier: ``<cache_dir>/<sha256>``, fetched from the store and verified."""
        from cluster.adapter_store import digest_dir, store_of

        local = self.cache_dir / ref.sha256
        if local.is_dir():
            return local, "disk"
        tmp = self.cache_dir / f".fetch-{ref.sha256}-{threading.get_ident()}"
        store_of(ref.uri).fetch(ref.uri, tmp)
        sha, _ = digest_dir(tmp)
        if sha != ref.sha256:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InvalidAdapter(f"adapter {ref.name} v{ref.version}: store copy has sha256 "
                                 f"{sha[:12]}..., registry says {ref.sha256[:12]}...")
        try:
            tmp.rename(local)
        except OSError:  # another fetch of the same content won the race
            shutil.rmtree(tmp, ignore_errors=True)
        return local, "store"

    async def _resolve(self, ref: AdapterRef):
        lock = self._resolving.setdefault(ref.name, asyncio.Lock())
        async with lock:  # concurrent first requests for one adapter fetch it once
            return await self._resolve_locked(ref)

    async def _resolve_locked(self, ref: AdapterRef):
        from vllm.lora.request import LoRARequest

        entry = self._adapters.get(ref.name)
        if entry is not None and entry.ref.version > ref.version:
            raise AdapterNotFound(ref.name)  # the router's view is stale: an older version
        if entry is not None and entry.ref == ref:
            tier = "engine" if self._hot(entry) else "disk"
        else:
            path, tier = await asyncio.to_thread(self._fetch, ref)
            with self._lock:
                old = self._adapters.get(ref.name)
                entry = AdapterEntry(ref, str(path), next(self._lora_ids))
                self._adapters[ref.name] = entry
            if old is not None:  # replaced: drop the old version from the engine's tiers
                await self._evict(old)
        self.tier_hits[tier] += 1
        _TIER.set(tier)  # read back by prefill() in the same task
        if ref.kind == "reft_p":
            return await self._reft_weights(entry)
        self._engine_loras[entry.lora_int_id] = None
        self._engine_loras.move_to_end(entry.lora_int_id)
        while len(self._engine_loras) > self.cfg.max_cpu_loras:  # vLLM's LRU evicts too
            self._engine_loras.popitem(last=False)
        return LoRARequest(ref.namespace, entry.lora_int_id, entry.path)

    @staticmethod
    def _reft_key(entry: AdapterEntry) -> str:
        return f"reft:{entry.lora_int_id}"

    def _hot(self, entry: AdapterEntry) -> bool:
        if entry.ref.kind == "reft_p":
            return self._reft_key(entry) in self.reft
        return entry.lora_int_id in self._engine_loras

    async def _reft_weights(self, entry: AdapterEntry):
        """ReFT-P: (runtime key, loaded weights), from host memory or the disk tier."""
        from prefill_worker.adapters import reft_p

        if self.reft.unsupported:
            raise InvalidAdapter(f"adapter {entry.ref.name}: this prefill worker cannot apply "
                                 f"ReFT-P adapters ({self.reft.unsupported})")
        key = self._reft_key(entry)
        weights = self.reft.cached(key)
        if weights is None:
            weights = await asyncio.to_thread(reft_p.load, entry.path, self.base_shape,
                                              self.cfg.max_lora_rank)
            self.reft.put(key, weights)
        return key, weights

    async def _evict(self, entry: AdapterEntry) -> None:
        if entry.ref.kind == "reft_p":
            self.reft.drop(self._reft_key(entry))
        else:
            await self._remove_lora(entry.lora_int_id)

    async def _remove_lora(self, lora_id: int) -> None:
        self._engine_loras.pop(lora_id, None)
        await self.loop.call(lambda eng: eng.remove_lora(lora_id))

    async def drop_adapter(self, name: str) -> bool:
        """Deleted from the registry: remove it from every tier on this worker."""
        with self._lock:
            entry = self._adapters.pop(name, None)
        if entry is None:
            return False
        await self._evict(entry)
        if not any(e.ref.sha256 == entry.ref.sha256 for e in self._adapters.values()):
            shutil.rmtree(self.cache_dir / entry.ref.sha256, ignore_errors=True)
        return True

    async def invalidate(self, name: str, version: int) -> bool:
        """A newer version was registered: drop any older one held here."""
        entry = self._adapters.get(name)
        if entry is not None and entry.ref.version < version:
            return await self.drop_adapter(name)
        return False

    def residency(self) -> dict[str, str]:
        return {n: f"{'engine' if self._hot(e) else 'disk'}@v{e.ref.version}"
                for n, e in list(self._adapters.items())}

    # ------------------------------------------------------------------ API
    async def info(self) -> WorkerInfo:
        mc = self.loop.engine.model_config
        return WorkerInfo(
            worker_id=self.worker_id, role="prefill", kv_layout=self.hooks.layout_fingerprint,
            max_model_len=mc.max_model_len, vocab_size=self.vocab_size,
            eos_token_id=self.eos_token_id, lora_enabled=True,
            engine_start_s=self.loop.start_s, pid=os.getpid())

    async def release(self, transfer_id: int) -> bool:
        return self.hooks.offers.release_local(transfer_id)

    async def held_transfers(self) -> int:
        return len(self.hooks.offers)

    async def stats(self) -> dict:
        recs = list(self.hooks.records)
        return {"transfers": len(recs), "bytes": sum(r.bytes for r in recs),
                "failed": sum(not r.ok for r in recs), "held": len(self.hooks.offers),
                "expired": self.hooks.offers.expired, "requests": self.loop.num_requests,
                "tier_hits": dict(self.tier_hits), "resident": self.residency()}

    def _tokenize(self, req: PrefillRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            if not ids:
                raise InvalidRequest("prompt_token_ids", "the prompt is empty")
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise InvalidRequest("prompt_token_ids", f"token id {bad[0]} is outside the "
                                     f"vocabulary [0, {self.vocab_size})")
            return ids
        if not req.prompt_text:
            raise InvalidRequest("prompt", "the prompt is empty")
        ids = self.tokenizer.encode(req.prompt_text, add_special_tokens=True)
        if not ids:
            raise InvalidRequest("prompt", "the prompt has no tokens")
        return ids

    def _check_lengths(self, ids: list[int], s: Sampling) -> None:
        max_len = self.loop.engine.model_config.max_model_len
        if len(ids) >= max_len:
            raise InvalidRequest("prompt", f"the prompt has {len(ids)} tokens; this model "
                                 f"accepts at most {max_len - 1} prompt tokens")
        if len(ids) + s.max_tokens > max_len:
            raise InvalidRequest("max_tokens", f"prompt ({len(ids)} tokens) + max_tokens "
                                 f"({s.max_tokens}) exceeds max_model_len={max_len}; lower "
                                 f"max_tokens to at most {max_len - len(ids)}")

    async def _adapter_args(self, ref: AdapterRef | None, prompt_len: int) -> _AdapterArgs:
        """The adapter's engine arguments and the prompt KV's cache salt."""
        if ref is None:
            return _AdapterArgs(namespace=BASE_NAMESPACE)
        t_r = time.time()
        resolved = await self._resolve(ref)
        tier, load_s = _TIER.get(), time.time() - t_r
        if ref.kind != "reft_p":
            return _AdapterArgs(ref.namespace, lora=resolved, tier=tier, load_s=load_s)
        reft_key, weights = resolved  # applied by the engine hook (reft_runtime)
        namespace = ref.namespace
        if weights.positions.depends_on_length:
            # Which positions are intervened depends on the prompt's length: KV made for one
            # length is never reused for another.
            namespace = f"{namespace}/len{prompt_len}"
        return _AdapterArgs(namespace, reft_key=reft_key, reft_weights=weights, tier=tier,
                            load_s=load_s)

    async def _run_prompt(self, req: PrefillRequest, ids: list[int], a: _AdapterArgs,
                          params):
        """One engine request over the prompt; ReFT weights pinned while the engine has it."""
        from vllm.inputs import TokensPrompt

        if a.reft_key is not None:
            self.reft.acquire(a.reft_key, a.reft_weights)
        pinned = a.reft_key
        try:
            q = self.loop.submit(req.request_id, TokensPrompt(prompt_token_ids=ids,
                                                              cache_salt=a.namespace),
                                 params, lora_request=a.lora)
            out = await q.get()
        except BaseException:
            self.loop.abort(req.request_id)
            if pinned is not None:  # unpin only after the engine thread drops the request
                try:
                    self.loop.call(lambda _eng, k=pinned: self.reft.release(k))
                except RuntimeError:
                    self.reft.release(pinned)
                pinned = None
            raise
        finally:
            if pinned is not None:
                self.reft.release(pinned)
        if isinstance(out, BaseException):
            raise as_request_error(out)
        return out

    def _sampling_params(self, s: Sampling, hand_over: bool, extra: dict):
        """One token, sampled with the adapter. No detokenization or stop strings in the
        engine: the request's :class:`OutputStream` owns both, for every generated token."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if hand_over:
            extra["kv_transfer_params"] = {"do_remote_decode": True}
        return SamplingParams(
            max_tokens=1, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
            ignore_eos=s.ignore_eos, detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY, extra_args=extra or None)

    def _handle(self, out, finish: str | None) -> KVHandle | None:
        """The KV handle for decode, or (the request ended here) its blocks freed now."""
        params_out = out.kv_transfer_params or {}
        if "transfer_id" not in params_out:
            if finish is None:
                raise WorkerUnavailable(f"{self.worker_id}: the engine kept no KV for the prompt")
            return None
        if finish is not None:  # ended at prefill: nobody will pull
            self.hooks.offers.release_local(params_out["transfer_id"])
            return None
        host, port = self.hooks.address
        return KVHandle(params_out["transfer_id"], host, port, self.worker_id,
                        params_out["num_tokens"], params_out["num_blocks"],
                        self.hooks.layout_fingerprint)

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        t_in = time.time()
        s = req.sampling
        ids = self._tokenize(req)
        self._check_lengths(ids, s)
        a = await self._adapter_args(req.adapter, len(ids))
        hand_over = s.max_tokens > 1
        extra = {REFT_EXTRA_ARG: a.reft_key} if a.reft_key is not None else {}
        t0 = time.time()
        out = await self._run_prompt(req, ids, a, self._sampling_params(s, hand_over, extra))
        comp = out.outputs[0]
        if not comp.token_ids:
            raise WorkerUnavailable(f"{self.worker_id}: prefill produced no token "
                                    f"(finish_reason={comp.finish_reason})")
        first = comp.token_ids[0]
        # The first generated token enters the request's output stream (the decode worker
        # replays it): EOS, a stop string inside its text, or max_tokens=1 end it here.
        engine_finish = "stop" if comp.finish_reason == "stop" else (
            None if hand_over else "length")
        step = OutputStream(self.tokenizer, s, req.request_id).append([first], engine_finish)
        kv = self._handle(out, step.finish_reason)
        prefill_s = time.time() - t0
        self.metrics.request(len(ids), prefill_s)
        self.metrics.adapter(a.tier)
        return PrefillResult(
            request_id=req.request_id, prompt_token_ids=tuple(ids), first_token=first,
            first_text=step.text, finish_reason=step.finish_reason, kv=kv,
            kv_namespace=a.namespace, queue_s=max(0.0, t0 - (req.enqueued_at or t_in)),
            prefill_s=prefill_s, adapter_tier=a.tier, adapter_load_s=a.load_s)

    async def shutdown(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.loop.stop()

