"""The router: steps 1, 2 and 6 of a request's path (gRPC in, placement, tokens out).

Imports neither torch nor vLLM: it talks to the worker pools through Ray actor handles and
typed messages, and never touches KV bytes.
"""
