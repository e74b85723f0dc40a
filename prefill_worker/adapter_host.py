"""Adapters on one engine worker: tiers, loading, validation (step 3's adapter half).

Used by the two pools that apply adapters: prefill workers and colocated workers (the
decode pool never imports it), both built on :class:`AdapterWorker`, which holds an
:class:`AdapterHost` and answers the router's adapter calls. Tiers, fastest first: the engine's own LoRA cache
(``max_loras`` slots in the batch, ``max_cpu_loras`` in host memory, LRU) or, for ReFT-P,
the runtime's pinned host-memory LRU; this worker's disk cache (``<cache_dir>/<sha256>``,
verified against the registry's sha256); the store URI from the registry. The router passes
an :class:`~cluster.messages.AdapterRef` (name, version, sha256, URI) with each request,
so a worker loads a new version on first use and never serves a stale one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import (AdapterMismatch, AdapterNotFound, AdapterStoreError,
                            InvalidAdapter)
from cluster.messages import AdapterRef, PrefillRequest, WorkerInfo
from worker_runtime.engine_worker import EngineWorker
from worker_runtime.sequence import check_lengths, check_sampling_ids, prompt_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterEntry:
    ref: AdapterRef
    path: str            # this worker's disk-tier copy (aLoRA: the engine's view of it)
    lora_int_id: int
    invocation: tuple[int, ...] = ()   # aLoRA: the invocation tokens


@dataclass(frozen=True)
class Resolved:
    """A request's adapter, ready for the engine, and where it came from."""

    ref: AdapterRef
    tier: str                       # engine | disk | store
    load_s: float
    lora: Any = None                # vLLM LoRARequest (lora_p, lora, alora)
    invocation: tuple[int, ...] = ()   # aLoRA: the invocation tokens
    reft_key: str | None = None     # ReFT-P runtime key and its loaded weights (reft_p)
    reft_weights: Any = None


