"""PreFT's vLLM v1 KV connector: hooks both engines into the KV transfer (step 4).

Loaded by vLLM through ``kv_transfer_config = {"kv_connector": "PreftKVConnector",
"kv_connector_module_path": "kv_transfer.connector", "kv_role": ...,
"kv_connector_extra_config": {"endpoint": <KVEndpoint>}}`` -- no fork of vLLM. vLLM builds
the connector twice, once per role, as it does vLLM's NIXL connector: the engine's
scheduler gets a SCHEDULER-role :class:`PreftKVConnector` that delegates to a
:class:`PreftConnectorScheduler`, its model runner a WORKER-role one that delegates to a
:class:`PreftConnectorWorker`. Both sides use the :class:`~kv_transfer.endpoint.KVEndpoint`
the worker actor created with the engine; they talk to each other only through vLLM's
per-step :class:`PreftConnectorMetadata`.

Producer (prefill engine, ``kv_producer``): a request sent with ``kv_transfer_params =
{"do_remote_decode": True}`` runs as usual (prompt with its adapter, one sampled token).
When it finishes, the scheduler side's :meth:`~PreftConnectorScheduler.request_finished`
keeps its prompt blocks (delayed free), holds them on the endpoint under a new transfer id
and returns ``{transfer_id, num_tokens, num_blocks}``, which vLLM attaches to the
request's output. The endpoint's transport sends them when the decode side pulls; the
worker side reports the request in ``finished_sending`` once they are sent, released or
expired, and vLLM frees them.

Consumer (decode engine, ``kv_consumer``): a request whose ``kv_transfer_params`` is a
:class:`~cluster.messages.KVHandle` (``do_remote_prefill``) declares the prompt's tokens
external (:meth:`~PreftConnectorScheduler.get_num_new_matched_tokens`), beyond whatever its
own prefix cache holds under the same cache salt. vLLM allocates blocks; the worker side
pulls the remote blocks into them on a background thread and reports ``finished_recving``
(or ``failed_recving``, which fails the request: vLLM's ``kv_load_failure_policy`` is
``fail``, never a silent base-model recompute of an adapter-conditioned prompt).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from kv_transfer.endpoint import EXTRA_CONFIG_KEY, KVEndpoint, check_engine
from kv_transfer.layer_load import LayerLoad
from kv_transfer.ranks import RankedEndpoint, RankReport, RankSpec
from kv_transfer.offers import TransferRecord
from kv_transfer.transport import Claim
from cluster.messages import KVHandle

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class _Recv:
    req_id: str
    handle: KVHandle | None       # None: the request's handle did not parse (failed)
    start_block: int
    local_block_ids: list[int]
    claim: Claim | None = None    # claimed: load layer by layer during this step's forward
    failed: str = ""              # the claim failed, or the request was refused: nothing to pull
    sync: bool = False            # failed while scheduled to run: its blocks are invalid


@dataclass
class _Save:
    """Prefill: this step's forward writes blocks [lo, hi) of a prompt handed to decode."""

    req_id: str
    num_blocks: int            # the whole prompt's
    lo: int
    hi: int
    block_ids: list[int]       # engine block ids of [lo, hi)


@dataclass
class PreftConnectorMetadata(KVConnectorMetadata):
    """Scheduler side → worker side, once per engine step. Decode: pulls, releases, lost
    prompts. Prefill: which prompt blocks this step writes, to stage layer by layer."""

    recvs: list[_Recv] = field(default_factory=list)
    releases: list[KVHandle] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)   # prompt KV gone after a preemption
    saves: list[_Save] = field(default_factory=list)
    # Tensor-parallel prefill (kv_transfer.ranks): prompts the scheduler held, by
    # (transfer id, request id, block ids, tokens); transfer ids to release; membership.
    holds: list[tuple[int, str, list[int], int]] = field(default_factory=list)
    drops: list[int] = field(default_factory=list)
    members: dict | None = None


