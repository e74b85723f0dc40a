"""ReFT-P: representation interventions on the residual stream, at prompt positions only.

"Layer L" is the output of decoder layer L (the residual stream after it). At each chosen
prompt position the stream h ∈ R^d is replaced by Φ(h):

* LoReFT: Φ(h) = h + Rᵀ(W h + b − R h), R ∈ R^{r×d} with orthonormal rows, W ∈ R^{r×d}, b ∈ R^r
* DiReFT: Φ(h) = h + W₂ᵀ(W₁ h + b),      W₁, W₂ ∈ R^{r×d}, b ∈ R^r

Positions (the original ReFT notation): ``"all"`` (every prompt token, the default),
``"f{p}"`` (the first p prompt tokens), ``"l{s}"`` (the last s), ``"f{p}+l{s}"`` (both; a
token in both is intervened on once). The prefill engine applies Φ while it computes the
prompt (:mod:`prefill_worker.reft_runtime`); the decode pool runs the base model over the
intervention-conditioned KV.

Files: a directory with ``adapter_config.json``::

    {"peft_type": "REFT_P", "intervention": "loreft" | "direft", "layers": [1, 3],
     "rank": 4, "positions": "all" | "f3+l3", "hidden_size": 256}

(``"preft_kind": "reft_p"`` may stand in for ``peft_type``) and ``adapter_model.safetensors``
with, per layer L:

* loreft: ``layers.L.rotate_layer.weight`` (R, r×d), ``layers.L.learned_source.weight``
  (W, r×d), ``layers.L.learned_source.bias`` (b, r)
* direft: ``layers.L.proj_down.weight`` (W₁, r×d), ``layers.L.proj_down.bias`` (b, r),
  ``layers.L.proj_up.weight`` (W₂, r×d)

Pickle-based weights are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cluster.adapter_store import digest_dir
from cluster.errors import InvalidAdapter
from prefill_worker.adapters.base import (AdapterSpec, BaseModelShape, read_json, register_kind,
                                          safetensors_weights)

KIND = "reft_p"
PEFT_TYPE = "REFT_P"
INTERVENTIONS = ("loreft", "direft")
# tensor suffix -> (rows, cols) where "r" is the rank, "d" the hidden size
TENSORS = {
    "loreft": {"rotate_layer.weight": ("r", "d"), "learned_source.weight": ("r", "d"),
               "learned_source.bias": ("r",)},
    "direft": {"proj_down.weight": ("r", "d"), "proj_down.bias": ("r",),
               "proj_up.weight": ("r", "d")},
}
_KEY = re.compile(r"^layers\.(\d+)\.([a-z_]+\.(?:weight|bias))$")
_POS_PART = re.compile(r"^([fl])(\d+)$")
ORTHO_TOL = {"float32": 1e-3, "float64": 1e-6, "float16": 2e-2, "bfloat16": 5e-2}


def is_reft_config(cfg: dict) -> bool:
    """Whether an ``adapter_config.json`` declares a ReFT-P adapter."""
    return (str(cfg.get("peft_type", "")).upper() == PEFT_TYPE
            or str(cfg.get("preft_kind", "")).lower() == KIND)


@dataclass(frozen=True)
class Positions:
    """Which prompt positions are intervened on: all, or the first ``first`` and/or the
    last ``last`` prompt tokens."""

    all: bool = True
    first: int = 0
    last: int = 0

    def selects(self, pos: int, prompt_len: int) -> bool:
        if pos >= prompt_len:
            return False
        return self.all or pos < self.first or pos >= prompt_len - self.last

    @property
    def depends_on_length(self) -> bool:
        """Suffix positions: which tokens are intervened depends on the prompt's length."""
        return not self.all and self.last > 0

    def __str__(self) -> str:
        if self.all:
            return "all"
        return "+".join(p for p in (f"f{self.first}" if self.first else "",
                                    f"l{self.last}" if self.last else "") if p)


