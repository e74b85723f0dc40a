"""What both worker pools share: process setup and the thread that drives a vLLM engine.

Steps 3 and 5 of the request path run inside these: a worker actor (prefill or decode)
hands requests to an :class:`~worker_runtime.engine_loop.EngineLoop`, which owns the vLLM
engine in one thread and streams its outputs back to the actor's asyncio loop.
"""
