"""Held KV by transfer id, on the prefill side, and the record of every transfer (step 4).

A prefill engine's finished prompt is an :class:`Offer`: its held cache blocks, or the
copy its forward staged. :class:`OfferTable` is the one owner of every offer from the
moment the engine keeps the blocks to their release, and the one release route: a pull
claims it, the decode side's or the worker's release frees it unsent, and the TTL
(``hold_ttl_s``) is the last resort, counted (``expired``). :class:`TransferLog` keeps the
last transfers each engine recorded, for metrics and for each request's own record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from kv_transfer.staging import Staged

log = logging.getLogger(__name__)

@dataclass
class Offer:
    """One finished prompt's KV a prefill engine keeps for decode: its cache blocks (held,
    delay-freed), or, when its forward staged them layer by layer, the staged copy (the
    blocks were freed when the request finished)."""

    transfer_id: int
    req_id: str                 # vLLM's internal request id (what get_finished reports)
    block_ids: list[int]        # held cache blocks; [] when staged
    num_tokens: int
    expires_at: float
    staged: Staged | None = None

    @property
    def num_blocks(self) -> int:
        return self.staged.num_blocks if self.staged is not None else len(self.block_ids)


@dataclass(frozen=True)
class TransferRecord:
    """One completed (or failed) transfer, as seen by the side that records it."""

    transfer_id: int
    peer: str
    num_blocks: int
    bytes: int
    seconds: float
    ok: bool
    error: str = ""
    transport: str = ""      # shm | cuda_ipc | gloo | nccl
    pipelined: bool = False  # staged layer by layer during prefill (no gather at pull)
    exposed_s: float | None = None   # decode: what the request waited for (None: seconds)

    @property
    def exposed(self) -> float:
        return self.seconds if self.exposed_s is None else self.exposed_s


class TransferLog:
    """The last transfers an engine recorded (oldest first), and each one by transfer id
    until its request takes it (:meth:`pop`). Thread-safe; bounded."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._capacity = capacity
        self._records: deque[TransferRecord] = deque(maxlen=capacity)
        self._by_transfer: dict[int, TransferRecord] = {}

    def add(self, rec: TransferRecord) -> None:
        with self._lock:
            self._records.append(rec)
            self._by_transfer[rec.transfer_id] = rec
            if len(self._by_transfer) > self._capacity:
                self._by_transfer.pop(next(iter(self._by_transfer)))

    def records(self) -> list[TransferRecord]:
        with self._lock:
            return list(self._records)

    def pop(self, transfer_id: int) -> TransferRecord | None:
        with self._lock:
            return self._by_transfer.pop(transfer_id, None)


_MAX_RELEASED = 1 << 16            # remembered early releases (each a few dozen bytes)


class OfferTable:
    """Prefill side: held blocks by transfer id. Thread-safe; no method waits but ``claim``.

    The engine thread adds offers (the connector's scheduler side) and collects finished
    request ids; serve threads claim offers for pulls. A claim may arrive before the offer
    does (the router is faster than the engine's next step), so ``claim`` waits a little.

    :meth:`release` is the one release route (the worker's own, and the decode side's
    ``release`` op through a serve thread) and never waits: an offer not here yet is
    remembered as released, and freed the moment it arrives. ``expires_at`` is the
    fallback: :meth:`take_finished` frees what nobody pulled or released in time.
    """

    def __init__(self, release_ttl_s: float = 600.0,
                 on_finish: Callable[[], None] | None = None) -> None:
        self._cv = threading.Condition()
        self._offers: dict[int, Offer] = {}
        self._finished: set[str] = set()
        self._released: dict[int, float] = {}   # transfer id -> forget after (monotonic)
        self._release_ttl_s = release_ttl_s
        self._on_finish = on_finish or (lambda: None)
        self.expired = 0
        self.on_expire: Callable[[int], None] = lambda n: None   # the last resort, counted

    def add(self, offer: Offer) -> None:
        with self._cv:
            early = offer.transfer_id in self._released   # kept: a pull of it is refused
            if early:
                self._drop_locked(offer)           # released before it arrived: free it now
            else:
                self._offers[offer.transfer_id] = offer
                self._cv.notify_all()
        if early:
            self._on_finish()

    def claim(self, transfer_id: int, timeout: float) -> Offer | None:
        """The offer, for a pull; None if it is unknown after ``timeout`` or released."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while transfer_id not in self._offers:
                left = deadline - time.monotonic()
                if left <= 0 or transfer_id in self._released:
                    return None
                self._cv.wait(left)
            return self._offers.pop(transfer_id)

    def finish(self, offer: Offer) -> None:
        """A claimed offer's held blocks may be freed (sent, or the pull refused). A staged
        offer's copy is the transport's to recycle once the peer has read it."""
        if offer.staged is None:
            with self._cv:
                self._finished.add(offer.req_id)
            self._on_finish()

    def _drop_locked(self, offer: Offer) -> None:
        """Nobody will read ``offer``: free its blocks, or recycle its staged copy."""
        if offer.staged is None:
            self._finished.add(offer.req_id)
        else:
            offer.staged.recycle()

    def release(self, transfer_id: int) -> bool:
        """Free ``transfer_id``'s blocks without sending them; never waits.

        True when held blocks were freed now; False when the offer is not here (already
        pulled or expired, or not yet arrived: then it is freed on arrival)."""
        now = time.monotonic()
        with self._cv:
            offer = self._offers.pop(transfer_id, None)
            if offer is None:
                self._released[transfer_id] = now + self._release_ttl_s
                while len(self._released) > _MAX_RELEASED:
                    self._released.pop(next(iter(self._released)))
                self._cv.notify_all()             # a waiting claim gives up now
                return False
            self._drop_locked(offer)
        self._on_finish()
        return True

    def take_finished(self, now: float | None = None) -> set[str]:
        """Request ids whose blocks may be freed: transferred, released or expired."""
        now = time.monotonic() if now is None else now
        with self._cv:
            stale = [t for t, o in self._offers.items() if o.expires_at <= now]
            for tid in stale:
                offer = self._offers.pop(tid)
                self._drop_locked(offer)
                self.expired += 1
                log.warning("KV transfer %d expired unpulled; freeing %d blocks",
                            tid, offer.num_blocks)
            for tid in [t for t, until in self._released.items() if until <= now]:
                del self._released[tid]
            done, self._finished = self._finished, set()
        if stale:
            self.on_expire(len(stale))
        return done

    def __len__(self) -> int:
        with self._cv:
            return len(self._offers)