def parse_positions(spec) -> Positions:
    """``"all"`` | ``"f{p}"`` | ``"l{s}"`` | ``"f{p}+l{s}"`` (either order) → :class:`Positions`."""
    hint = 'use "all", "f<p>", "l<s>" or "f<p>+l<s>" (e.g. "f3+l3")'
    if spec is None:
        return Positions()
    if not isinstance(spec, str):
        raise InvalidAdapter(f"positions={spec!r} must be a string; {hint}")
    s = spec.strip().lower()
    if s == "all":
        return Positions()
    seen: dict[str, int] = {}
    for part in s.split("+"):
        m = _POS_PART.match(part.strip())
        if not m or m[1] in seen:
            raise InvalidAdapter(f"positions={spec!r} is not understood; {hint}")
        seen[m[1]] = int(m[2])
    if not any(seen.values()):
        raise InvalidAdapter(f"positions={spec!r} selects no token; {hint} with p or s > 0")
    return Positions(all=False, first=seen.get("f", 0), last=seen.get("l", 0))


@dataclass(frozen=True)
class ReftConfig:
    intervention: str
    layers: tuple[int, ...]
    rank: int
    positions: Positions
    hidden_size: int


def parse_config(cfg: dict, base: BaseModelShape, max_rank: int) -> ReftConfig:
    if not is_reft_config(cfg):
        raise InvalidAdapter(f"peft_type={cfg.get('peft_type')!r}: a ReFT-P adapter needs "
                             f'"peft_type": "{PEFT_TYPE}" (or "preft_kind": "{KIND}")')
    iv = cfg.get("intervention")
    if iv not in INTERVENTIONS:
        raise InvalidAdapter(f"intervention={iv!r}: supported are {list(INTERVENTIONS)}")
    rank = cfg.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"rank={rank!r}: rank must be a positive integer")
    if rank > max_rank:
        raise InvalidAdapter(f"rank={rank} exceeds this cluster's max_lora_rank={max_rank}; "
                             f"retrain with rank <= {max_rank}")
    hidden = cfg.get("hidden_size", base.hidden_size)
    if hidden != base.hidden_size:
        raise InvalidAdapter(f"hidden_size={hidden!r} does not match the base model "
                             f"(hidden_size={base.hidden_size}); the adapter was trained "
                             "for another model")
    if rank > base.hidden_size:
        raise InvalidAdapter(f"rank={rank} exceeds hidden_size={base.hidden_size}")
    layers = cfg.get("layers")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise InvalidAdapter(f"layers={layers!r} must be a non-empty list of layer indices")
    bad = [x for x in layers if not 0 <= x < base.num_layers]
    if bad:
        raise InvalidAdapter(f"layers={layers}: layer {bad[0]} is out of range; the base "
                             f"model has layers 0..{base.num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise InvalidAdapter(f"layers={layers} lists a layer twice")
    return ReftConfig(iv, tuple(sorted(layers)), rank, parse_positions(cfg.get("positions")),
                      base.hidden_size)


def _weights_file(path: Path) -> Path:
    return safetensors_weights(path, "safetensors.torch.save_file")


def load_tensors(path: Path, cfg: ReftConfig) -> dict[int, dict[str, "torch.Tensor"]]:
    """Read and check every tensor: names, shapes, dtype, finite values, orthonormal R."""
    import torch
    from safetensors import SafetensorError, safe_open

    dims = {"r": cfg.rank, "d": cfg.hidden_size}
    want = {f"layers.{L}.{suffix}": tuple(dims[x] for x in shape)
            for L in cfg.layers for suffix, shape in TENSORS[cfg.intervention].items()}
    out: dict[int, dict[str, torch.Tensor]] = {L: {} for L in cfg.layers}
    try:
        with safe_open(str(_weights_file(path)), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys - want.keys()):
                m = _KEY.match(key)
                if m and int(m[1]) not in cfg.layers:
                    raise InvalidAdapter(f"{key}: layer {m[1]} is not in layers="
                                         f"{list(cfg.layers)} of adapter_config.json")
                raise InvalidAdapter(
                    f"unexpected tensor {key!r} for a {cfg.intervention} adapter; expected "
                    f"per layer: {sorted(TENSORS[cfg.intervention])}")
            missing = sorted(want.keys() - keys)
            if missing:
                raise InvalidAdapter(f"tensor {missing[0]!r} is missing ({len(missing)} "
                                     "missing in all)")
            for key, shape in want.items():
                t = f.get_tensor(key)
                if tuple(t.shape) != shape:
                    raise InvalidAdapter(f"{key}: shape {tuple(t.shape)} does not match "
                                         f"rank={cfg.rank}, hidden_size={cfg.hidden_size} "
                                         f"(expected {shape})")
                if not t.is_floating_point():
                    raise InvalidAdapter(f"{key}: dtype {t.dtype} is not floating point")
                if not torch.isfinite(t).all():
                    raise InvalidAdapter(f"{key}: contains NaN or Inf values")
                m = _KEY.match(key)
                out[int(m[1])][m[2]] = t
    except SafetensorError as e:
        raise InvalidAdapter(f"adapter_model.safetensors is not a valid safetensors file: {e}") from None
    if cfg.intervention == "loreft":
        for L, ts in out.items():
            R = ts["rotate_layer.weight"]
            err = float((R.double() @ R.double().T - torch.eye(cfg.rank, dtype=torch.float64))
                        .abs().max())
            tol = ORTHO_TOL.get(str(R.dtype).removeprefix("torch."), 1e-3)
            if err > tol:
                raise InvalidAdapter(
                    f"layers.{L}.rotate_layer.weight: LoReFT needs R with orthonormal rows "
                    f"(max |R Rᵀ − I| = {err:.3g} > {tol}); orthonormalize it, e.g. "
                    "R = torch.linalg.qr(R.T).Q.T")
    return out


@register_kind(KIND, claims=is_reft_config)
def validate(path: Path, base: BaseModelShape, max_rank: int, max_bytes: int) -> AdapterSpec:
    raw = read_json(path / "adapter_config.json", "ReFT-P adapter")
    cfg = parse_config(raw, base, max_rank)
    _weights_file(path)
    sha, size = digest_dir(path)
    if size > max_bytes:
        raise InvalidAdapter(f"adapter is {size} bytes, over the limit of {max_bytes}")
    load_tensors(path, cfg)
    targets = tuple(f"layers.{L}.output:{cfg.intervention}@{cfg.positions}" for L in cfg.layers)
    return AdapterSpec(KIND, cfg.rank, targets, sha, size)


@dataclass(frozen=True)
class ReftWeights:
    """A loaded, validated ReFT-P adapter (host memory; float32)."""

    intervention: str
    positions: Positions
    layers: dict  # layer -> {tensor suffix: torch.Tensor}
    rank: int
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    def delta(self, layer: int, h):
        """Φ(h) − h for rows h (n×d) at ``layer``; computed in h's dtype and device."""
        ck = (layer, h.device, h.dtype)
        cast = self._cast.get(ck)
        if cast is None:  # once per (layer, device, dtype): no copies in the step loop
            cast = {k: v.to(device=h.device, dtype=h.dtype)
                    for k, v in self.layers[layer].items()}
            self._cast[ck] = cast
        if self.intervention == "loreft":
            R, W, b = (cast["rotate_layer.weight"], cast["learned_source.weight"],
                       cast["learned_source.bias"])
            return (h @ W.T + b - h @ R.T) @ R
        W1, b, W2 = cast["proj_down.weight"], cast["proj_down.bias"], cast["proj_up.weight"]
        return (h @ W1.T + b) @ W2

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.layers.values() for t in ts.values())


def load(path: str | Path, base: BaseModelShape, max_rank: int) -> ReftWeights:
    """Validate and load an adapter directory for the engine hook."""
    import torch

    p = Path(path)
    cfg = parse_config(read_json(p / "adapter_config.json", "ReFT-P adapter"), base, max_rank)
    tensors = load_tensors(p, cfg)
    tensors = {L: {k: v.to(torch.float32).contiguous() for k, v in ts.items()}
               for L, ts in tensors.items()}
    return ReftWeights(cfg.intervention, cfg.positions, tensors, cfg.rank)
