"""ReFT-P inside the prefill worker's vLLM engine, per request, without forking vLLM.

Installed once after the engine is built (:meth:`ReftRuntime.install`):

* the model runner's ``_model_forward`` is wrapped: before each forward pass of a scheduler
  step it reads the batch's request order (``input_batch.req_ids``), each request's token
  span in the flattened batch (``query_start_loc``) and the absolute ``positions``, and
  builds a *plan*: for every layer, which rows of the flattened batch get which adapter's
  intervention. A request is a ReFT-P request when its ``SamplingParams.extra_args`` carry
  ``EXTRA_ARG`` = a key the worker pinned with :meth:`ReftRuntime.acquire`.
* every decoder layer gets a forward hook. vLLM's Llama/Qwen2 layers return
  ``(hidden_states, residual)`` with the residual stream h = hidden_states + residual, so
  the hook adds Φ(h) − h to ``hidden_states`` at the planned rows; the next layer's fused
  add-norm (or the final norm) then sees Φ(h).

One batch can mix ReFT-P requests with different adapters, LoRA-P requests and base-model
requests: rows without a plan entry are untouched. Every token the prefill engine computes
is a prompt token (``max_tokens=1``), and prefix-cache hits are not recomputed but are
salted with the adapter's name@version, so intervening on the computed rows is exact.

Host-memory tier: loaded adapters in an LRU (``capacity`` entries); adapters pinned by
in-flight requests are never evicted (on a colocated engine a request's pin ends at its
first token, ``AdapterHost.prompt_done``: rows of decoding requests are never planned).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

EXTRA_ARG = "preft_reft"


class ReftUnsupported(RuntimeError):
    """The engine cannot apply ReFT-P (e.g. compiled graphs would skip the hooks)."""


def find_decoder_layers(model) -> list:
    """The decoder layers of a vLLM causal LM (``model.model.layers`` for Llama/Qwen2)."""
    import torch.nn as nn

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, nn.ModuleList) and len(mod):
            return list(mod)
    raise ReftUnsupported(f"no decoder layers found in {type(model).__name__}")


class ReftRuntime:
    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()   # key -> ReftWeights (LRU)
        self._active: dict[str, list] = {}                     # key -> [weights, refcount]
        self._plan: dict[int, list] | None = None               # engine thread only
        self._in_step = False
        self.unsupported: str | None = "not installed"
        self.ranked = False       # tensor-parallel engine: the hooks live on its ranks
        self.rows_intervened = 0                               # stats: rows × layers

    # ------------------------------------------------------------ host-memory tier
    def cached(self, key: str):
        with self._lock:
            w = self._cache.get(key)
            if w is not None:
                self._cache.move_to_end(key)
            return w

    def put(self, key: str, weights) -> None:
        with self._lock:
            self._cache[key] = weights
            self._cache.move_to_end(key)
            for k in list(self._cache):
                if len(self._cache) <= self.capacity:
                    break
                if k not in self._active:
                    del self._cache[k]

    def drop(self, key: str) -> None:
        with self._lock:
            self._cache.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._cache

    def acquire(self, key: str, weights) -> None:
        """Pin ``weights`` under ``key`` for one in-flight request."""
        with self._lock:
            slot = self._active.setdefault(key, [weights, 0])
            slot[0] = weights
            slot[1] += 1

    def release(self, key: str) -> None:
        with self._lock:
            slot = self._active.get(key)
            if slot is None:
                return
            slot[1] -= 1
            if slot[1] <= 0:
                del self._active[key]

    def active(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------ engine hooks
    def install(self, engine) -> None:
        """Wrap the runner's forward and hook every decoder layer (engine thread). A
        tensor-parallel engine's runners are its ranks' processes: each gets a runtime of
        its own (:func:`install_on_rank`), and this one keeps the host tier and the pins,
        which :meth:`sync_ranks` mirrors to them."""
        self.ranked = engine.vllm_config.parallel_config.tensor_parallel_size > 1
        try:
            if self.ranked:
                problems = [p for p in engine.collective_rpc(install_on_rank,
                                                             args=(self.capacity,)) if p]
                if problems:
                    raise ReftUnsupported(problems[0])
            else:
                self._install(engine.model_executor.driver_worker.worker.model_runner)
            self.unsupported = None
        except ReftUnsupported as e:
            self.unsupported = str(e)
            log.warning("ReFT-P disabled on this engine: %s", e)

    def sync_ranks(self, engine, key: str, weights=None) -> None:
        """Engine thread, tensor-parallel engines: pin ``weights`` under ``key`` on every
        rank (before the request that needs them is added), or unpin (None)."""
        if weights is not None:
            engine.collective_rpc(_rank_acquire, args=(key, weights))
        else:
            engine.collective_rpc(_rank_release, args=(key,))

    def _install(self, runner) -> None:
        from vllm.config import CompilationMode

        mode = runner.vllm_config.compilation_config.mode
        if mode != CompilationMode.NONE:
            raise ReftUnsupported(f"the engine compiles its model (compilation mode {mode}); "
                                  "ReFT-P needs enforce_eager=True on the prefill pool")
        for name in ("_model_forward", "execute_model", "input_batch", "query_start_loc",
                     "requests"):
            if not hasattr(runner, name):
                raise ReftUnsupported(f"model runner {type(runner).__name__} has no {name!r}")
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        layers = find_decoder_layers(model)
        for i, layer in enumerate(layers):
            layer.register_forward_hook(self._layer_hook(i))

        orig_execute, orig_forward = runner.execute_model, runner._model_forward

        def execute_model(*args, **kwargs):
            self._in_step = True
            try:
                return orig_execute(*args, **kwargs)
            finally:
                self._in_step = False
                self._plan = None

        def _model_forward(*args, **kwargs):
            positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
            self._plan = self._build_plan(runner, positions) if self._in_step else None
            try:
                return orig_forward(*args, **kwargs)
            finally:
                self._plan = None

        runner.execute_model = execute_model
        runner._model_forward = _model_forward
        self.num_layers = len(layers)

    def _build_plan(self, runner, positions) -> dict[int, list] | None:
        if not self._active or positions is None:
            return None
        import numpy as np
        import torch

        ib = runner.input_batch
        n = ib.num_reqs
        qsl = runner.query_start_loc.np[: n + 1]
        total = int(qsl[n])
        if positions.dim() != 1 or total > positions.shape[0]:
            raise RuntimeError(f"ReFT-P: unexpected positions {tuple(positions.shape)} for "
                               f"{total} scheduled tokens")
        pos = None
        groups: dict[int, tuple[Any, list]] = {}
        for i, rid in enumerate(ib.req_ids[:n]):
            st = runner.requests.get(rid)
            sp = getattr(st, "sampling_params", None)
            key = (sp.extra_args or {}).get(EXTRA_ARG) if sp is not None else None
            if key is None:
                continue
            if pos is None:
                pos = positions[:total].to("cpu").numpy()
            a, b = int(qsl[i]), int(qsl[i + 1])
            p = pos[a:b]
            plen = st.num_prompt_tokens
            sel = p < plen
            if not sel.any():   # decoding (a colocated engine): its pin may have ended
                continue
            slot = self._active.get(key)
            if slot is None:  # never silently run a ReFT request without its adapter
                raise RuntimeError(f"ReFT-P adapter {key!r} of request {rid} is not pinned")
            w = slot[0]
            if not w.positions.all:
                sel &= (p < w.positions.first) | (p >= plen - w.positions.last)
            rows = a + np.nonzero(sel)[0]
            if rows.size:
                groups.setdefault(id(w), (w, []))[1].append(rows)
        if not groups:
            return None
        plan: dict[int, list] = {}
        for w, parts in groups.values():
            idx = torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(positions.device)
            for layer in w.layers:
                plan.setdefault(layer, []).append((w, idx))
        return plan

    def _layer_hook(self, layer: int):
        def hook(module, args, output):
            plan = self._plan
            if plan is None:
                return None
            items = plan.get(layer)
            if not items:
                return None
            hidden, residual = output
            hidden = hidden.clone()
            for w, idx in items:
                h = hidden[idx] + residual[idx] if residual is not None else hidden[idx]
                hidden[idx] = hidden[idx] + w.delta(layer, h)
                self.rows_intervened += int(idx.numel())
            return hidden, residual
        return hook


# ------------------------------------------------------------------ on each rank
# A tensor-parallel engine's ranks (``engine.collective_rpc``; ``worker``: vLLM's worker
# wrapper in the rank's process). vLLM keeps the residual stream whole on every rank (each
# layer's output is all-reduced), so each rank applies the full intervention to its copy.
def _runner(worker):
    return getattr(worker, "worker", worker).model_runner


def install_on_rank(worker, capacity: int) -> str | None:
    """This rank's runtime, on its runner; what stops it (None: installed)."""
    runtime = ReftRuntime(capacity)
    try:
        runtime._install(_runner(worker))
    except ReftUnsupported as e:
        return str(e)
    runtime.unsupported = None
    _runner(worker).preft_reft = runtime
    return None


def _rank_acquire(worker, key: str, weights) -> None:
    _runner(worker).preft_reft.acquire(key, weights)


def _rank_release(worker, key: str) -> None:
    _runner(worker).preft_reft.release(key)
