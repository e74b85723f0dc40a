"""vLLM general plugin (entry point ``vllm.general_plugins``): our grouped LoRA kernel in
engines we do not construct ourselves.

The prefill worker installs the grouped kernel directly before it builds its engine. A
stock ``vllm.entrypoints.openai.api_server`` (the multi-LoRA baseline of ``preft bench``)
builds its engine in a process we never run code in; vLLM calls every general plugin in
every process it starts, so setting ``PREFT_LORA_KERNEL=grouped`` in its environment is
enough. Unset or ``stock``, the plugin does nothing (engines stay stock). ``grouped`` on a
platform other than vLLM's CPU backend, or any other value, is an error: the engine must
not start with a kernel other than the one asked for.
"""

from __future__ import annotations

import os


def load() -> None:
    kernel = os.environ.get("PREFT_LORA_KERNEL", "")
    if kernel in ("", "stock"):
        return
    if kernel != "grouped":
        raise RuntimeError(f"PREFT_LORA_KERNEL={kernel!r}: use 'grouped', 'stock' or unset it")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise RuntimeError(
            f"PREFT_LORA_KERNEL=grouped: the grouped LoRA kernel is for vLLM's CPU backend, "
            f"this engine runs on {type(current_platform).__name__}; unset the variable")
    from lora_kernel.grouped_lora import install_grouped_lora

    install_grouped_lora(every_process=True)
