"""Prefill worker: runs prompts with their adapter and hands the adapter-conditioned KV to decode."""
