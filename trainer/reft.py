"""Trainable ReFT-P interventions (LoReFT / DiReFT) as forward hooks on decoder layers.

Same math and file format as ``prefill_worker/adapters/reft_p.py`` and ``tests/reference.py``:
at the selected prompt positions the output h of decoder layer L becomes
LoReFT Φ(h) = h + Rᵀ(W h + b − R h) (R with orthonormal rows, kept so by
``torch.nn.utils.parametrizations.orthogonal``) or DiReFT Φ(h) = h + W₂ᵀ(W₁ h + b).
Initialisation makes Φ the identity (LoReFT: W = R, b = 0; DiReFT: W₂ = 0), so training
starts from the base model. Hooks only act while :attr:`ReftModule.active` is set (the
prompt forward); the response forward runs the plain base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def select_positions(spec: str, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool mask of the prompt positions a spec selects, for left-padded rows of
    ``lengths`` real tokens: "all" | "f<p>" | "l<s>" | "f<p>+l<s>"."""
    first = last = 0
    every = spec in (None, "all")
    if not every:
        for part in spec.split("+"):
            kind, num = part[0], int(part[1:])
            if kind == "f":
                first = num
            elif kind == "l":
                last = num
            else:
                raise ValueError(f"positions={spec!r}")
    B = lengths.shape[0]
    col = torch.arange(width).expand(B, width)
    pad = (width - lengths).unsqueeze(1)
    rel = col - pad                      # position within the prompt; < 0 is padding
    n = lengths.unsqueeze(1)
    valid = rel >= 0
    if every:
        return valid
    return valid & ((rel < first) | (rel >= n - last))


class ReftModule(nn.Module):
    def __init__(self, model, intervention: str, layers, rank: int, positions: str = "all",
                 seed: int = 0) -> None:
        super().__init__()
        if intervention not in ("loreft", "direft"):
            raise ValueError(f"intervention={intervention!r}: use 'loreft' or 'direft'")
        d = model.config.hidden_size
        n_layers = model.config.num_hidden_layers
        layers = sorted(int(x) for x in layers)
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad:
            raise ValueError(f"reft layers={layers}: layer {bad[0]} out of range 0..{n_layers - 1}")
        if not 1 <= rank <= d:
            raise ValueError(f"rank={rank} must be in 1..hidden_size={d}")
        self.intervention, self.layers, self.rank, self.positions = intervention, layers, rank, positions
        self.hidden_size = d
        gen = torch.Generator().manual_seed(seed)
        self.mods = nn.ModuleDict()
        for L in layers:
            m = nn.Module()
            if intervention == "loreft":
                rot = nn.Linear(d, rank, bias=False)
                q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
                with torch.no_grad():
                    rot.weight.copy_(q.T.float())
                m.rotate_layer = nn.utils.parametrizations.orthogonal(rot)
                m.learned_source = nn.Linear(d, rank)
                with torch.no_grad():
                    m.learned_source.weight.copy_(m.rotate_layer.weight)
                    m.learned_source.bias.zero_()
            else:
                m.proj_down = nn.Linear(d, rank)
                with torch.no_grad():
                    m.proj_down.weight.copy_(torch.randn(rank, d, generator=gen) / d ** 0.5)
                    m.proj_down.bias.zero_()
                m.proj_up = nn.Linear(rank, d, bias=False)  # weight (d, r) = W₂ᵀ
                nn.init.zeros_(m.proj_up.weight)
            self.mods[str(L)] = m
        self.active = False
        self.sel: torch.Tensor | None = None   # (B, P) bool, set per prompt forward
        self._handles = [model.model.layers[L].register_forward_hook(self._hook(L)) for L in layers]

    def phi(self, L: int, x: torch.Tensor) -> torch.Tensor:
        """Φ(x) for rows x (n×d), written as in tests/reference.py."""
        m = self.mods[str(L)]
        if self.intervention == "loreft":
            R, W, b = m.rotate_layer.weight, m.learned_source.weight, m.learned_source.bias
            return x + (x @ W.T + b - x @ R.T) @ R
        W1, b, W2 = m.proj_down.weight, m.proj_down.bias, m.proj_up.weight.T
        return x + (x @ W1.T + b) @ W2

    def _hook(self, L: int):
        return make_hook(self, L)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad():
            for L in self.layers:
                m, p = self.mods[str(L)], f"layers.{L}."
                if self.intervention == "loreft":
                    # orthonormal to float precision by the parametrization
                    out[p + "rotate_layer.weight"] = m.rotate_layer.weight.detach().clone().contiguous()
                    out[p + "learned_source.weight"] = m.learned_source.weight.detach().clone().contiguous()
                    out[p + "learned_source.bias"] = m.learned_source.bias.detach().clone().contiguous()
                else:
                    out[p + "proj_down.weight"] = m.proj_down.weight.detach().clone().contiguous()
                    out[p + "proj_down.bias"] = m.proj_down.bias.detach().clone().contiguous()
                    out[p + "proj_up.weight"] = m.proj_up.weight.detach().T.clone().contiguous()
        return out

    def save(self, out_dir: str | Path, base_model: str) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(out / "adapter_model.safetensors"))
        cfg = {"peft_type": "REFT_P", "preft_kind": "reft_p", "intervention": self.intervention,
               "layers": list(self.layers), "rank": self.rank, "positions": self.positions,
               "hidden_size": self.hidden_size, "base_model_name_or_path": str(base_model)}
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        return out


def make_hook(owner, L: int):
    """Forward hook for decoder layer L: while ``owner.active``, replace the layer output at
    the positions ``owner.sel`` (B×P bool; None = all) by ``owner.phi(L, rows)``. The row
    gather/scatter is the one tests/reference.py uses, so batch-1 outputs match it exactly."""
    def hook(module, args, out):
        if not owner.active:
            return out
        h = out[0] if isinstance(out, tuple) else out
        sel = owner.sel if owner.sel is not None else torch.ones(h.shape[:2], dtype=torch.bool)
        if h.shape[0] == 1:
            idx = sel[0].nonzero().flatten()
            phi = owner.phi(L, h[0, idx])
            h = h.clone()
            h[0, idx] = phi
        else:
            phi = owner.phi(L, h[sel])
            h = h.clone()
            h[sel] = phi
        return (h, *out[1:]) if isinstance(out, tuple) else h
    return hook


class LoadedReft:
    """A saved ReFT-P adapter directory as frozen hooks on ``model`` (for evaluation)."""

    def __init__(self, model, adapter_dir: str | Path) -> None:
        from safetensors.torch import load_file

        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        self.intervention = cfg["intervention"]
        self.positions = cfg.get("positions", "all")
        self.layers = list(cfg["layers"])
        self.ts = {k: v.to(torch.float32) for k, v in
                   load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items()}
        self.active = False
        self.sel = None
        self._handles = [model.model.layers[L].register_forward_hook(make_hook(self, L))
                         for L in self.layers]

    def phi(self, L: int, x: torch.Tensor) -> torch.Tensor:
        p, ts = f"layers.{L}.", self.ts
        if self.intervention == "loreft":
            R, W, b = (ts[p + "rotate_layer.weight"], ts[p + "learned_source.weight"],
                       ts[p + "learned_source.bias"])
            return x + (x @ W.T + b - x @ R.T) @ R
        W1, b, W2 = ts[p + "proj_down.weight"], ts[p + "proj_down.bias"], ts[p + "proj_up.weight"]
        return x + (x @ W1.T + b) @ W2

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
