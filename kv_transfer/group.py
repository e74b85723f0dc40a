"""The network byte path of step 4: a two-rank torch.distributed group per prefill-decode
pair (rank 0 = prefill, rank 1 = decode), gloo when the caches are on the CPU, NCCL when
they are on a GPU. Both halves live here: the prefill side gathers the held blocks of
every layer into one ``[layers, blocks, ...]`` buffer and sends it as few large messages;
the decode side receives into the same-shaped scratch and ``index_copy_`` s per layer.

The group's rendezvous runs on the prefill endpoint's ``TCPStore`` (bound to the KV host
only) under a random prefix per pair that the two ends agreed on over the authenticated
control plane (:mod:`kv_transfer.control`); the store carries nothing else.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore

from kv_transfer.control import PairLost

_MAX_MESSAGE = 64 << 20             # bytes per send/recv
# Per-pair reusable transfer buffer, up to this size (0 disables; larger transfers allocate).
_SCRATCH_CACHE_BYTES = int(os.environ.get("PREFT_KV_SCRATCH_CACHE_BYTES", 256 << 20))


def new_prefix() -> str:
    return f"pair/{secrets.token_hex(16)}/"


def bound_store(host: str, timeout: timedelta) -> TCPStore:
    """A TCPStore server that listens on ``host`` only.

    Given a host and port, TCPStore's server listens on every interface; handed a socket
    already bound to ``host`` (``master_listen_fd``, libuv backend) it listens on that."""
    family, _, _, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(addr)
        sock.listen(128)
        store = TCPStore(host, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                         timeout=timeout, master_listen_fd=sock.fileno(), use_libuv=True)
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now
    return store


def make_pair_group(store, prefix: str, rank: int, local_host: str, device: torch.device,
                    timeout: timedelta):
    """A standalone two-rank group (independent of vLLM's default group)."""
    store = PrefixStore(prefix, store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def shutdown_group(pg) -> None:
    try:
        pg.shutdown()
    except Exception:
        pass


def wait_all(works, timeout: timedelta, device: torch.device) -> None:
    for w in works:
        if not w.wait(timeout):
            raise PairLost(f"KV transfer timed out after {timeout.total_seconds()} s")
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def scratch(layers: list[torch.Tensor], block_shape, n_blocks: int,
            cache: dict | None = None) -> torch.Tensor:
    """[layers, n_blocks, *block_shape]: all of a transfer's blocks in one buffer.

    With ``cache`` (one per pair: its transfers are sequential) the buffer is reused
    across transfers up to ``_SCRATCH_CACHE_BYTES``: a fresh multi-MiB buffer costs a
    page fault per 4 KiB on first touch, on both sides of every transfer."""
    shape = (len(layers), n_blocks, *block_shape)
    numel, dtype, device = math.prod(shape), layers[0].dtype, layers[0].device
    if cache is None or numel * dtype.itemsize > _SCRATCH_CACHE_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    flat = cache.get("scratch")
    if flat is None or flat.numel() < numel:
        flat = cache["scratch"] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def messages(buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Few large messages (whole layers, up to _MAX_MESSAGE bytes each), split the same
    way on both sides: per-layer messages cost 3-4x in gloo's per-message overhead."""
    per_layer = buf[0].numel() * buf.element_size()
    return buf.split(max(1, _MAX_MESSAGE // max(1, per_layer)))


def send_buffer(pg, buf: torch.Tensor, timeout: timedelta) -> None:
    """Prefill: ``buf`` (``[layers, blocks, ...]``) to rank 1."""
    wait_all([pg.send([c], 1, tag) for tag, c in enumerate(messages(buf))], timeout,
             buf.device)


def send_blocks(pg, layers: list[torch.Tensor], block_shape, blocks: list[int],
                timeout: timedelta, cache: dict) -> None:
    """Prefill: gather ``blocks`` of every layer and send them to rank 1."""
    idx = torch.tensor(blocks, dtype=torch.long, device=layers[0].device)
    buf = scratch(layers, block_shape, len(blocks), cache)
    for i, layer in enumerate(layers):
        torch.index_select(layer, 0, idx, out=buf[i])
    send_buffer(pg, buf, timeout)


def receive_blocks(pg, layers: list[torch.Tensor], block_shape, idx: torch.Tensor,
                   timeout: timedelta, cache: dict) -> None:
    """Decode: receive the pair's blocks from rank 0 into ours at ``idx``."""
    buf = scratch(layers, block_shape, len(idx), cache)
    wait_all([pg.recv([c], 0, tag) for tag, c in enumerate(messages(buf))], timeout,
             layers[0].device)
    for i, layer in enumerate(layers):
        layer.index_copy_(0, idx, buf[i])
