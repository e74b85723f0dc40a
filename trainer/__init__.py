"""Adapter trainer: produces the adapters the cluster serves (before the request path).

``trainer.train`` fine-tunes ``lora_p`` (PEFT LoRA applied to prompt tokens only),
``reft_p`` (LoReFT/DiReFT interventions at prompt positions) and plain all-token ``lora``
on a JSONL of prompt/response pairs, with the PreFT semantics the cluster serves: the adapter
conditions the prompt (and so its KV cache and the first generated token); every later
response token runs through the base weights attending to that KV. The output directories
load as is in the prefill worker (``prefill_worker/adapters``). ``trainer.quality`` is the
small-scale SFT quality study (PreFT vs. all-token LoRA vs. base) and ``trainer.cli`` the
``preft train`` subcommand. Heavy imports (torch, transformers, peft) happen inside
functions.
"""
