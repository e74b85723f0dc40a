"""Our grouped multi-adapter LoRA kernel for vLLM's CPU backend, and the vLLM plugin that
installs it (the pools' floor).

The prefill and colocated workers install the kernel (:mod:`lora_kernel.grouped_lora`)
before they build their engine; :mod:`lora_kernel.vllm_plugin` is the ``vllm.general_plugins``
entry point that does it in engines we do not build (``preft bench``'s multi-LoRA baseline,
``PREFT_LORA_KERNEL=grouped``). vLLM loads that plugin in *every* engine process, the decode
pool's too, so this package's ``__init__`` and the plugin module import nothing until a
kernel is asked for: a decode engine never loads adapter code.
"""