class AdapterHost:
    """One worker's adapters. ``cfg`` is the pool's config (``PrefillConfig`` or
    ``ColocatedConfig``: ``engine``, ``max_lora_rank``, ``max_cpu_loras``,
    ``max_adapter_bytes``, ``lora_kernel``); ``loop`` the worker's :class:`EngineLoop`."""

    def __init__(self, cfg, cache_dir: Path) -> None:
        from prefill_worker.reft_runtime import ReftRuntime

        self.cfg = cfg
        self.cache_dir = cache_dir
        self.loop = None
        self._adapters: dict[str, AdapterEntry] = {}
        self._lora_ids = itertools.count(1)
        self._lock = threading.Lock()
        # Mirror of the engine's adapter LRU (max_cpu_loras): which ids vLLM still holds;
        # pinned ids (the router's hot set here, lora_pins.py) are never evicted.
        self._engine_loras: OrderedDict[int, None] = OrderedDict()
        self._pinned: set[int] = set()
        self._resolving: dict[str, asyncio.Lock] = {}
        self.tier_hits = {"engine": 0, "disk": 0, "store": 0}
        self.pin_loads = 0   # adapters set_pins loaded into the engine (not a request's)
        self._ended_early: dict[str, int] = {}   # ReFT-P pins prompt_done already released
        self._pin_lock = threading.Lock()        # engine thread vs the worker's event loop
        self.reft = ReftRuntime(cfg.max_cpu_loras)  # ReFT-P: engine hook + host-memory tier
        self._load_base_shape()

    # ------------------------------------------------------------------ engine set-up
    def _load_base_shape(self) -> None:
        from transformers import AutoConfig

        from prefill_worker.adapters.base import BaseModelShape

        hf = AutoConfig.from_pretrained(self.cfg.engine.model)
        self.base_shape = BaseModelShape.from_hf_config(hf)
        self.vocab_size = hf.vocab_size
        self.eos_token_id = hf.eos_token_id if isinstance(hf.eos_token_id, int) else None

    def install_kernel(self) -> None:
        """Grouped per-adapter GEMMs instead of vLLM's per-token CPU ops (CPU only; GPU
        engines keep vLLM's punica kernels). Must precede engine construction."""
        if self.cfg.lora_kernel != "grouped":
            return
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and self.cfg.engine.tensor_parallel_size > 1:
            # the ranks are processes vLLM starts: its plugin installs it in each
            os.environ["PREFT_LORA_KERNEL"] = "grouped"
        elif current_platform.is_cpu():
            from lora_kernel.grouped_lora import install_grouped_lora

            install_grouped_lora()

    def lora_engine_args(self) -> dict:
        return dict(enable_lora=True, max_lora_rank=self.cfg.max_lora_rank,
                    max_loras=self.cfg.max_loras, max_cpu_loras=self.cfg.max_cpu_loras)

    def attach(self, engine, loop) -> None:
        """After the engine is built (engine thread): the ReFT-P hook, and the loop that
        runs engine calls."""
        self.reft.install(engine)
        self.loop = loop

    # ------------------------------------------------------------------ validation
    async def validate(self, path: str, kind: str | None = None):
        """Full validation of a staged upload as ``kind`` (None: what its files declare);
        the router has no torch. ``path``: a directory (shared store) or a store URI
        (``s3://...``), fetched into a scratch directory here and removed after."""
        return await asyncio.to_thread(self._validate, path, kind)

    def _validate(self, path: str, kind: str | None):
        from cluster.adapter_store import store_of
        from prefill_worker.adapters import validate_adapter

        def check(p):
            return validate_adapter(p, self.base_shape, max_rank=self.cfg.max_lora_rank,
                                    max_bytes=self.cfg.max_adapter_bytes, kind=kind)
        if "://" not in path:
            return check(path)
        scratch = Path(tempfile.mkdtemp(prefix=".validate-", dir=self.cache_dir))
        try:
            store_of(path).fetch(path, scratch)
            return check(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # ------------------------------------------------------------------ resolve
    async def resolve(self, ref: AdapterRef) -> Resolved:
        t0 = time.time()
        lock = self._resolving.setdefault(ref.name, asyncio.Lock())
        async with lock:  # concurrent first requests for one adapter fetch it once
            entry, tier = await self._entry(ref)
        self.tier_hits[tier] += 1
        if ref.kind == "reft_p":
            key, weights = await self._reft_weights(entry)
            return Resolved(ref, tier, time.time() - t0, reft_key=key, reft_weights=weights)
        self._touch_engine(entry.lora_int_id)
        return Resolved(ref, tier, time.time() - t0, lora=self._lora_request(entry),
                        invocation=entry.invocation)

    @staticmethod
    def _lora_request(entry: AdapterEntry):
        from vllm.lora.request import LoRARequest

        return LoRARequest(entry.ref.namespace, entry.lora_int_id, entry.path)

    def _touch_engine(self, lora_id: int) -> None:
        """The mirror after the engine used ``lora_id``: most recent; the oldest unpinned
        entries evicted past ``max_cpu_loras``, as vLLM's LRU does."""
        self._engine_loras[lora_id] = None
        self._engine_loras.move_to_end(lora_id)
        while len(self._engine_loras) > self.cfg.max_cpu_loras:
            oldest = next(i for i in self._engine_loras if i not in self._pinned)
            del self._engine_loras[oldest]

    async def _entry(self, ref: AdapterRef) -> tuple[AdapterEntry, str]:
        entry = self._adapters.get(ref.name)
        if entry is not None and entry.ref.version > ref.version:
            raise AdapterNotFound(ref.name)  # the router's view is stale: an older version
        if entry is not None and entry.ref == ref:
            return entry, "engine" if self._hot(entry) else "disk"
        path, tier = await asyncio.to_thread(self._fetch, ref)
        await asyncio.to_thread(self._check_fits, ref, path)
        invocation: tuple[int, ...] = ()
        if ref.kind == "alora":
            path, invocation = await asyncio.to_thread(self._alora_files, path)
        with self._lock:
            old = self._adapters.get(ref.name)
            entry = AdapterEntry(ref, str(path), next(self._lora_ids), invocation)
            self._adapters[ref.name] = entry
        if old is not None:  # replaced: drop the old version from the engine's tiers
            await self._evict(old)
        return entry, tier

    def _fetch(self, ref: AdapterRef) -> tuple[Path, str]:
        """Disk tier: ``<cache_dir>/<sha256>``, fetched from the store and verified."""
        from cluster.adapter_store import digest_dir, store_of

        local = self.cache_dir / ref.sha256
        if local.is_dir():
            return local, "disk"
        tmp = self.cache_dir / f".fetch-{ref.sha256}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            store_of(ref.uri).fetch(ref.uri, tmp)
            sha, _ = digest_dir(tmp)
        except BaseException:  # nothing half-fetched stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if sha != ref.sha256:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InvalidAdapter(f"adapter {ref.name} v{ref.version}: the store copy at "
                                 f"{ref.uri} has sha256 {sha}, the registry says {ref.sha256}: "
                                 "it was corrupted or replaced in the store; nothing was "
                                 "cached (register the adapter again)")
        try:
            tmp.rename(local)
        except OSError:  # another fetch of the same content won the race
            shutil.rmtree(tmp, ignore_errors=True)
        return local, "store"

    def _check_fits(self, ref: AdapterRef, path: Path) -> None:
        """Before an adapter version first reaches this worker's engine: its files checked
        against this engine's model (shapes, rank, kind), as at registration -- a registry
        made on another base model must never reach the engine (vLLM would not notice a
        LoRA of the wrong shapes; it would serve garbage). Raises :class:`AdapterMismatch`."""
        from prefill_worker.adapters import validate_adapter

        try:
            validate_adapter(path, self.base_shape, max_rank=self.cfg.max_lora_rank,
                             max_bytes=self.cfg.max_adapter_bytes, kind=ref.kind)
        except InvalidAdapter as e:
            raise AdapterMismatch(
                f"adapter {ref.name} v{ref.version} does not fit this worker's base model "
                f"{self.cfg.engine.model}: {e.message}; it was registered for another model: "
                "register files made for this one (or delete the adapter)") from None

    def _alora_files(self, path: Path) -> tuple[Path, tuple[int, ...]]:
        """An aLoRA's files as the engine loads them, and its invocation tokens."""
        from prefill_worker.adapters import alora

        return (alora.engine_view(path),
                alora.invocation_tokens(path, self.base_shape.vocab_size))

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
            raise InvalidAdapter(f"adapter {entry.ref.name}: this worker cannot apply "
                                 f"ReFT-P adapters ({self.reft.unsupported})")
        key = self._reft_key(entry)
        weights = self.reft.cached(key)
        if weights is None:
            weights = await asyncio.to_thread(reft_p.load, entry.path, self.base_shape,
                                              self.cfg.max_lora_rank)
            self.reft.put(key, weights)
        return key, weights

    # ------------------------------------------------------------------ eviction
    async def _evict(self, entry: AdapterEntry) -> None:
        if entry.ref.kind == "reft_p":
            self.reft.drop(self._reft_key(entry))
            return
        lora_id = entry.lora_int_id
        self._engine_loras.pop(lora_id, None)
        self._pinned.discard(lora_id)   # vLLM unpins what it removes
        await self.loop.call(lambda eng: eng.remove_lora(lora_id))

    async def drop(self, name: str) -> bool:
        """Deleted from the registry: remove it from every tier on this worker."""
        with self._lock:
            entry = self._adapters.pop(name, None)
        if entry is None:
            return False
        await self._evict(entry)
        if not any(e.ref.sha256 == entry.ref.sha256 for e in self._adapters.values()):
            shutil.rmtree(self.cache_dir / entry.ref.sha256, ignore_errors=True)
            shutil.rmtree(self.cache_dir / f"{entry.ref.sha256}.engine", ignore_errors=True)
        return True

    async def invalidate(self, name: str, version: int) -> bool:
        """A newer version was registered: drop any older one held here."""
        entry = self._adapters.get(name)
        if entry is not None and entry.ref.version < version:
            return await self.drop(name)
        return False

    # ------------------------------------------------------------------ pins
    async def set_pins(self, refs: tuple[AdapterRef, ...]) -> tuple[str, ...]:
        """Pin these adapters (LoRA-P, the first ``pinnable_loras``) in the engine's host
        tier, loading them if needed, and unpin the rest; the names pinned. An adapter this
        worker cannot fetch (or holds newer) is skipped, and said in the log."""
        from prefill_worker import lora_pins

        limit = getattr(self.cfg, "pinnable_loras", 0)
        entries = []
        for ref in [r for r in refs if r.kind == "lora_p"][:limit]:
            try:
                async with self._resolving.setdefault(ref.name, asyncio.Lock()):
                    entries.append((await self._entry(ref))[0])
            except (AdapterNotFound, InvalidAdapter, AdapterStoreError, OSError) as e:
                log.warning("not pinning adapter %s: %s", ref.name, e)
        want = {e.lora_int_id: e for e in entries}
        for lora_id in self._pinned - want.keys():
            await self.loop.call(lambda eng, i=lora_id: lora_pins.unpin(eng, i))
            self._pinned.discard(lora_id)
        for lora_id, e in want.items():
            if lora_id not in self._pinned:
                self.pin_loads += lora_id not in self._engine_loras
                await self.loop.call(lambda eng, r=self._lora_request(e): lora_pins.pin(eng, r))
                self._touch_engine(lora_id)
                self._pinned.add(lora_id)
        return tuple(e.ref.name for e in entries)

    def pinned(self) -> tuple[str, ...]:
        return tuple(n for n, e in list(self._adapters.items()) if e.lora_int_id in self._pinned)

    def residency(self) -> dict[str, str]:
        return {n: f"{'engine' if self._hot(e) else 'disk'}@v{e.ref.version}"
                for n, e in list(self._adapters.items())}

    # ------------------------------------------------------------------ per request
    def namespace(self, r: Resolved | None, prompt_len: int) -> str:
        """The prompt KV's cache salt: the adapter version (aLoRA: the base's); for ReFT-P with suffix
        positions, also the prompt's length (which positions are intervened depends on it,
        so KV made for one length is never reused for another)."""
        if r is None:
            return BASE_NAMESPACE
        if r.ref.kind == "alora":
            # KV before the invocation is the base model's; the blocks from it on carry the
            # adapter's versioned name in vLLM's own LoRA key (colocated_worker/adapter_span.py)
            return BASE_NAMESPACE
        if r.reft_weights is not None and r.reft_weights.positions.depends_on_length:
            return f"{r.ref.namespace}/len{prompt_len}"
        return r.ref.namespace

    def pin(self, r: Resolved | None) -> None:
        """ReFT-P weights stay pinned while the engine holds the request (on a
        tensor-parallel engine's ranks too: through the engine thread, ahead of the
        request, which the engine loop adds after it)."""
        if r is None or r.reft_key is None:
            return
        self.reft.acquire(r.reft_key, r.reft_weights)
        if self.reft.ranked:
            key, w = r.reft_key, r.reft_weights
            self.loop.call(lambda eng: self.reft.sync_ranks(eng, key, w))

    def unpin(self, r: Resolved | None, *, after_engine_step: bool) -> None:
        """``after_engine_step``: the request may still be in the engine (cancelled or
        failed), so unpin on the engine thread, after it has dropped the request."""
        if r is None or r.reft_key is None:
            return
        key = r.reft_key
        if after_engine_step or self.reft.ranked:
            try:
                self.loop.call(lambda eng: self._release_reft(eng, key))
                return
            except RuntimeError:  # no running event loop: release here
                pass
        self._release_host(key)

    def _release_reft(self, engine, key: str) -> None:
        self._release_host(key)
        if self.reft.ranked:
            self.reft.sync_ranks(engine, key)

    def prompt_done(self, request) -> None:
        """Engine thread, colocated workers (``prompt_slots.install_prompt_slots``): vLLM's
        ``request`` has its first token, so a ReFT-P request's pin ends here -- its
        interventions touch prompt positions only, and the host tier may evict the weights
        once no request still prefilling holds them. The request's own :meth:`unpin` later
        finds the pin already released (one credit per key: pins of one key are
        interchangeable). A tensor-parallel engine's ranks keep their copy until then."""
        from prefill_worker.reft_runtime import EXTRA_ARG

        sp = getattr(request, "sampling_params", None)
        key = (sp.extra_args or {}).get(EXTRA_ARG) if sp is not None else None
        if key is None:
            return
        with self._pin_lock:
            self._ended_early[key] = self._ended_early.get(key, 0) + 1
            self.reft.release(key)

    def _release_host(self, key: str) -> None:
        with self._pin_lock:
            if self._ended_early.get(key, 0) > 0:
                self._ended_early[key] -= 1
                if not self._ended_early[key]:
                    del self._ended_early[key]
                return
            self.reft.release(key)


