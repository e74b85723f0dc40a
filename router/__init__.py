"""The router: steps 1, 2 and 6 of a request's path (gRPC in, placement, tokens out).

Imports neither torch nor vLLM: it talks to the worker pools through Ray actor handles and
typed messages, and never touches KV bytes.

Modules, one job each: ``server`` (the gRPC server: composes ``RouterService``, TLS, the
bind check), ``service_base`` (the state and caller's tenant every RPC shares),
``generate`` (the Generate path), ``admin`` (the adapter RPCs, ``ClusterStatus``,
membership sync), ``pool`` (placement), ``state_view`` (the cached Redis view),
``metrics``.
"""
