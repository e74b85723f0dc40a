"""Colocated worker: steps 3-5 of the request path in one engine, no KV moves.

One vLLM engine applies each request's adapter to its prompt positions only (LoRA-P
through a per-token mapping by position, ReFT-P through the prefill pool's engine hook),
samples the first token from the adapted prompt forward, and decodes every later token
with the base weights in the same continuous batch as other users' prompt chunks. It is the
paper's own serving shape, the better one on a single device, and the only pool that
serves all-token LoRA adapters (kind ``lora``).
"""