BASE_NAMESPACE = "base"


class AdapterWorker(EngineWorker):
    """Base of the worker actors that apply adapters (prefill, colocated): their
    :class:`AdapterHost`, the adapter calls the router makes of them, and the first step of
    every request they take (:meth:`admit`: prompt ids, length check, adapter resolved)."""

    holds_adapters = True

    def __init__(self, cfg, worker_id: str, redis_url: str | None, cache_dir: str | None,
                 actor_name: str, transfer=None) -> None:
        self.cfg = cfg
        cache = Path(cache_dir or tempfile.mkdtemp(prefix=f"preft-{worker_id}-"))
        cache.mkdir(parents=True, exist_ok=True)
        self.adapters = AdapterHost(cfg, cache)
        self.adapters.install_kernel()
        super().__init__(cfg.engine, cfg.cpu_cores, worker_id, redis_url, actor_name,
                         transfer=transfer)

    def engine_args(self) -> dict:
        return self.adapters.lora_engine_args()

    def after_build(self, engine) -> None:
        self.adapters.attach(engine, self.loop)

    def residency(self) -> dict[str, str]:
        return self.adapters.residency()

    async def admit(self, req: PrefillRequest) -> tuple[list[int], Resolved | None]:
        """The request's prompt ids, checked against the model's limits, and its adapter
        resolved through the tiers (None: the base model)."""
        ids = prompt_ids(req, self.tokenizer, self.adapters.vocab_size)
        check_sampling_ids(req.sampling, self.adapters.vocab_size)
        check_lengths(len(ids), req.sampling.max_tokens,
                      self.loop.engine.model_config.max_model_len)
        r = await self.adapters.resolve(req.adapter) if req.adapter is not None else None
        return ids, r

    # ------------------------------------------------------------------ adapter calls
    async def validate_adapter(self, path: str, kind: str | None = None):
        """The adapter's :class:`~prefill_worker.adapters.base.AdapterSpec`, or
        :class:`InvalidAdapter` saying what is wrong with it."""
        return await self.adapters.validate(path, kind)

    async def drop_adapter(self, name: str) -> bool:
        return await self.adapters.drop(name)

    async def pin_adapters(self, refs: tuple[AdapterRef, ...]) -> tuple[str, ...]:
        """The router's hot set for this worker: pinned in the engine's host tier, the rest
        unpinned (:meth:`AdapterHost.set_pins`); the names pinned."""
        return await self.adapters.set_pins(tuple(refs))

    async def invalidate(self, name: str, version: int) -> bool:
        return await self.adapters.invalidate(name, version)

    async def info(self) -> WorkerInfo:
        from dataclasses import replace

        info = await super().info()
        return replace(info, vocab_size=self.adapters.vocab_size,
                       eos_token_id=self.adapters.eos_token_id)
