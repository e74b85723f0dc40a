"""Adapter kinds the prefill pool can apply (step 3 of the request path).

Each kind is a small module with its formula in the docstring, a typed config and a loader
that validates files, shapes, dtype and rank before anything reaches an engine. The
registry maps a kind name (as stored with the adapter) to its validator.
"""

from prefill_worker.adapters.base import AdapterSpec, validate_adapter, KINDS  # noqa: F401
