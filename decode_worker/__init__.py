"""Decode worker: step 5 of the request path.

Receives a prompt's adapter-conditioned KV from a prefill worker into its own blocks and
decodes with the base model only, continuously batched with every other user's requests.
This package never imports adapter code, and its engine is built without LoRA.
"""
