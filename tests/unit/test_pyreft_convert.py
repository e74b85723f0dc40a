"""`preft convert-pyreft` (trainer/pyreft_convert.py) against real pyreft saves.

The saves are written by pyvene's own IntervenableModel.save with pyreft's own
LoreftIntervention / DireftIntervention (scripts/setup.sh installs both wheels, without their
dependencies, into .venv/pyreft-site). The converted adapter, applied by the single-process
reference's hooks (tests/reference.py, the semantics the cluster is tested against), must give
the logits pyvene computes with pyreft's interventions at the same prompt positions.
Unsupported saves and pickles that carry code are refused with a message, never executed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / ".venv" / "pyreft-site"
N_PROMPT = 9


@pytest.fixture(scope="module")
def pyreft():
    """pyvene and pyreft.interventions (pyreft/__init__ imports its trainer: datasets, wandb...)."""
    assert (SITE / "pyvene").is_dir(), "run scripts/setup.sh: it installs .venv/pyreft-site"
    sys.path.insert(0, str(SITE))
    import pyvene

    if "pyreft.interventions" not in sys.modules:
        pkg = types.ModuleType("pyreft")
        pkg.__path__ = [str(SITE / "pyreft")]
        sys.modules.setdefault("pyreft", pkg)
        spec = importlib.util.spec_from_file_location("pyreft.interventions",
                                                      SITE / "pyreft" / "interventions.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pyreft.interventions"] = mod
        spec.loader.exec_module(mod)
    return pyvene, sys.modules["pyreft.interventions"]


@pytest.fixture(scope="module")
def ref(assets):
    from reference import Reference

    return Reference(assets["model"])


def _save(pyreft, model, tmp: Path, cls: str, layers, rank=4, component="block_output"):
    import torch

    pyvene, iv = pyreft
    torch.manual_seed(sum(layers) + rank)
    d = model.config.hidden_size
    reps = []
    for L in layers:
        i = getattr(iv, cls)(embed_dim=d, low_rank_dimension=rank, dtype=torch.float32,
                             add_bias=False)
        with torch.no_grad():   # trained-looking weights, not the near-identity init
            for p in i.learned_source.parameters():
                p.normal_(0, 0.5)
        reps.append({"layer": L, "component": component, "low_rank_dimension": rank,
                     "intervention": i})
    im = pyvene.IntervenableModel(pyvene.IntervenableConfig(representations=reps), model)
    out = tmp / f"{cls}-{'-'.join(map(str, layers))}"
    im.save(str(out))
    return im, out


@pytest.mark.parametrize("cls,kind", [("LoreftIntervention", "loreft"),
                                      ("DireftIntervention", "direft"),
                                      ("NodireftIntervention", "direft")])
@pytest.mark.parametrize("positions,locs", [("f1+l1", [0, N_PROMPT - 1]),
                                             ("all", list(range(N_PROMPT)))])
def test_converted_adapter_matches_pyreft(pyreft, ref, tmp_path, cls, kind, positions, locs):
    import torch

    from trainer.pyreft_convert import convert

    im, saved = _save(pyreft, ref.base, tmp_path, cls, layers=(1, 3))
    assert any(p.name.startswith("intkey_") for p in saved.iterdir())   # a real pyreft save
    out = convert(saved, tmp_path / "conv", positions)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["intervention"], cfg["layers"], cfg["rank"], cfg["positions"]) == \
        (kind, [1, 3], 4, positions)
    ids = torch.randint(3, ref.base.config.vocab_size, (1, N_PROMPT),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, theirs = im({"input_ids": ids}, unit_locations={"base": [[locs]] * 2})
        hooks = ref._reft_hooks(str(out), N_PROMPT)
        try:
            ours = ref.base(input_ids=ids).logits
        finally:
            for h in hooks:
                h.remove()
        plain = ref.base(input_ids=ids).logits
    assert (theirs.logits - plain).abs().max() > 1.0   # the interventions do something
    assert torch.allclose(theirs.logits, ours, atol=1e-4), (theirs.logits - ours).abs().max()


def test_converted_adapter_passes_serving_validation(pyreft, ref, tmp_path):
    """What the prefill worker checks on upload (orthonormal R for LoReFT included)."""
    from prefill_worker.adapters.base import BaseModelShape, validate_adapter
    from trainer.pyreft_convert import convert

    shape = BaseModelShape.from_hf_config(ref.base.config)
    for cls in ("LoreftIntervention", "DireftIntervention"):
        _, saved = _save(pyreft, ref.base, tmp_path, cls, layers=(0, 1, 2, 3), rank=8)
        spec = validate_adapter(convert(saved, tmp_path / cls, "f2+l2"), shape, max_rank=16)
        assert spec.kind == "reft_p" and spec.rank == 8, spec


def test_refusals(pyreft, ref, tmp_path):
    import torch

    from trainer.pyreft_convert import ConvertError, convert

    _, lo = _save(pyreft, ref.base, tmp_path, "LoreftIntervention", layers=(1,))
    _, di = _save(pyreft, ref.base, tmp_path, "DireftIntervention", layers=(2,))
    _, no = _save(pyreft, ref.base, tmp_path, "NoreftIntervention", layers=(1,))
    _, mlp = _save(pyreft, ref.base, tmp_path, "LoreftIntervention", layers=(0,),
                   component="mlp_output")
    cases = {"NoReFT's projection is not orthonormal": (no, "all"),
             "decoder layer output": (mlp, "all"),
             "--positions": (lo, "middle")}
    for msg, (src, pos) in cases.items():
        with pytest.raises(ConvertError, match=msg):
            convert(src, tmp_path / "x", pos)
    # mixed kinds in one save: build the config by merging two real saves
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    a, b = (json.loads((p / "config.json").read_text()) for p in (lo, di))
    for k in ("representations", "intervention_types", "sorted_keys", "intervention_dimensions"):
        a[k] = a[k] + b[k]
    (mixed / "config.json").write_text(json.dumps(a))
    for p in (lo, di):
        for f in p.glob("intkey_*.bin"):
            (mixed / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConvertError, match="mix interventions"):
        convert(mixed, tmp_path / "x", "all")

    # a pickle that would run code when unpickled: refused, and the code never runs
    class Evil:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").write_text, ("ran",))

    (bin_,) = lo.glob("intkey_*.bin")
    torch.save({"weight": Evil()}, bin_)
    with pytest.raises(ConvertError, match="refusing to unpickle"):
        convert(lo, tmp_path / "x", "all")
    assert not (tmp_path / "pwned").exists()
    bin_.unlink()
    with pytest.raises(ConvertError, match="missing"):
        convert(lo, tmp_path / "x", "all")
    assert not (tmp_path / "x").exists()   # nothing written on any refusal


def test_cli_and_upload_hint(pyreft, ref, tmp_path, capsys):
    from cluster.adapter_store import check_filename
    from app.cli import main
    from cluster.errors import InvalidAdapter

    _, lo = _save(pyreft, ref.base, tmp_path, "LoreftIntervention", layers=(0, 2))
    assert main(["convert-pyreft", str(lo), str(tmp_path / "ok"), "--positions", "l3"]) == 0
    assert "loreft rank 4 on layers [0, 2], positions l3" in capsys.readouterr().out
    assert main(["convert-pyreft", str(tmp_path), str(tmp_path / "no"), "--positions", "all"]) == 2
    assert "no config.json" in capsys.readouterr().err
    (bin_,) = list(lo.glob("intkey_*.bin"))[:1]
    with pytest.raises(InvalidAdapter, match="preft convert-pyreft"):
        check_filename(bin_.name)   # uploading the pyreft save itself says what to do
