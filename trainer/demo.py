"""The embedded demo: a small base model and three adapters trained here, before the request path.

``preft demo`` and ``preft up`` without ``--model`` serve what this module builds under
``$PREFT_HOME/demo`` (nothing is downloaded; the first build takes ~3-4 CPU minutes, later
runs reuse it):

* ``base``: the quality study's character-level Llama (``trainer.quality.make_base``) trained
  from scratch on tagged tasks ``rev:``, ``up:``, ``dup:``, ``copy:``. Untagged, it copies
  its input: ``"bad cafe head>"`` -> ``"bad cafe head"``. One token per character. It is
  trained, and the adapters are trained on it, over the study's characters (``base-chars/``);
  it is served (``base/``: the same weights) with every printable ASCII character and newline,
  anything else as UTF-8 bytes (``<0x..>``, a ByteFallback decoder, which vLLM's
  structured-output backend reads, so ``json_schema`` works here). The added tokens score as
  ``<bos>``, which the model never predicts, so they change no output unless a grammar asks
  for one (``trainer.quality.with_byte_vocab``). Its chat template
  (:data:`CHAT_TEMPLATE`) turns a chat into the one prompt it knows: the last user message
  and ``>``.
* Three adapters trained with ``trainer.train.train`` -- exactly what ``preft train`` runs --
  on *untagged* prompts, so each one visibly changes what the same prompt makes the model
  say. Each is served prefill-only: the adapter conditions the prompt's KV and the first
  token; every later token comes from the base model.

  ======  ====================  ==========================================================
  alice   LoRA-P, rank 16       say every word twice (a base skill the adapter selects)
  bob     LoReFT-P, rank 4      uppercase (a base skill, via residual-stream interventions)
  carol   DiReFT-P, rank 4      a private letter substitution abcdefgh -> hgfedcba
                                (knowledge the base model never saw)
  ======  ====================  ==========================================================

``demo.json`` next to them records the spec (a changed spec rebuilds), seconds, and each
adapter's held-out greedy exact match as served (PreFT semantics), which ``preft demo``
prints. Prompts outside the training distribution (letters other than a-h, long inputs)
get whatever a 0.6M-parameter model makes of them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# The base model: 2000 steps x 32 sequences take ~90-130 s on 2 cores.
# It is trained over the study's characters (base-chars/, where the adapters are trained
# too) and served with every printable ASCII character and byte fallback (base/: the same
# weights, a decoder structured output can read; trainer.quality.with_byte_vocab).
BASE_SPEC = {"steps": 2000, "batch": 32, "hidden": 128, "layers": 4, "lr": 3e-3, "seed": 0,
             "tags": ("rev", "up", "dup", "copy"), "max_positions": 2048}
# The base model's own chat template (chat_template.jinja next to its tokenizer): it answers
# one prompt of the form "words>", so a chat is the last user message, closed by ">". The
# gateway, `preft train` and transformers' apply_chat_template all render it the same way.
CHAT_TEMPLATE = ("{%- for m in messages if m.role == 'user' %}{% if loop.last %}"
                 "{{ m.content.strip().rstrip('>') }}>{% endif %}{% endfor %}")
N_TRAIN, N_EVAL = 400, 50


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    task: str             # a trainer.quality.USER_TASKS key
    kind: str             # lora_p | reft_p
    rank: int
    lr: float
    steps: int = 600
    intervention: str = "loreft"   # reft_p only

    @property
    def label(self) -> str:
        if self.kind == "lora_p":
            return f"LoRA-P r={self.rank}"
        return f"{'LoReFT' if self.intervention == 'loreft' else 'DiReFT'}-P r={self.rank}"


DEMO = (
    DemoAdapter("alice", "repeat", "lora_p", rank=16, lr=4e-3),
    DemoAdapter("bob", "upper", "reft_p", rank=4, lr=5e-3, intervention="loreft"),
    DemoAdapter("carol", "cipher", "reft_p", rank=4, lr=5e-3, intervention="direft"),
)
TRAINED_TO = {"repeat": "say every word twice", "upper": "answer in uppercase",
              "cipher": "swap letters a-h, b-g, c-f, d-e"}
# Untagged prompts in the training distribution (2-4 words of 2-4 letters from a-h), none of
# them a training prompt (checked in tests/integration/test_demo.py).
DEMO_PROMPTS = ("bad cafe head>", "fade dab>", "beef hag ace>")


def expected(task: str, prompt: str) -> str:
    """What an adapter trained on ``task`` should answer (the base model copies)."""
    from trainer.quality import USER_TASKS, apply

    return apply(USER_TASKS[task] if task else "copy", prompt.rstrip(">").split())


def _spec() -> dict:
    """What demo.json records as built: a change to any of it rebuilds the demo."""
    return {"base": {k: list(v) if isinstance(v, tuple) else v for k, v in BASE_SPEC.items()},
            "adapters": [asdict(a) for a in DEMO], "n_train": N_TRAIN, "n_eval": N_EVAL,
            "chat_template": CHAT_TEMPLATE, "served_vocab": "bytes"}


def build(home: str | os.PathLike, progress=None) -> tuple[Path, dict[str, Path], dict]:
    """Build (or reuse) the demo model and adapters under ``home``/demo.

    ``progress(description, completed, total)`` is called as training advances.
    Returns (model dir, {name: adapter dir}, the demo.json record).
    """
    from transformers.utils import logging as hf_logging

    from trainer.data import write_jsonl
    from trainer.quality import make_base, task_data, with_byte_vocab
    from trainer.train import TrainConfig, train

    hf_logging.disable_progress_bar()   # ours is the one bar over the whole build
    root = Path(home) / "demo"
    marker = root / "demo.json"
    spec = _spec()
    paths = {a.name: root / "adapters" / a.name for a in DEMO}
    if marker.exists():
        rec = json.loads(marker.read_text())
        if rec.get("spec") == spec:
            return root / "base", paths, rec
    total = BASE_SPEC["steps"] + sum(a.steps for a in DEMO)
    done = 0

    def tick(what):
        def f(step, _loss):
            if progress is not None:
                progress(what, done + step, total)
        return f

    t0 = time.time()
    trained = make_base(root / "base-chars", log=lambda *_: None, on_step=tick("base model"),
                        **{k: tuple(v) if k == "tags" else v for k, v in BASE_SPEC.items()})
    base = with_byte_vocab(trained, root / "base")
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    done += BASE_SPEC["steps"]
    rec = {"spec": spec, "base_seconds": round(time.time() - t0, 1), "adapters": {}}
    for a in DEMO:
        tr, ev = task_data(a.task, N_TRAIN, N_EVAL, exclude=DEMO_PROMPTS)
        d = root / "data" / a.name
        write_jsonl(d / "train.jsonl", tr)
        write_jsonl(d / "eval.jsonl", ev)
        cfg = TrainConfig(model=str(trained), data=str(d / "train.jsonl"),
                          eval_data=str(d / "eval.jsonl"), out=str(paths[a.name]), kind=a.kind,
                          rank=a.rank, intervention=a.intervention, steps=a.steps,
                          batch_size=16, lr=a.lr, seed=0, quiet=True, eval_batched=True,
                          max_eval=N_EVAL)
        r = train(cfg, on_step=tick(f"{a.name}: {a.label}"))
        done += a.steps
        rec["adapters"][a.name] = {
            "task": a.task, "label": a.label, "trained_to": TRAINED_TO[a.task],
            "eval_exact_match": r.eval["accuracy"], "eval_loss": r.eval["eval_loss"],
            "train_seconds": round(r.seconds, 1),
            "command": (f"preft train --model {trained} --data {d / 'train.jsonl'} "
                        f"--eval-data {d / 'eval.jsonl'} --out {paths[a.name]} --kind {a.kind} "
                        f"--rank {a.rank} --lr {a.lr} --steps {a.steps} --batch-size 16"
                        + (f" --intervention {a.intervention}" if a.kind == "reft_p" else ""))}
    rec["seconds"] = round(time.time() - t0, 1)
    marker.write_text(json.dumps(rec, indent=1))
    return base, paths, rec
