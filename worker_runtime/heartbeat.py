"""Worker membership: a thread that refreshes this worker's Redis record (with a TTL).

The router treats a worker whose record expired as gone (it stops placing requests on it)
and picks up new records to grow the pools. Prefill workers also publish which adapters
they hold (residency). A Redis outage only pauses the beats; serving goes on.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from cluster.state import ClusterState, MemberRecord

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, redis_url: str, rec: MemberRecord, period_s: float,
                 residency: Callable[[], dict[str, str]] | None = None,
                 on_members: Callable[[dict[str, MemberRecord]], None] | None = None,
                 members_every: int = 5) -> None:
        self.state = ClusterState.from_url(redis_url)
        self.rec = rec
        self.period_s = period_s
        self.residency = residency
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._failing = False
        self.on_members = on_members
        self.members_every = members_every
        self._beats = 0
        self._last_members: dict[str, MemberRecord] | None = None

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        try:
            self.state.heartbeat(self.rec, ttl_s=max(10.0, 5 * self.period_s))
            if self.residency is not None:
                self.state.set_residency(self.rec.worker_id, self.residency())
            if self._failing:
                log.warning("%s: Redis reachable again", self.rec.worker_id)
            self._failing = False
            self._beats += 1
            if self.on_members is not None and self._beats % self.members_every == 0:
                members = self.state.members()
                # A peer counts as gone only when absent from two reads in a row.
                seen = {**(self._last_members or members), **members}
                self._last_members = members
                self.on_members(seen)
        except Exception as e:
            if not self._failing:
                log.warning("%s: heartbeat failed (%s); retrying", self.rec.worker_id, e)
            self._failing = True

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.state.leave(self.rec.worker_id)
        except Exception:
            pass