# Set in a consumer request's kv_transfer_params once its prompt KV was loaded (or found in
# the local prefix cache): from then on, a missing prompt block can never be pulled again.
_LOADED = "preft_loaded"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PreftConnectorScheduler:
    """Scheduler side, on the engine thread: which tokens a decode request loads, which
    blocks a finished prefill request keeps; what the worker side does next step."""

    def __init__(self, endpoint: KVEndpoint, block_size: int) -> None:
        self.endpoint = endpoint
        self.is_producer = endpoint.is_producer
        self.block_size = block_size
        self._meta = PreftConnectorMetadata()
        # Prefill, layerwise: prompts handed to decode, by request id -> (blocks, block ids)
        self._staging: dict[str, tuple[int, list[int]]] = {}
        # Decode: claims on staged KV (layer-wise loads), by request id; None: not claimable
        self._claims: dict[str, Future[Claim] | None] = {}
        # Decode: requests refused here (why), failed at their allocation (_fail_alloc)
        self._refused: dict[str, str] = {}

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Nothing one request carries raises out of here (it would end the engine loop and
        every request on it): a decode request whose handle is bad, or whose lookup fails,
        is refused (:meth:`_refuse`) and fails alone."""
        try:
            return self._matched(request, num_computed_tokens)
        except Exception as e:
            if self.is_producer:   # no transfer of its own yet: it takes the held path
                log.exception("KV staging lookup for %s failed", request.request_id)
                self._staging.pop(request.request_id, None)
                return 0, False
            return self._refuse(request, num_computed_tokens, f"{type(e).__name__}: {e}")

    def _refuse(self, request: "Request", num_computed_tokens: int,
                why: str) -> tuple[int, bool]:
        """An async "load" of the rest of the prompt that never runs: after allocation the
        worker side reports it in ``failed_recving``, which fails the request alone
        (``kv_load_failure_policy=fail``); nothing is computed for it without its KV."""
        rid = request.request_id
        if rid not in self._refused:
            log.error("decode request %s refused at the KV connector: %s", rid, why)
            self._refused[rid] = why
        return max(1, request.num_tokens - num_computed_tokens), True

    def _bad_handle(self, request: "Request") -> str:
        """Why a decode request's KV handle cannot be its prompt's ('' if it can): the
        engine prompt is the prompt and the first token, the handle holds the prompt."""
        h = KVHandle.from_params(request.kv_transfer_params)   # raises: refused
        prompt = request.num_prompt_tokens - 1
        if type(h.num_tokens) is not int or h.num_tokens != prompt:
            return (f"KV handle of transfer {h.transfer_id} holds {h.num_tokens!r} tokens; "
                    f"the prompt has {prompt}")
        if type(h.num_blocks) is not int or h.num_blocks != _cdiv(prompt, self.block_size):
            return (f"KV handle of transfer {h.transfer_id} says {h.num_blocks!r} blocks for "
                    f"{prompt} tokens of {self.block_size} per block")
        return ""

    def _matched(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if self.is_producer:
            if params and params.get("do_remote_decode") and self.endpoint.staging is not None:
                self._staging[request.request_id] = (
                    _cdiv(request.num_prompt_tokens, self.block_size), [])
            return 0, False
        if not params or not (params.get("do_remote_prefill")
                                                  or params.get(_LOADED)):
            return 0, False
        why = self._refused.get(request.request_id) or (
            self._bad_handle(request) if params.get("do_remote_prefill") else "")
        if why:
            return self._refuse(request, num_computed_tokens, why)
        count = int(params["num_tokens"]) - num_computed_tokens
        # A request loaded once and scheduled again with part of its prompt missing was
        # preempted and its blocks evicted: prefill has freed its copy, and recomputing the
        # prompt here would be the base model's KV. It is "loaded" again, and that load
        # fails (update_state_after_alloc), which fails the request (retriable).
        if count <= 0:
            return 0, False
        if params.get(_LOADED):
            return count, True
        claim = self._claim(request)
        if claim is not None and not claim.done():
            return None, False     # not schedulable until the claim is answered
        # claimed: a sync load, copied during the forward; else pulled before it runs
        return count, not (claim is not None and claim.exception() is None)

    def _claim(self, request: "Request") -> "Future[Claim] | None":
        """The request's claim on its staged KV, started the first time it is seen when
        its KV can load layer by layer (see :meth:`KVEndpoint.can_claim`); None if not."""
        rid = request.request_id
        if rid not in self._claims:
            handle = KVHandle.from_params(request.kv_transfer_params)
            claim = self.endpoint.claim(handle) if self.endpoint.can_claim(handle) else None
            if claim is not None:
                claim.add_done_callback(lambda _: self.endpoint.wake.set())
            self._claims[rid] = claim
        return self._claims[rid]

    def _drop_claim(self, rid: str) -> Claim | BaseException | None:
        """The request's completed claim, now ours to use or release, or why it failed (the
        transfer failed: its KV is not pulled again); None if it has none (a claim still
        in flight is released when it lands)."""
        fut = self._claims.pop(rid, None)
        if fut is None:
            return None
        if not fut.done():
            fut.add_done_callback(lambda f: f.exception() or f.result().release())
            return None
        return fut.exception() or fut.result()

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        """A refused request, or one whose load cannot be planned, fails alone."""
        why = self._refused.pop(request.request_id, None)
        if why is None:
            try:
                return self._after_alloc(request, blocks, num_external_tokens)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
                log.error("KV load of decode request %s not planned: %s", request.request_id,
                          why)
        self._fail_alloc(request, blocks, num_external_tokens, why)

    def _fail_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                    num_external_tokens: int, why: str) -> None:
        """Fail ``request`` through the worker side: an async load is reported in
        ``failed_recving``; a sync one (claimed) by its external blocks, reported invalid.
        Its claim is released, and its transfer (if its handle parses) on the prefill side."""
        params = request.kv_transfer_params or {}
        claim = self._drop_claim(request.request_id)
        if isinstance(claim, Claim):
            claim.release()
        try:
            handle = KVHandle.from_params(params)
        except Exception:
            handle = None
        if params.get("do_remote_prefill"):
            params["do_remote_prefill"], params[_LOADED] = False, True
            if handle is not None:
                self._meta.releases.append(handle)
        sync, ids = isinstance(claim, Claim), []
        if sync and handle is not None and num_external_tokens > 0:
            last = _cdiv(handle.num_tokens, self.block_size)   # its last external block
            ids = blocks.get_block_ids()[0][last - 1:last]
        self._meta.recvs.append(_Recv(request.request_id, handle, 0, ids, failed=why,
                                      sync=sync))

    def _after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                     num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if self.is_producer or not params:
            return
        if params.get(_LOADED) and num_external_tokens > 0:
            self._meta.lost.append(request.request_id)
            return
        if not params.get("do_remote_prefill"):
            return
        handle = KVHandle.from_params(params)
        fut = self._claims.get(request.request_id)
        claimed = fut is not None and fut.done() and fut.exception() is None
        # raises before anything changed: _fail_alloc then finds the request as it came
        local = self._remote_blocks(handle, blocks, num_external_tokens, claimed)
        params["do_remote_prefill"] = False  # one transfer per request
        params[_LOADED] = True
        claim = self._drop_claim(request.request_id)
        failed = f"claim failed: {claim}" if isinstance(claim, BaseException) else ""
        claim = None if failed else claim
        if num_external_tokens == 0:
            # Our own prefix cache (same adapter + version salt) already has the prompt.
            if claim is not None:
                claim.release()
            self._meta.releases.append(handle)
            return
        start_block = (handle.num_tokens - num_external_tokens) // self.block_size
        self._meta.recvs.append(_Recv(request.request_id, handle, start_block, local, claim,
                                      failed))

    def _remote_blocks(self, handle: KVHandle, blocks: "KVCacheBlocks",
                       num_external_tokens: int, claimed: bool) -> list[int]:
        """The engine blocks the remote ones go into (none when nothing is external)."""
        if num_external_tokens == 0:
            return []
        start_token = handle.num_tokens - num_external_tokens
        if start_token % self.block_size:
            raise RuntimeError(f"local prefix hit ends mid-block at token {start_token}")
        start_block = start_token // self.block_size
        want = handle.num_blocks - start_block
        # async: the unhashed blocks are exactly the remote ones; sync (claimed): vLLM has
        # cached them already, so take them by position after the local prefix hit
        local = (blocks.get_block_ids()[0][start_block:start_block + want] if claimed
                 else blocks.get_unhashed_block_ids())
        if len(local) != want:
            raise RuntimeError(f"decode allocated {len(local)} blocks for {want} remote "
                               f"blocks of transfer {handle.transfer_id}")
        return local

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta, self._meta = self._meta, PreftConnectorMetadata()
        if self._staging:
            try:
                meta.saves = self._saves(scheduler_output)
            except Exception:   # a prompt short of a step's saves is not staged: held instead
                log.exception("planning this step's KV staging failed; staging nothing")
        if isinstance(self.endpoint, RankedEndpoint):
            meta.holds, meta.drops, meta.members = self.endpoint.take_outbox()
        return meta

    def update_connector_output(self, output: Any) -> None:
        """After each step: a tensor-parallel engine's ranks' reports."""
        if isinstance(self.endpoint, RankedEndpoint):
            self.endpoint.on_output(output)

    def _saves(self, out: "SchedulerOutput") -> list[_Save]:
        """The prompt blocks of staged requests this step's forward writes (a new request's
        from block 0: blocks its own prefix cache supplied are staged too)."""
        steps = [(r.req_id, r.block_ids[0], 0, r.num_computed_tokens, True)
                 for r in out.scheduled_new_reqs]
        cached = out.scheduled_cached_reqs
        steps += [(rid, (new or ([],))[0], 0 if rid in cached.resumed_req_ids else None,
                   cached.num_computed_tokens[i], rid in cached.resumed_req_ids)
                  for i, (rid, new) in enumerate(zip(cached.req_ids, cached.new_block_ids))]
        saves = []
        for rid, block_ids, lo_tok, computed, replace in steps:
            if rid not in self._staging:
                continue
            num_blocks, ids = self._staging[rid]
            ids = list(block_ids) if replace else ids + list(block_ids)
            self._staging[rid] = (num_blocks, ids)
            lo = (computed if lo_tok is None else lo_tok) // self.block_size
            hi = min(num_blocks, _cdiv(computed + out.num_scheduled_tokens[rid], self.block_size))
            if hi > lo:
                saves.append(_Save(rid, num_blocks, lo, hi, ids[lo:hi]))
        return saves

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Never raises (the engine loop would end): a request whose hand-over fails frees
        its blocks now and reaches its caller without a handle."""
        self._refused.pop(request.request_id, None)
        try:
            return self._finished(request, block_ids)
        except Exception:
            log.exception("KV hand-over of %s failed; its blocks are freed", request.request_id)
            self._staging.pop(request.request_id, None)
            if self.is_producer:
                self.endpoint.drop_staged(request.request_id)
            return False, None

    def _finished(self, request: "Request",
                  block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if not params:
            return False, None
        staged = self._staging.pop(request.request_id, None) is not None
        if not self.is_producer:
            claim = self._drop_claim(request.request_id)
            if isinstance(claim, Claim):   # claimed, then aborted before it was scheduled
                claim.release()
            if params.get("do_remote_prefill"):
                # Aborted before it was ever scheduled: free the prefill side's blocks.
                self._meta.releases.append(KVHandle.from_params(params))
                params["do_remote_prefill"] = False
            return False, None
        held, out = self._hold(request, block_ids)
        if out is None and staged:
            self.endpoint.drop_staged(request.request_id)
        return held, out

    def _hold(self, request: "Request",
              block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill: keep a prompt that finished normally for decode, on the endpoint now
        (through the next step's metadata its blocks would be offered only when that step
        runs -- with vLLM's async scheduling, after a whole further step, which on a slow
        prefill step outlasted the decode side's claim timeout)."""
        if not request.kv_transfer_params.get("do_remote_decode") or not request.is_finished():
            return False, None
        from vllm.v1.request import RequestStatus

        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or errored: nothing to hand over
        num_tokens = request.num_computed_tokens
        num_blocks = _cdiv(num_tokens, self.block_size)
        if num_tokens < 1 or len(block_ids) < num_blocks:
            return False, None
        transfer_id, held = self.endpoint.hold(request.request_id,
                                               list(block_ids[:num_blocks]), num_tokens)
        return held, {"transfer_id": transfer_id, "num_tokens": num_tokens,
                      "num_blocks": num_blocks, "staged": not held}


class PreftConnectorWorker:
    """Worker side, in the model runner: opens the endpoint on the engine's caches, starts
    decode's pulls and releases on background threads, and reports finished transfers."""

    def __init__(self, endpoint: KVEndpoint, block_size: int) -> None:
        self.endpoint = endpoint
        self.block_size = block_size
        self._pool: ThreadPoolExecutor | None = None
        self._done_lock = threading.Lock()
        self._recv_done: set[str] = set()
        self._recv_failed: set[str] = set()
        self._layer_index: dict[str, int] = {}
        self._planned = False                # this step's saves planned (first layer saved)
        self._loads: list[LayerLoad] = []    # decode: this step's layer-wise loads
        self._invalid: set[int] = set()      # decode: blocks whose sync load failed

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        self.endpoint.open(list(kv_caches.values()), self.block_size)
        if not self.endpoint.is_producer:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")

    def start_load_kv(self, meta: PreftConnectorMetadata) -> None:
        self._apply_rank_orders(meta)
        for recv in meta.recvs:
            try:
                self._start_recv(recv)
            except Exception as e:   # this request fails, never the engine
                if recv.claim is not None and not any(ld.claim is recv.claim
                                                      for ld in self._loads):
                    recv.claim.release()
                recv.failed = recv.failed or f"{type(e).__name__}: {e}"
                recv.sync = recv.sync or recv.claim is not None
                self._fail_recv(recv)
        for handle in meta.releases:
            self._pool.submit(self._release, handle)
        if meta.lost:
            log.error("requests %s lost their prompt KV (preempted); failing them rather than "
                      "recomputing the prompt without its adapter", meta.lost)
            with self._done_lock:
                self._recv_failed.update(meta.lost)
            self.endpoint.wake.set()

    def _start_recv(self, recv: _Recv) -> None:
        if recv.failed:
            self._fail_recv(recv)
        elif recv.claim is not None:
            self._start_layer_load(recv)
        else:
            self._pool.submit(self._pull, recv)

    def _apply_rank_orders(self, meta: PreftConnectorMetadata) -> None:
        """A rank of a tensor-parallel engine: what its scheduler decided last step."""
        for transfer_id, req_id, block_ids, num_tokens in meta.holds:
            self.endpoint.hold_as(transfer_id, req_id, block_ids, num_tokens)
        for transfer_id in meta.drops:
            self.endpoint.release(transfer_id)
        if meta.members is not None:
            self.endpoint.prune(meta.members)

    def build_worker_meta(self) -> RankReport | None:
        """A rank's report to its scheduler (None: a single-process engine)."""
        if self.endpoint.tp_size == 1:
            return None
        records, expired = self.endpoint.take_report()
        return RankReport(records, expired)

    # ---------------------------------------------------------------- prefill: staging
    def _plan_saves(self, saves: list[_Save]) -> None:
        pool = self.endpoint.staging
        for save in saves:
            staged = (pool.begin(save.req_id, save.num_blocks) if save.lo == 0
                      else pool.get(save.req_id))
            if staged is not None:
                pool.plan(staged, save.block_ids, save.lo, save.hi)

    def save_kv_layer(self, layer_name: str, meta: PreftConnectorMetadata) -> None:
        """The forward wrote this layer: stage its blocks (on the copy thread). The step's
        plan is made at its first layer: vLLM starts the step's loads (start_load_kv)
        only after the forward when none must precede it."""
        if not meta.saves:
            return
        if not self._planned:
            self._planned = True
            self._plan_saves(meta.saves)
        self.endpoint.staging.save_layer(self._layer_index[layer_name])

    def wait_for_save(self) -> None:
        """The forward ended: its staging copies are complete before the step's output
        (and so before any request of it finishes and hands its KV over). A step that
        did not save every layer stages nothing: those prompts take the held path."""
        if self._loads:
            self._finish_loads()
        self._planned = False
        pool = self.endpoint.staging
        if pool is not None and pool.planned:
            pool.finish_step(len(self._layer_index))

    def _fail_recv(self, recv: _Recv) -> None:
        """The request fails: an async load in ``failed_recving``; a sync one (scheduled to
        run this step) by its blocks, reported invalid (``get_block_ids_with_load_errors``)."""
        h = recv.handle
        log.error("KV transfer %s for %s failed: %s", h and h.transfer_id, recv.req_id,
                  recv.failed)
        if h is not None:
            try:
                self.endpoint.record(TransferRecord(
                    h.transfer_id, f"{h.host}:{h.port}", len(recv.local_block_ids), 0, 0.0,
                    ok=False, error=recv.failed))
            except Exception:
                log.exception("recording failed KV transfer %s", h.transfer_id)
        with self._done_lock:
            if recv.sync:
                self._invalid.update(recv.local_block_ids)
            else:
                self._recv_failed.add(recv.req_id)
        self.endpoint.wake.set()

    # ---------------------------------------------------------------- decode: layer-wise
    def _start_layer_load(self, recv: _Recv) -> None:
        """Before the forward: the tail block now; each layer's others in its attention."""
        h = recv.handle
        load = LayerLoad(recv.req_id, recv.claim, recv.start_block, recv.local_block_ids,
                         self.endpoint.transport.layers, f"{h.host}:{h.port}",
                         self.endpoint.layout.bytes_per_block)
        self._loads.append(load)
        load.copy_tail()

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._loads:
            return
        i = self._layer_index.get(layer_name)
        if i is None:   # not a layer we know: each load misses it, and settle fails it
            log.error("wait_for_layer_load of unknown layer %r", layer_name)
            return
        for load in self._loads:
            try:
                load.load_layer(i)
            except Exception as e:   # that request's load fails, never the forward
                load.fail(f"{type(e).__name__}: {e}")

    def _finish_loads(self) -> None:
        """The forward is over: record each layer-wise load; a failed one's blocks are
        reported invalid, which fails its request (kv_load_failure_policy=fail)."""
        loads, self._loads = self._loads, []
        for load in loads:
            try:
                load.settle()
            except Exception as e:
                load.fail(f"{type(e).__name__}: {e}")
            if load.failed:
                log.error("layer-wise load of KV transfer %d for %s failed: %s",
                          load.claim.transfer_id, load.req_id, load.failed)
                with self._done_lock:
                    self._invalid.update(load.dst_block_ids)
            self.endpoint.record(load.record())

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._done_lock:
            bad, self._invalid = self._invalid, set()
        return bad

    # ---------------------------------------------------------------- decode: pulls
    def _pull(self, recv: _Recv) -> None:
        h = recv.handle
        ok = False
        try:
            self.endpoint.pull(h, recv.start_block, recv.local_block_ids)
            ok = True
        except Exception as e:
            log.error("pull of KV transfer %d for %s failed: %s", h.transfer_id,
                      recv.req_id, e)
        with self._done_lock:
            (self._recv_done if ok else self._recv_failed).add(recv.req_id)
        self.endpoint.wake.set()

    def _release(self, handle: KVHandle) -> None:
        try:
            self.endpoint.send_release(handle)
        except Exception as e:  # the holder's TTL frees them anyway
            log.warning("release of KV transfer %d failed: %s", handle.transfer_id, e)

    def get_transfer_results(self) -> KVConnectorTransferResults:
        if self.endpoint.is_producer:
            try:
                return KVConnectorTransferResults(finished_sending=self.endpoint.take_finished())
            except Exception:   # asked again next step; the engine goes on
                log.exception("collecting finished KV transfers failed")
                return KVConnectorTransferResults()
        with self._done_lock:
            done, failed = self._recv_done, self._recv_failed
            self._recv_done, self._recv_failed = set(), set()
        return KVConnectorTransferResults(finished_recving=done | failed, failed_recving=failed)

    def shutdown(self) -> None:
        """The engine is going away: its caches may no longer be served or written."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.endpoint.close()


def endpoint_for(kv_transfer_config: Any, role: KVConnectorRole):
    """The endpoint this side of the connector uses: the one the worker created with the
    engine (its very object: the engine core runs in the worker's process); in a rank's
    process of a tensor-parallel engine, a new endpoint of that rank's, from the
    :class:`~kv_transfer.ranks.RankSpec` the worker's ``RankedEndpoint`` pickled to."""
    ep = kv_transfer_config.kv_connector_extra_config.get(EXTRA_CONFIG_KEY)
    if isinstance(ep, RankSpec) and role == KVConnectorRole.WORKER:
        from vllm.distributed import get_tensor_model_parallel_rank

        ep = ep.open_rank(get_tensor_model_parallel_rank())
    elif not isinstance(ep, RankedEndpoint):
        return KVEndpoint.of(kv_transfer_config)
    check_engine(ep, kv_transfer_config)
    return ep


class PreftKVConnector(KVConnectorBase_V1):
    """What vLLM loads: delegates to the scheduler side or the worker side by role."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        endpoint = endpoint_for(vllm_config.kv_transfer_config, role)
        block_size = vllm_config.cache_config.block_size
        self.scheduler: PreftConnectorScheduler | None = None
        self.worker: PreftConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = PreftConnectorScheduler(endpoint, block_size)
        else:
            self.worker = PreftConnectorWorker(endpoint, block_size)

    # ================================================================ scheduler side
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.update_connector_output(connector_output)

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PreftConnectorMetadata)
        self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors() if self.worker else set()

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PreftConnectorMetadata)
        self.worker.save_kv_layer(layer_name, meta)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self.worker.get_transfer_results()

    def build_connector_worker_meta(self) -> RankReport | None:
        return self.worker.build_worker_meta()

    def get_finished(self, finished_req_ids: set[str]):
        r = self.worker.get_transfer_results()
        return r.finished_sending or None, r.finished_recving or None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
