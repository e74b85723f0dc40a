"""Adapter kinds the prefill pool can apply (step 3 of the request path).

Each kind is a small module with its formula in the docstring, a typed config and a loader
that validates files, shapes, dtype and rank before anything reaches an engine. The
registry (:mod:`.base`) maps a kind name (as stored with the adapter) to its validator;
importing this package imports the kinds, which register themselves there.
"""

from prefill_worker.adapters.base import AdapterSpec, KINDS, detect_kind, validate_adapter  # noqa: F401
from prefill_worker.adapters import alora, lora_p, reft_p  # noqa: F401,E402  (register the kinds)
