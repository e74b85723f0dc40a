"""vLLM general plugin (entry point ``vllm.general_plugins``): our grouped LoRA kernel in
engines we do not construct ourselves.

The prefill worker installs the grouped kernel directly before it builds its engine. A
stock ``vllm.entrypoints.openai.api_server`` (the multi-LoRA baseline of ``preft bench``)
builds its engine in a process we never run code in; vLLM calls every general plugin in
every process it starts, so setting ``PREFT_LORA_KERNEL=grouped`` in its environment is
enough. Without that variable the plugin does nothing (engines stay stock).
"""

from __future__ import annotations

import os


def load() -> None:
    if os.environ.get("PREFT_LORA_KERNEL", "") != "grouped":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from prefill_worker.grouped_lora import install_grouped_lora

        install_grouped_lora(every_process=True)
