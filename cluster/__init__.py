"""The ground floor: what every part of PreFT Serve shares, importing nothing of the project
above it (tests/unit/test_import_boundaries.py).

Configs (:mod:`cluster.config`, frozen dataclasses parsed from YAML through pydantic),
typed messages of the Ray calls (:mod:`cluster.messages`, the ``KVHandle`` included), errors
(:mod:`cluster.errors`), the Redis codec and cluster state (:mod:`cluster.state`), the adapter
store (:mod:`cluster.adapter_store`) and the base model's limits (:mod:`cluster.model_info`).
The program that starts a cluster lives one floor up and more: :mod:`app`.
"""
