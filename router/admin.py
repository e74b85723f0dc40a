"""The adapter and cluster RPCs: the control plane beside a request's path.

No ``Generate`` passes through here; these RPCs change what a later request finds at step 2
(``router/generate.py``). ``RegisterAdapter`` stages an upload in the store, has a prefill
(or colocated) worker validate the tensors, commits them by content address and writes the
next version to Redis; ``DeleteAdapter`` removes the record, the store copy and every
worker's copies; ``ListAdapters`` and ``GetAdapter`` read the registry as the caller's
tenant sees it. ``ClusterStatus`` reports the pools, and ``_sync_members`` adds the workers
that heartbeat into the pools that placement picks from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from cluster.adapter_store import Retirements, UploadWriter, check_adapter_name, held_versions
from cluster.errors import (AdapterStoreError, InvalidAdapter, PermissionDenied, PreftError,
                            WorkerUnavailable)
from cluster.messages import ADAPTER_KINDS
from cluster.state import AdapterRecord
from proto.preft.v1 import router_pb2 as pb
from router.pool import NoWorkers, WorkerHandle
from router.service_base import ServiceBase, unwrap

log = logging.getLogger(__name__)


def _adapter_pb(r: AdapterRecord) -> pb.Adapter:
    return pb.Adapter(name=r.name, version=r.version, kind=r.kind, rank=r.rank,
                      target_modules=list(r.target_modules), size_bytes=r.size_bytes,
                      sha256=r.sha256, owner=r.owner, public=r.public, created=r.created)


def _same_files(old: AdapterRecord | None, spec) -> bool:
    """An upload whose files (sha256 of their content) and kind are the current version's."""
    return old is not None and old.sha256 == spec.sha256 and old.kind == spec.kind


def _slot_fields(ws: pb.WorkerStatus, st) -> None:
    """A colocated worker's prompt-only adapter slots (``AdapterStats``; zero elsewhere)."""
    ws.decoding_requests, ws.prefill_adapters = st.decoding_requests, st.prefill_adapters
    ws.max_loras, ws.wide_steps = st.max_loras, st.wide_steps


