"""Per-process meeting point between a worker actor and the connector inside its engine.

vLLM builds our connector itself (from ``kv_connector_module_path``), so the worker cannot
hand it objects. Both run in the same process (in-process engine, ``uni`` executor), and
meet here by engine id: the connector publishes its KV server address and transfer records,
and wakes the worker's engine loop when a transfer completes.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from kv_transfer.transport import OfferTable, TransferRecord


@dataclass
class EngineKVHooks:
    engine_id: str
    wake: threading.Event = field(default_factory=threading.Event)
    address: tuple[str, int] | None = None
    layout_fingerprint: str = ""
    offers: OfferTable | None = None
    transport: object = None            # the engine's KVTransport (for membership pruning)
    records: deque = field(default_factory=lambda: deque(maxlen=10_000))
    by_transfer: dict[int, TransferRecord] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rec: TransferRecord) -> None:
        with self._lock:
            self.records.append(rec)
            self.by_transfer[rec.transfer_id] = rec
            if len(self.by_transfer) > 10_000:
                self.by_transfer.pop(next(iter(self.by_transfer)))
        self.wake.set()

    def pop_record(self, transfer_id: int) -> TransferRecord | None:
        with self._lock:
            return self.by_transfer.pop(transfer_id, None)


_HOOKS: dict[str, EngineKVHooks] = {}
_LOCK = threading.Lock()


def hooks_for(engine_id: str) -> EngineKVHooks:
    with _LOCK:
        h = _HOOKS.get(engine_id)
        if h is None:
            h = _HOOKS[engine_id] = EngineKVHooks(engine_id)
        return h
