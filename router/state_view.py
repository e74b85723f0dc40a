"""The router's cached view of the Redis cluster state (step 2 reads it on every request).

A background task refreshes adapters, API-key hashes and worker membership every
``refresh_s``. If Redis is unreachable the router keeps serving from the last view
(``stale`` is set and reported in ClusterStatus) and resyncs when it answers again.
Membership changes grow or shrink the :class:`~router.pool.WorkerPool`: a new worker
record is looked up as a Ray actor by name; an expired one is marked unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cluster.state import AdapterRecord, ClusterState, MemberRecord, hash_key

log = logging.getLogger(__name__)


class StateView:
    def __init__(self, state: ClusterState, refresh_s: float = 1.0) -> None:
        self.state = state
        self.refresh_s = refresh_s
        self.adapters: dict[str, AdapterRecord] = {}
        self.key_tenants: dict[str, str] = {}
        self.members: dict[str, MemberRecord] = {}
        self.stale = False
        self.last_sync = 0.0
        self._task: asyncio.Task | None = None
        self.on_members = None  # callback(members) -> awaitable

    def sync_once(self) -> None:
        """Blocking refresh (run in a thread)."""
        adapters = self.state.list_adapters()
        keys = self.state.api_keys()
        members = self.state.members()
        self.adapters, self.key_tenants, self.members = adapters, keys, members
        self.last_sync = time.time()

    async def refresh(self) -> None:
        try:
            await asyncio.to_thread(self.sync_once)
            if self.stale:
                log.warning("Redis reachable again: state resynced")
            self.stale = False
        except Exception as e:
            if not self.stale:
                log.warning("Redis unreachable (%s): serving from the cached view", e)
            self.stale = True
            return
        if self.on_members is not None:
            await self.on_members(self.members)

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def tenant_for_key(self, api_key: str) -> str | None:
        """The key's tenant from the cached view; a miss asks Redis in a thread (a key
        created since the last refresh), so the router's event loop never blocks on it."""
        hashed = hash_key(api_key)
        tenant = self.key_tenants.get(hashed)
        if tenant is None and not self.stale:
            try:
                tenant = await asyncio.to_thread(self.state.tenant_for, api_key)
            except Exception:
                return None
            if tenant is not None:
                self.key_tenants[hashed] = tenant
        return tenant

    def put_adapter(self, rec: AdapterRecord) -> None:
        self.adapters[rec.name] = rec

    def drop_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
