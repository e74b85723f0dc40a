"""KV transfer: step 4 of a request's path.

The prefill engine keeps a finished prompt's adapter-conditioned KV blocks and offers them
under a transfer id; the decode engine pulls them into its own blocks before it computes
the first generated token. Each engine process has one :class:`kv_transfer.endpoint.KVEndpoint`
(address, layout, offers and their one release route, pruning, transfer records), created
by the worker actor with its engine and handed to the engine's connector in the KV transfer
config. Both engines are hooked into vLLM through our own v1 KV connector
(:mod:`kv_transfer.connector`, loaded with ``kv_connector_module_path``; a scheduler side
and a worker side, as vLLM's NIXL connector). :mod:`kv_transfer.transport` runs each pull:
control over ZeroMQ with CURVE (:mod:`kv_transfer.control`), held KV owned by
:mod:`kv_transfer.offers`, bytes through memfd shared memory (:mod:`kv_transfer.shm`), CUDA
IPC (:mod:`kv_transfer.cuda_ipc`) or a pairwise torch.distributed group
(:mod:`kv_transfer.group`: gloo on CPU, NCCL on GPU). The router only ever sees a
:class:`cluster.messages.KVHandle`, never KV bytes.
"""
