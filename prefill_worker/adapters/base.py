"""The adapter-kind seam: ``validate(path, base) -> AdapterSpec`` per kind, in a registry.

The kinds (:mod:`.lora_p`, :mod:`.reft_p`) register themselves into :data:`KINDS` (and, when
their ``adapter_config.json`` says so in a way of its own, into :data:`CLAIMS`) with
:func:`register_kind`; the package's ``__init__`` imports them. Nothing here imports a kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cluster.errors import InvalidAdapter


@dataclass(frozen=True)
class BaseModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0      # token ids an adapter may name (0: not known, not checked)

    @classmethod
    def from_hf_config(cls, cfg) -> "BaseModelShape":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                   cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                   cfg.vocab_size)


@dataclass(frozen=True)
class AdapterSpec:
    kind: str
    rank: int
    target_modules: tuple[str, ...]
    sha256: str
    size_bytes: int


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InvalidAdapter(f"{what}: {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidAdapter(f"{what}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{what}: {path.name} must hold a JSON object")
    return data


Validator = Callable[[Path, BaseModelShape, int, int], AdapterSpec]
KINDS: dict[str, Validator] = {}
# kind -> does this adapter_config.json declare it? (kinds whose files say so themselves)
CLAIMS: dict[str, Callable[[dict], bool]] = {}
# kind -> what its files must say (the error when an upload names the kind over other files)
NEEDS: dict[str, str] = {}


def safetensors_weights(path: Path, how_to_save: str) -> Path:
    """``adapter_model.safetensors`` of an adapter directory; pickle-based weights refused."""
    from cluster.adapter_store import PICKLE_SUFFIXES

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise InvalidAdapter(f"adapter weights {pickled} are pickle-based and are refused; "
                                 f"save them as adapter_model.safetensors ({how_to_save})")
        raise InvalidAdapter("adapter_model.safetensors is missing")
    return weights


def register_kind(name: str, claims: Callable[[dict], bool] | None = None, needs: str = ""):
    """Register a kind's validator; ``claims(adapter_config) -> bool`` if its files declare
    the kind in a way :func:`detect_kind` must look for before ``preft_kind``; ``needs``:
    what files of this kind must say (told to an upload that names the kind wrongly)."""
    def deco(fn: Validator) -> Validator:
        KINDS[name] = fn
        if claims is not None:
            CLAIMS[name] = claims
        if needs:
            NEEDS[name] = needs
        return fn
    return deco


# Kinds that share one file format: the files cannot say which the uploader means.
_SAME_FILES = {"lora": "lora_p"}


def validate_adapter(path: str | Path, base: BaseModelShape, *, max_rank: int,
                     max_bytes: int = 1 << 30, kind: str | None = None) -> AdapterSpec:
    """Validate an adapter directory as ``kind`` (default: the kind its files declare);
    raises :class:`InvalidAdapter`."""
    p = Path(path)
    if not p.is_dir():
        raise InvalidAdapter(f"adapter directory {str(path)!r} does not exist")
    files = detect_kind(p)
    if kind is None:
        kind = files
    if kind not in KINDS:
        raise InvalidAdapter(f"kind {kind!r} is not supported; supported: {sorted(KINDS)}")
    if _SAME_FILES.get(kind, kind) != files:
        needs = f" ({NEEDS[kind]})" if kind in NEEDS else ""
        raise InvalidAdapter(f"the upload says kind {kind!r} but the files are a {files} "
                             f"adapter{needs}; fix the kind or the files")
    return KINDS[kind](p, base, max_rank, max_bytes)


def detect_kind(path: Path) -> str:
    """The kind an adapter directory declares in ``adapter_config.json``: ``reft_p`` when
    it says ``"peft_type": "REFT_P"`` or ``"preft_kind": "reft_p"``, an explicit
    ``preft_kind`` otherwise, else ``lora_p`` (standard PEFT files). The kinds' own claims
    come from the registry (:data:`CLAIMS`)."""
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        return "lora_p"  # the kind's validator reports the missing file
    cfg = read_json(cfg_file, "adapter")
    for name, claims in CLAIMS.items():
        if claims(cfg):
            return name
    kind = cfg.get("preft_kind")
    if kind is None:
        return "lora_p"
    if kind not in KINDS:
        raise InvalidAdapter(f"preft_kind={kind!r} is not supported; supported: {sorted(KINDS)}")
    return kind
