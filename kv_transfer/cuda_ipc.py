"""CUDA IPC: the same-host KV path when the caches are on GPUs (step 4, ``mode: cuda_ipc``).

The GPU form of the shared-memory path (:mod:`kv_transfer.shm`): when a decode engine
proves it shares the prefill endpoint's host (the same proof as the CPU path:
:class:`kv_transfer.shm.FdChannel`) and both
caches are on CUDA devices, the prefill endpoint answers the join with CUDA IPC handles of
its cache tensors (:func:`export`). The decode side maps them once per pair
(:func:`open_layers`) and, for each pull, copies the prompt's blocks straight out of the
prefill engine's cache into its own: one device copy (over NVLink/PCIe peer access between
two GPUs, or within one), no staging buffer, no NCCL group, no serialization.

The handles travel in the authenticated control plane's answer to the pair's confirm
(:class:`kv_transfer.control.Confirmed`: base64 bytes, checked numbers), never pickled: the decode side
rebuilds each storage with ``UntypedStorage._new_shared_cuda`` and refuses a description
whose tensor would reach past the storage it names. How the blocks stay valid while the
peer reads them is the transport's protocol (the lent blocks stay held until the peer's
:class:`~kv_transfer.control.Fin`; at the timeout prefill takes them back and answers a late
fin with ``kept=False``, so the copy is refused: :mod:`kv_transfer.transport`).

Needs a CUDA build of torch; importing this module does not.
"""

from __future__ import annotations

import base64

import torch

_MAX_DIMS = 8
_MAX_STORAGES = 1024


class IpcError(RuntimeError):
    """A CUDA IPC description that cannot be mapped here (malformed, or CUDA refused it)."""


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(v, what: str) -> bytes:
    if not isinstance(v, str) or len(v) > 4096:
        raise IpcError(f"{what}: expected base64 text")
    try:
        return base64.b64decode(v, validate=True)
    except ValueError:
        raise IpcError(f"{what}: not base64") from None


def export(layers: list[torch.Tensor]) -> dict:
    """Prefill side: what a peer needs to map ``layers`` (each a view of a CUDA storage).
    Storages several layers share are described once."""
    storages: list[dict] = []
    index: dict[int, int] = {}
    views = []
    for t in layers:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in index:
            (_dev, handle, size, offset, rc_handle, rc_offset, ev_handle,
             ev_sync) = st._share_cuda_()
            index[key] = len(storages)
            storages.append({"handle": _b64(handle), "size": int(size), "offset": int(offset),
                             "rc": _b64(rc_handle), "rc_offset": int(rc_offset),
                             "event": _b64(ev_handle), "sync": bool(ev_sync)})
        views.append({"storage": index[key], "offset": t.storage_offset(),
                      "shape": list(t.shape), "stride": list(t.stride())})
    return {"dtype": str(layers[0].dtype).removeprefix("torch."), "storages": storages,
            "layers": views}


