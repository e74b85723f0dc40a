"""PreFT's vLLM v1 KV connector: hooks both engines into the KV transfer (step 4).

Loaded by vLLM through ``kv_transfer_config = {"kv_connector": "PreftKVConnector",
"kv_connector_module_path": "kv_transfer.connector", "kv_role": ...}`` — no fork of vLLM.

Producer (prefill engine, ``kv_producer``): a request sent with ``kv_transfer_params =
{"do_remote_decode": True}`` runs as usual (prompt with its adapter, one sampled token).
When it finishes, :meth:`request_finished` keeps its prompt blocks (delayed free) and
returns ``{transfer_id, num_tokens, num_blocks}``, which vLLM attaches to the request's
output. The worker side offers those blocks to the transport, which sends them when the
decode side pulls, and reports the request in ``finished_sending`` so vLLM frees them.

Consumer (decode engine, ``kv_consumer``): a request whose ``kv_transfer_params`` is a
:class:`~cluster.messages.KVHandle` (``do_remote_prefill``) declares the prompt's tokens
external (:meth:`get_num_new_matched_tokens`), beyond whatever its own prefix cache holds
under the same cache salt. vLLM allocates blocks; the worker side pulls the remote blocks
into them on a background thread and reports ``finished_recving`` (or ``failed_recving``,
which fails the request: vLLM's ``kv_load_failure_policy`` is ``fail``, never a silent
base-model recompute of an adapter-conditioned prompt).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from cluster.messages import KVHandle
from kv_transfer.layout import KVLayout
from kv_transfer.runtime import hooks_for
from kv_transfer.transport import TRANSPORTS, Offer, OfferTable

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
    handle: KVHandle
    start_block: int
    local_block_ids: list[int]


@dataclass
class PreftConnectorMetadata(KVConnectorMetadata):
    """Scheduler → worker, once per engine step."""

    offers: list[Offer] = field(default_factory=list)
    recvs: list[_Recv] = field(default_factory=list)
    releases: list[KVHandle] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)   # prompt KV gone after a preemption


# Set in a consumer request's kv_transfer_params once its prompt KV was loaded (or found in
# the local prefix cache): from then on, a missing prompt block can never be pulled again.
_LOADED = "preft_loaded"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PreftKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = vllm_config.kv_transfer_config
        self.engine_id = cfg.engine_id
        self.is_producer = cfg.kv_role == "kv_producer"
        if cfg.kv_role not in ("kv_producer", "kv_consumer"):
            raise ValueError(f"PreftKVConnector: kv_role must be kv_producer (prefill) or "
                             f"kv_consumer (decode), got {cfg.kv_role!r}")
        self.block_size = vllm_config.cache_config.block_size
        extra = cfg.kv_connector_extra_config
        self.local_host = extra.get("kv_host", "127.0.0.1")
        self.timeout_s = float(extra.get("transfer_timeout_s", 30.0))
        self.hold_ttl_s = float(extra.get("hold_ttl_s", 120.0))
        self.transport_name = extra.get("transport", "torch_dist")
        self._secret = str(extra.get("secret", ""))  # the cluster's: pairs only within it
        if self.transport_name not in TRANSPORTS:
            raise ValueError(f"PreftKVConnector: unknown transport {self.transport_name!r}; "
                             f"known: {sorted(TRANSPORTS)}")
        self.hooks = hooks_for(self.engine_id)
        # scheduler side
        self._meta = PreftConnectorMetadata()
        # worker side
        self.transport = None
        self.layers: list = []
        self._pool: ThreadPoolExecutor | None = None
        self._done_lock = threading.Lock()
        self._recv_done: set[str] = set()
        self._recv_failed: set[str] = set()

    # ================================================================ scheduler side
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if self.is_producer or not params or not (params.get("do_remote_prefill")
                                                  or params.get(_LOADED)):
            return 0, False
        count = int(params["num_tokens"]) - num_computed_tokens
        # A request loaded once and scheduled again with part of its prompt missing was
        # preempted and its blocks evicted: prefill has freed its copy, and recomputing the
        # prompt here would be the base model's KV. It is "loaded" again, and that load
        # fails (update_state_after_alloc), which fails the request (retriable).
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
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
        params["do_remote_prefill"] = False  # one transfer per request
        params[_LOADED] = True
        if num_external_tokens == 0:
            # Our own prefix cache (same adapter + version salt) already has the prompt.
            self._meta.releases.append(handle)
            return
        local = blocks.get_unhashed_block_ids()
        start_token = handle.num_tokens - num_external_tokens
        if start_token % self.block_size:
            raise RuntimeError(f"local prefix hit ends mid-block at token {start_token}")
        start_block = start_token // self.block_size
        want = handle.num_blocks - start_block
        if len(local) != want:
            raise RuntimeError(f"decode allocated {len(local)} blocks for {want} remote "
                               f"blocks of transfer {handle.transfer_id}")
        self._meta.recvs.append(_Recv(request.request_id, handle, start_block, local))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta, self._meta = self._meta, PreftConnectorMetadata()
        return meta

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if not params:
            return False, None
        if not self.is_producer:
            if params.get("do_remote_prefill"):
                # Aborted before it was ever scheduled: free the prefill side's blocks.
                self._meta.releases.append(KVHandle.from_params(params))
                params["do_remote_prefill"] = False
            return False, None
        if not params.get("do_remote_decode") or not request.is_finished():
            return False, None
        from vllm.v1.request import RequestStatus

        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or errored: nothing to hand over
        num_tokens = request.num_computed_tokens
        num_blocks = _cdiv(num_tokens, self.block_size)
        if num_tokens < 1 or len(block_ids) < num_blocks:
            return False, None
        transfer_id = secrets.randbits(62)
        offer = Offer(transfer_id, request.request_id, list(block_ids[:num_blocks]), num_tokens,
                      expires_at=time.monotonic() + self.hold_ttl_s)
        if self.hooks.offers is not None:
            # In-process engine (how our workers run it): offer the blocks now. Through the
            # next step's metadata they would appear only when that step runs -- with
            # vLLM's async scheduling, after a whole further step, which on a slow prefill
            # step outlasted the decode side's claim timeout.
            self.hooks.offers.add(offer)
        else:
            self._meta.offers.append(offer)
        return True, {"transfer_id": transfer_id, "num_tokens": num_tokens,
                      "num_blocks": num_blocks}

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.layers = list(kv_caches.values())
        layout = KVLayout.from_tensors(self.layers, self.block_size)
        self.transport = TRANSPORTS[self.transport_name](
            self.layers, layout, local_host=self.local_host, timeout_s=self.timeout_s,
            engine_name=self.engine_id, on_record=self.hooks.record, secret=self._secret)
        self.hooks.layout_fingerprint = layout.fingerprint()
        self.hooks.transport = self.transport
        if self.is_producer:
            self.hooks.offers = OfferTable()
            self.hooks.address = self.transport.serve(self.hooks.offers)
        else:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")
        self.hooks.ready.set()

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PreftConnectorMetadata)
        for offer in meta.offers:
            self.hooks.offers.add(offer)
        for recv in meta.recvs:
            self._pool.submit(self._pull, recv)
        for handle in meta.releases:
            self._pool.submit(self._release, handle)
        if meta.lost:
            log.error("requests %s lost their prompt KV (preempted); failing them rather than "
                      "recomputing the prompt without its adapter", meta.lost)
            with self._done_lock:
                self._recv_failed.update(meta.lost)
            self.hooks.wake.set()

    def _pull(self, recv: _Recv) -> None:
        h = recv.handle
        ok = False
        try:
            self.transport.pull(h.host, h.port, h.transfer_id, recv.start_block,
                                recv.local_block_ids)
            ok = True
        except Exception as e:
            log.error("pull of KV transfer %d for %s failed: %s", h.transfer_id,
                      recv.req_id, e)
        with self._done_lock:
            (self._recv_done if ok else self._recv_failed).add(recv.req_id)
        self.hooks.wake.set()

    def _release(self, handle: KVHandle) -> None:
        try:
            self.transport.release(handle.host, handle.port, handle.transfer_id)
        except Exception as e:  # the holder's TTL frees them anyway
            log.warning("release of KV transfer %d failed: %s", handle.transfer_id, e)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self.is_producer:
            return KVConnectorTransferResults(finished_sending=self.hooks.offers.take_finished())
        with self._done_lock:
            done, failed = self._recv_done, self._recv_failed
            self._recv_done, self._recv_failed = set(), set()
        return KVConnectorTransferResults(finished_recving=done | failed, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]):
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