class AdminRpcs(ServiceBase):
    """The adapter registry RPCs, ``ClusterStatus`` and membership sync."""

    # ------------------------------------------------------------------ adapters
    async def ListAdapters(self, request, context):
        async def run():
            tenant = await self._tenant(context)
            return pb.ListAdaptersResponse(adapters=[
                _adapter_pb(r) for _, r in sorted(self.view.adapters.items())
                if r.visible_to(tenant)])
        return await self._guard(context, run)

    async def GetAdapter(self, request, context):
        async def run():
            return _adapter_pb(self._adapter(request.name, await self._tenant(context)))
        return await self._guard(context, run)

    async def DeleteAdapter(self, request, context):
        async def run():
            tenant = await self._tenant(context)
            rec = self._adapter(request.name, tenant)
            if tenant not in (None, "admin") and rec.owner != tenant:
                raise PermissionDenied(f"adapter {rec.name!r} belongs to another tenant")
            await asyncio.to_thread(self.view.state.delete_adapter, rec.name)
            self.view.drop_adapter(rec.name)
            if not any(r.sha256 == rec.sha256 for r in self.view.adapters.values()):
                try:
                    await asyncio.to_thread(self.store.delete, rec.uri)
                except AdapterStoreError as e:  # the record is gone: a leftover copy only
                    log.warning("adapter %s deleted; its store copy stays: %s", rec.name, e)
            await self._broadcast(f"drop_adapter({rec.name!r})",
                                  lambda w: w.actor.drop_adapter.remote(rec.name))
            return pb.DeleteAdapterResponse(deleted=True)
        return await self._guard(context, run)

    async def RegisterAdapter(self, request_iterator, context):
        async def run():
            tenant = await self._tenant(context)
            first = await anext(request_iterator.__aiter__(), None)
            if first is None or not first.HasField("header"):
                raise InvalidAdapter("the first upload message must be a header with the name")
            h = first.header
            check_adapter_name(h.name)
            if h.kind and h.kind not in ADAPTER_KINDS:  # empty: the files say which
                raise InvalidAdapter(f"kind {h.kind!r} is not supported; supported: "
                                     f"{list(ADAPTER_KINDS)}")
            old = self.view.adapters.get(h.name)
            if old is not None and tenant not in (None, "admin") and old.owner != tenant:
                raise PermissionDenied(f"adapter {h.name!r} belongs to another tenant")
            writer = UploadWriter(self.store, self.cfg.max_adapter_bytes)
            try:  # nothing stays in the store unless it validated: clean up before answering
                async for msg in request_iterator:
                    if not msg.HasField("chunk"):
                        raise InvalidAdapter("only one header per upload")
                    writer.write(msg.chunk.filename, msg.chunk.data)
                staged = await asyncio.to_thread(self.store.publish_staged, writer.finish())
                spec = await self._validate_upload(staged, h.kind)
                if h.kind and h.kind != spec.kind:
                    raise InvalidAdapter(f"the header says kind {h.kind!r} but the files are a "
                                         f"{spec.kind} adapter; fix the header or the files")
            except BaseException:
                writer.abort()
                raise
            return _adapter_pb(await self._commit(writer, h, spec, old, tenant))

        return await self._guard(context, run)

    async def _commit(self, writer: UploadWriter, h, spec, old: AdapterRecord | None,
                      tenant: str | None) -> AdapterRecord:
        """Validated files to their content address and the registry's next version (or
        the current one, for identical files); the version replaced is retired."""
        _, lock = self._retirements()
        async with lock:   # no retired copy is deleted between commit and record
            try:
                uri = await asyncio.to_thread(self.store.commit, writer.dir, spec.sha256)
            except BaseException:
                writer.abort()
                raise
            state = self.view.state
            # the registry's own record, not the view's (a refresh may not have it yet)
            old = await asyncio.to_thread(state.get_adapter, h.name)
            if _same_files(old, spec):   # identical content: no new version
                return await self._keep(old, h.public)
            version = await asyncio.to_thread(state.next_version, h.name)
            rec = AdapterRecord(h.name, spec.kind, version, spec.sha256, spec.rank,
                                tuple(spec.target_modules), spec.size_bytes,
                                owner=tenant or "", public=h.public, uri=uri)
            await asyncio.to_thread(state.put_adapter, rec)
            self.view.put_adapter(rec)
        if old is not None:  # every cached copy of older versions goes
            await self._broadcast(f"invalidate({h.name!r}, {version})",
                                  lambda w: w.actor.invalidate.remote(h.name, version))
            if old.sha256 != rec.sha256:
                self._retire(old)
        return rec

    # ------------------------------------------------------------------ retired versions
    def _retirements(self) -> tuple[Retirements, asyncio.Lock]:
        """Store copies of replaced versions waiting to be deleted, and the lock that keeps
        their deletion apart from a registration's commit (made on first use)."""
        if "_retired" not in self.__dict__:
            self.__dict__["_retired"] = (Retirements(self.cfg.request_timeout_s),
                                         asyncio.Lock())
            self.__dict__["_retire_wake"] = asyncio.Event()   # a copy added: sweep sooner
        return self.__dict__["_retired"]

    def _retire(self, old: AdapterRecord) -> None:
        """``old`` was replaced: its store copy goes once nothing can still want it
        (:class:`~cluster.adapter_store.Retirements`), deleted by a sweep that runs while
        any copy is pending."""
        retired, _ = self._retirements()
        retired.add(old.name, old.version, old.sha256, old.uri)
        task = self.__dict__.get("_retire_sweep")
        if task is None or task.done():
            self.__dict__["_retire_sweep"] = asyncio.get_running_loop().create_task(
                self._sweep_retired())
        else:
            self.__dict__["_retire_wake"].set()

    async def _sweep_retired(self) -> None:
        retired, _ = self._retirements()
        wake = self.__dict__["_retire_wake"]
        while len(retired):
            wake.clear()
            try:  # until the earliest grace ends, or a new copy (its grace may end sooner)
                await asyncio.wait_for(wake.wait(), max(retired.next_due_in(),
                                                        self.cfg.state_refresh_s))
                continue
            except asyncio.TimeoutError:
                pass
            try:
                await self._delete_due()
            except Exception as e:  # Redis or the store away: the copies wait, and we retry
                log.warning("deleting replaced adapter versions' store copies: %s", e)

    async def _delete_due(self) -> None:
        retired, lock = self._retirements()
        state = self.view.state

        def read() -> tuple[set[str], set[tuple[str, int]]]:
            live = {r.sha256 for r in state.list_adapters().values()}
            return live, held_versions(state.residency(list(state.members())))

        async with lock:
            live, held = await asyncio.to_thread(read)
            for c in retired.due(live, held):
                try:
                    await asyncio.to_thread(self.store.delete, c.uri)
                except AdapterStoreError as e:
                    log.warning("adapter %s v%d: its store copy stays for now: %s",
                                c.name, c.version, e)
                    retired.add(c.name, c.version, c.sha256, c.uri)
                else:
                    log.info("adapter %s v%d was replaced; its store copy %s is deleted",
                             c.name, c.version, c.uri)

    async def _keep(self, rec: AdapterRecord, public: bool) -> AdapterRecord:
        """Re-registered identical files: the current version stays (a restart's start-up
        adapters, a retried upload); only its visibility follows the new header."""
        if rec.public != public:
            rec = replace(rec, public=public)
            await asyncio.to_thread(self.view.state.put_adapter, rec)
            self.view.put_adapter(rec)
        return rec

    async def _validate_upload(self, staged: str, kind: str):
        """Tensor-level checks need torch: a prefill (or colocated) worker does them, as
        ``kind`` (empty: what the files declare); ``staged`` is a path in a shared store or
        a URI the worker fetches (``AdapterStore.publish_staged``)."""
        try:
            validator = self.pool.pick_adapter_host(None)
        except NoWorkers as e:  # else gRPC answers UNKNOWN "Unexpected NoWorkers"
            raise WorkerUnavailable(f"cannot validate the adapter now: {e}; retry") from None
        try:
            return await validator.actor.validate_adapter.remote(staged, kind or None)
        except Exception as e:
            cause = unwrap(e)
            if isinstance(cause, PreftError):
                raise cause from None
            raise WorkerUnavailable(
                f"adapter validation failed on {validator.worker_id}: {cause}") from None

    async def _broadcast(self, what: str, call: Callable[[WorkerHandle], Awaitable]) -> None:
        """``call`` on every healthy adapter host (prefill and colocated workers) at once,
        then each awaited; ``what`` names the call in the log when a host fails."""
        hosts = [w for w in self.pool.adapter_hosts() if w.healthy]
        refs = [call(w) for w in hosts]
        for w, ref in zip(hosts, refs):
            try:
                await asyncio.wait_for(ref, 30)
            except Exception as e:  # a dead worker has nothing cached; log and go on
                log.warning("%s on %s failed: %s", what, w.worker_id, e)

    # ------------------------------------------------------------------ cluster
    async def _sync_members(self, members) -> None:
        import ray

        alive = set(members)
        for wid, rec in members.items():
            if self.pool.find(wid) is None and rec.actor_name:
                try:
                    actor = ray.get_actor(rec.actor_name)
                    info = await asyncio.wait_for(actor.info.remote(), 10)
                    self.pool.add(WorkerHandle(info, actor))
                    log.info("worker %s joined the %s pool", wid, info.role)
                except Exception as e:
                    log.warning("member %s (%s) not reachable yet: %s", wid, rec.actor_name, e)
        self.pool.mark_alive(alive)

    async def ClusterStatus(self, request, context):
        async def run():
            await self._tenant(context)
            out = []
            for w in self.pool.all():
                ws = pb.WorkerStatus(worker_id=w.worker_id, role=w.info.role, healthy=w.healthy,
                                     outstanding=w.outstanding,
                                     tensor_parallel_size=w.info.tensor_parallel_size)
                try:
                    if w.info.role in ("decode", "colocated"):
                        u = await asyncio.wait_for(w.actor.kv_usage.remote(), 5)
                        ws.kv_blocks_total, ws.kv_blocks_free = u.blocks_total, u.blocks_free
                    if w.info.role in ("prefill", "colocated"):
                        st = await asyncio.wait_for(w.actor.stats.remote(), 5)
                        ws.kv_bytes_sent, ws.held_transfers = st.bytes, st.held
                        ws.resident.update(st.resident)
                        _slot_fields(ws, st)
                except Exception:  # unreachable: fall back to what it last published
                    ws.healthy = False
                    if w.info.role in ("prefill", "colocated"):
                        ws.resident.update(await asyncio.to_thread(self._residency, w.worker_id))
                out.append(ws)
            return pb.ClusterStatusResponse(workers=out, router_inflight=self.inflight,
                                            adapters=len(self.view.adapters),
                                            state_stale=self.view.stale)
        return await self._guard(context, run)

    def _residency(self, worker_id: str) -> dict[str, str]:
        try:
            return self.view.state.residency([worker_id])[worker_id]
        except Exception:
            return {}