def _int(d: dict, name: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = d.get(name)
    if type(v) is not int or not lo <= v <= hi:
        raise IpcError(f"{name}={v!r:.40}: expected an integer in [{lo}, {hi}]")
    return v


def _ints(d: dict, name: str) -> list[int]:
    v = d.get(name)
    if (not isinstance(v, list) or not 1 <= len(v) <= _MAX_DIMS
            or any(type(x) is not int or not 0 <= x < 1 << 40 for x in v)):
        raise IpcError(f"{name}={v!r:.60}: expected 1-{_MAX_DIMS} non-negative integers")
    return v


_REF_COUNTERS = 10_000   # torch's CUDA IPC ref-counter file holds this many (CUDA_IPC_REF_COUNTER_FILE_SIZE)


def check(desc: object, *, num_layers: int, block_shape: tuple[int, ...],
          dtype: torch.dtype, device_bytes: int = 1 << 50
          ) -> list[tuple[int, int, list[int], list[int]]]:
    """The description's layers as (storage, offset, shape, stride), each checked: the
    layout the pair agreed on, every element inside the storage it names, and every
    storage (its offset into its allocation plus its size) inside ``device_bytes``, the
    memory of the device it claims to be on; ref-counter offsets inside torch's file."""
    if not isinstance(desc, dict):
        raise IpcError("expected a JSON object")
    if desc.get("dtype") != str(dtype).removeprefix("torch."):
        raise IpcError(f"dtype {desc.get('dtype')!r:.40} is not this engine's {dtype}")
    storages, layers = desc.get("storages"), desc.get("layers")
    if not isinstance(storages, list) or not 1 <= len(storages) <= _MAX_STORAGES:
        raise IpcError("storages: expected a non-empty list")
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise IpcError(f"layers: expected {num_layers}")
    for j, st in enumerate(storages):
        if not isinstance(st, dict):
            raise IpcError(f"storage {j}: expected an object")
        end = _int(st, "offset") + _int(st, "size", 1)
        if end > device_bytes:
            raise IpcError(f"storage {j}: offset + size = {end} bytes, past the device's "
                           f"{device_bytes}")
        _int(st, "rc_offset", 0, _REF_COUNTERS * 8)
    out = []
    for i, v in enumerate(layers):
        if not isinstance(v, dict):
            raise IpcError(f"layer {i}: expected an object")
        s = _int(v, "storage", 0, len(storages) - 1)
        shape, stride = _ints(v, "shape"), _ints(v, "stride")
        if len(shape) != len(stride) or tuple(shape[1:]) != tuple(block_shape) or shape[0] < 1:
            raise IpcError(f"layer {i}: shape {shape} is not [blocks, {list(block_shape)}]")
        off = _int(v, "offset")
        size = _int(storages[s], "size", 1)
        last = off + sum((n - 1) * st for n, st in zip(shape, stride))
        if (last + 1) * dtype.itemsize > size:
            raise IpcError(f"layer {i}: reaches past its storage ({size} bytes)")
        out.append((s, off, shape, stride))
    return out


def open_layers(desc: dict, *, device: torch.device, num_layers: int,
                block_shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """Decode side: the peer's cache layers, mapped on ``device`` (copies read peer memory)."""
    views = check(desc, num_layers=num_layers, block_shape=block_shape, dtype=dtype,
                  device_bytes=_device_bytes(device))
    mapped: dict[int, torch.UntypedStorage] = {}
    out = []
    for s, off, shape, stride in views:
        if s not in mapped:
            mapped[s] = _open_storage(desc["storages"][s], device)
        t = torch.empty(0, dtype=dtype, device=device)
        t.set_(mapped[s], off, shape, stride)
        out.append(t)
    return out


def _device_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 50
    return torch.cuda.get_device_properties(device).total_memory


def _open_storage(d: dict, device: torch.device) -> torch.UntypedStorage:
    if not isinstance(d, dict):
        raise IpcError("storage: expected an object")
    handle = _unb64(d.get("handle"), "handle")
    rc = _unb64(d.get("rc"), "rc")
    event = None if d.get("event") is None else _unb64(d.get("event"), "event")
    if type(d.get("sync")) is not bool:
        raise IpcError("sync: expected true or false")
    try:
        torch.cuda._lazy_init()
        with torch.cuda.device(device):
            return torch.UntypedStorage._new_shared_cuda(
                device.index if device.index is not None else torch.cuda.current_device(),
                handle, _int(d, "size", 1), _int(d, "offset"), rc, _int(d, "rc_offset"),
                event, d["sync"])
    except IpcError:
        raise
    except Exception as e:  # CUDA refused the handle (no peer access, another host...)
        raise IpcError(f"CUDA could not open the peer's cache: {type(e).__name__}: {e}") from e


_MAX_RUNS = 16   # more runs of consecutive blocks than this: gather + scatter instead


def block_runs(dst: list[int], src: list[int]) -> list[tuple[int, int, int]]:
    """(dst start, src start, length) of each stretch where both ids go up by one."""
    runs: list[list[int]] = []
    for d, s in zip(dst, src):
        if runs and d == runs[-1][0] + runs[-1][2] and s == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([d, s, 1])
    return [tuple(r) for r in runs]


def copy_blocks(dst_layers: list, dst: list[int], src_layers: list, src: list[int]) -> None:
    """``dst_layers[i][dst[j]] = src_layers[i][src[j]]`` for every layer i and block j. Few
    runs of consecutive blocks: one multi-tensor copy of whole slices (on a GPU one launch
    for every layer, not two kernels per layer); else a gather and a scatter per layer."""
    runs = block_runs(dst, src)
    if len(runs) <= _MAX_RUNS and hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_([d[a:a + n] for d in dst_layers for a, _, n in runs],
                             [s[b:b + n] for s in src_layers for _, b, n in runs])
        return
    device = dst_layers[0].device
    di = torch.tensor(dst, dtype=torch.long, device=device)
    si = torch.tensor(src, dtype=torch.long, device=device)
    for d, s in zip(dst_layers, src_layers):
        d.index_copy_(0, di, s.index_select(0, si))
