"""Convert interventions saved by pyreft into a ReFT-P adapter (offline, before the request path).

pyreft's ``ReftModel.save`` (pyvene's ``IntervenableModel.save``) writes ``config.json``
(an ``IntervenableConfig``: one representation per intervention -- layer, component, unit,
low_rank_dimension -- plus ``intervention_types`` and ``sorted_keys``) and one
``intkey_<key>.bin`` per intervention: a ``torch.save`` pickle of its state dict. The cluster
never unpickles anything (uploads are safetensors only); this converter is the one place
such files are read, with ``torch.load(weights_only=True)`` -- torch's restricted unpickler,
which rebuilds tensors and plain containers and refuses anything else -- and it writes the
ReFT-P directory of prefill_worker/adapters/reft_p.py, which is then uploaded as usual::

    preft convert-pyreft ./my_reft_save ./alice-reft --positions f1+l1
    preft adapters add alice ./alice-reft

Mapping (pyreft's own forward, with ``rot`` its d×r rotate-layer weight):

* ``LoreftIntervention``  h + (W h + b − h·rot)·rotᵀ  ->  loreft, R = rotᵀ, W, b
* ``DireftIntervention``  h + (W h + b)·rotᵀ          ->  direft, W₁ = W, b, W₂ = rotᵀ
  (pyreft saves DiReFT's rotation as torch's orthogonal parametrization; the weight it
  computes is materialised here with the same parametrization)
* ``NodireftIntervention`` h + (W h + b)·P            ->  direft, W₁ = W, b, W₂ = P

What does not convert, with the reason in the error: other intervention classes (NoReFT has
no orthonormal R; ConsReFT/LobiReFT have no input-dependent term), components other than
``block_output`` (the decoder layer's output, where ReFT-P intervenes), units other than
``pos``, two interventions on one layer (pyreft's ``share_weights=False`` with ``f+l``
positions), layers with different kinds or ranks. pyreft does not save positions (they are
chosen per call through ``unit_locations``) nor a non-linear ``act_fn`` (its own ``load``
rebuilds the linear default); ``--positions`` is therefore required.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SUPPORTED = {"LoreftIntervention": "loreft", "DireftIntervention": "direft",
             "NodireftIntervention": "direft"}
WHY_NOT = {
    "NoreftIntervention": "NoReFT's projection is not orthonormal, which LoReFT-P requires",
    "ConsreftIntervention": "ConsReFT has no input-dependent term (h + Rᵀ(b − Rh))",
    "LobireftIntervention": "LobiReFT adds a constant (h + Rᵀb)",
}


class ConvertError(ValueError):
    """The pyreft directory cannot be converted; the message says why and what to do."""


def _class_name(type_str: str) -> str:
    m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)'?>?\s*$", str(type_str))
    return m[1] if m else str(type_str)


def _representation(rep) -> dict:
    fields = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension")
    if isinstance(rep, dict):
        return {k: rep.get(k) for k in fields}
    if isinstance(rep, (list, tuple)):
        return dict(zip(fields, list(rep) + [None] * (len(fields) - len(rep))))
    raise ConvertError(f"config.json: representation {rep!r} is neither a list nor a dict")


def _load_state(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise ConvertError(f"{path.name} is missing: pyreft writes one intkey_<key>.bin per "
                           "intervention next to config.json")
    try:   # restricted unpickler: tensors and plain containers only, never code
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvertError(f"{path.name} is not a plain tensor state dict ({type(e).__name__}: "
                           f"{str(e)[:200]}); refusing to unpickle it") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConvertError(f"{path.name} does not hold a state dict of tensors")
    return sd


def _orthogonal_weight(sd: dict, d: int, r: int):
    """DiReFT's rotate layer as pyreft computes it: torch's orthogonal parametrization."""
    import torch
    from torch import nn

    pre = "rotate_layer.parametrizations.weight."
    sub = {k[len("rotate_layer."):]: v for k, v in sd.items() if k.startswith(pre)}
    if pre + "original" not in sd:
        raise ConvertError(f"DiReFT state dict has no {pre}original (keys: {sorted(sd)})")

    class Rotate(nn.Module):   # pyreft's LowRankRotateLayer: weight is d×r
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(d, r))

    m = nn.utils.parametrizations.orthogonal(Rotate())
    try:
        m.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise ConvertError(f"DiReFT rotate layer does not load: {str(e)[:300]}") from None
    with torch.no_grad():
        return m.weight.detach().clone()


def _tensors(kind_cls: str, sd: dict, layer: int) -> tuple[dict, int, int]:
    """Our per-layer tensors (without the ``layers.L.`` prefix), rank and hidden size."""
    def need(*keys):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ConvertError(f"layer {layer}: {kind_cls} state dict lacks {missing} "
                               f"(has {sorted(sd)})")
        return [sd[k].float() for k in keys]

    W, b = need("weight", "bias") if kind_cls == "LoreftIntervention" else \
        need("learned_source.weight", "learned_source.bias")
    r, d = W.shape
    if kind_cls == "LoreftIntervention":
        (rot,) = need("rotate_layer")
        if tuple(rot.shape) != (d, r):
            raise ConvertError(f"layer {layer}: rotate_layer is {tuple(rot.shape)}, expected {(d, r)}")
        return ({"rotate_layer.weight": rot.T.contiguous(), "learned_source.weight": W,
                 "learned_source.bias": b}, r, d)
    if kind_cls == "DireftIntervention":
        up = _orthogonal_weight(sd, d, r).T.contiguous()
    else:
        (up,) = need("proj_layer.weight")
    if tuple(up.shape) != (r, d):
        raise ConvertError(f"layer {layer}: up-projection is {tuple(up.shape)}, expected {(r, d)}")
    return {"proj_down.weight": W, "proj_down.bias": b, "proj_up.weight": up.contiguous()}, r, d


def convert(src: str | Path, out: str | Path, positions: str, base_model: str | None = None) -> Path:
    """Write the ReFT-P adapter for the pyreft save in ``src`` to ``out``; returns ``out``."""
    from safetensors.torch import save_file

    from cluster.errors import InvalidAdapter
    from prefill_worker.adapters.reft_p import parse_positions

    src, out = Path(src), Path(out)
    try:
        parse_positions(positions)
    except InvalidAdapter as e:
        raise ConvertError(f"--positions: {e}") from None
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{src} has no config.json: expected a directory written by pyreft's "
                           "ReftModel.save (config.json + intkey_*.bin)")
    cfg = json.loads(cfg_path.read_text())
    reps = [_representation(r) for r in cfg.get("representations") or []]
    types = [_class_name(t) for t in cfg.get("intervention_types") or []]
    keys = cfg.get("sorted_keys") or []
    if not reps or len(types) != len(reps) or len(keys) != len(reps):
        raise ConvertError("config.json: representations, intervention_types and sorted_keys "
                           f"must have one entry per intervention (got {len(reps)}, "
                           f"{len(types)}, {len(keys)})")
    tensors, kinds, ranks, hidden, layers = {}, set(), set(), set(), []
    for rep, cls, key in zip(reps, types, keys):
        L = rep["layer"]
        if cls not in SUPPORTED:
            why = WHY_NOT.get(cls, "not a ReFT intervention ReFT-P serves")
            raise ConvertError(f"layer {L}: {cls} cannot be served as ReFT-P: {why}. Supported: "
                               f"{sorted(SUPPORTED)}")
        if rep["component"] != "block_output":
            raise ConvertError(f"layer {L}: component {rep['component']!r}: ReFT-P intervenes on "
                               "the decoder layer output (pyreft component 'block_output')")
        if rep["unit"] not in (None, "pos"):
            raise ConvertError(f"layer {L}: unit {rep['unit']!r}: only position units ('pos')")
        if not isinstance(L, int) or L < 0:
            raise ConvertError(f"layer {L!r} is not a layer index")
        if L in layers:
            raise ConvertError(f"two interventions on layer {L} (pyreft share_weights=False with "
                               "first+last positions): ReFT-P applies one intervention per layer; "
                               "retrain with share_weights=True")
        layers.append(L)
        t, r, d = _tensors(cls, _load_state(src / f"intkey_{key}.bin"), L)
        kinds.add(SUPPORTED[cls])
        ranks.add(r)
        hidden.add(d)
        tensors.update({f"layers.{L}.{k}": v for k, v in t.items()})
    if len(kinds) > 1 or len(ranks) > 1:
        raise ConvertError(f"layers mix interventions {sorted(kinds)} / ranks {sorted(ranks)}: a "
                           "ReFT-P adapter has one intervention kind and one rank")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    acfg = {"peft_type": "REFT_P", "preft_kind": "reft_p", "intervention": kinds.pop(),
            "layers": sorted(layers), "rank": ranks.pop(), "positions": positions,
            "hidden_size": hidden.pop(), "converted_from": "pyreft", "pyreft_types": types}
    if base_model:
        acfg["base_model_name_or_path"] = base_model
    (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    return out


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert-pyreft", help="convert a pyreft intervention save to ReFT-P",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="directory written by pyreft's ReftModel.save (config.json + "
                   "intkey_*.bin)")
    p.add_argument("out", help="output ReFT-P adapter directory (safetensors)")
    p.add_argument("--positions", required=True, help="prompt positions the interventions were "
                   "trained on, as in pyreft: all | f<p> | l<s> | f<p>+l<s> (pyreft does not "
                   "save them)")
    p.add_argument("--base-model", default=None, help="recorded in adapter_config.json")
    p.set_defaults(fn=run_args)
    return p


def run_args(a) -> int:
    try:
        out = convert(a.src, a.out, a.positions, a.base_model)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    print(f"wrote {out}: {cfg['intervention']} rank {cfg['rank']} on layers {cfg['layers']}, "
          f"positions {cfg['positions']}")
    return 0
