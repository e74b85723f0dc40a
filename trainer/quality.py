"""SFT quality study at small scale: PreFT (lora_p, reft_p) vs. all-token LoRA vs. base.

Everything is built here, nothing is downloaded:

1. A character-level tokenizer and a small Llama-architecture base model trained from
   scratch (a few CPU minutes) on a synthetic multi-task corpus. Inputs are 2-4 words of
   2-4 letters from a-h; the prompt names the task with a tag, ``"<tag>: <words>>"``, and
   the response is the transformed words + EOS. Tags: ``rev`` (reverse the word order),
   ``up`` (uppercase), ``ciph`` (substitute letters with a fixed cipher), ``dup``
   (repeat every word twice), ``copy``. An untagged prompt ``"<words>>"`` means copy.
2. Per-user tasks present untagged prompts only, so the base model alone copies the input
   (its floor): ``reverse`` (= rev), ``upper`` (= up), ``cipher`` (a user-specific
   substitution the base model has never seen: the adapter must supply new knowledge,
   not only select a known skill), ``revcipher`` (reverse the word order and apply the
   user cipher: a known skill composed with new knowledge).
3. For each user task, kind (lora_p, reft_p LoReFT on all layers and prompt positions,
   all-token lora), rank and seed: ``trainer.train.train`` on the task's training set,
   then ``trainer.train.evaluate`` on held-out inputs: eval loss (CE per response token)
   and exact-match accuracy of the greedy output (PreFT semantics for lora_p/reft_p, as
   served).

Results: ``bench/results/quality.json`` and ``bench/results/quality.png``; write-up in
``docs/quality.md``.

  python -m trainer.quality --work /tmp/preft-quality            # defaults as in the doc
  python -m trainer.quality --ranks 4 16 --seeds 0 --tasks reverse --adapter-steps 100
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

LETTERS = "abcdefgh"
BASE_CIPHER = dict(zip(LETTERS, "cdefghab"))          # known to the base model (tag ciph)
USER_CIPHER = dict(zip(LETTERS, "hgfedcba"))          # never seen in pretraining
TAGS = ("rev", "up", "ciph", "dup", "copy")
USER_TASKS = {"reverse": "rev", "upper": "up", "cipher": "user_ciph",
              "revcipher": "rev+user_ciph", "repeat": "dup"}
TASK_DOC = {
    "reverse": "untagged prompt -> reverse the word order (a base skill, tag rev)",
    "upper": "untagged prompt -> uppercase (a base skill, tag up)",
    "repeat": "untagged prompt -> say every word twice (a base skill, tag dup)",
    "cipher": "untagged prompt -> user-specific letter substitution (new to the base)",
    "revcipher": "untagged prompt -> reverse the word order and apply the user cipher "
                 "(a base skill composed with new knowledge)",
}
KIND_LABEL = {"lora_p": "LoRA-P (PreFT)", "reft_p": "LoReFT-P (PreFT)", "lora": "LoRA (all tokens)"}
SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = " >:" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PRINTABLE = "".join(map(chr, range(32, 127))) + "\n"   # the demo's vocabulary
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]      # its byte fallback


def words(rng: random.Random) -> list[str]:
    n = rng.randint(2, 4)
    while True:
        ws = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4))) for _ in range(n)]
        if len(set(ws)) == len(ws):   # distinct words: reversing always changes the text
            return ws


def apply(op: str, ws: list[str]) -> str:
    if op == "rev":
        return " ".join(reversed(ws))
    if op == "up":
        return " ".join(w.upper() for w in ws)
    if op == "ciph":
        return " ".join("".join(BASE_CIPHER[c] for c in w) for w in ws)
    if op == "user_ciph":
        return " ".join("".join(USER_CIPHER[c] for c in w) for w in ws)
    if op == "rev+user_ciph":
        return apply("user_ciph", list(reversed(ws)))
    if op == "dup":
        return " ".join(f"{w} {w}" for w in ws)
    if op == "copy":
        return " ".join(ws)
    raise ValueError(op)


def base_pair(rng: random.Random, tags: tuple[str, ...] = TAGS) -> tuple[str, str]:
    ws = words(rng)
    tag = rng.choice(tuple(tags) + ("",))   # "" = untagged -> copy
    prompt = (f"{tag}: " if tag else "") + " ".join(ws) + ">"
    return prompt, apply(tag or "copy", ws)


def user_pairs(task: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, response) pairs of a user task; no prompt in ``exclude``."""
    rng = random.Random(seed)
    op = USER_TASKS[task]
    out, seen = [], set(exclude)
    while len(out) < n:
        ws = words(rng)
        prompt = " ".join(ws) + ">"
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, apply(op, ws)))
    return out


def task_data(task: str, n_train: int, n_eval: int, exclude=()) -> tuple[list, list]:
    """(train, eval) pairs of a user task: seeds depend only on the task (however a study is
    split over processes), and no training prompt is an eval prompt or in ``exclude``."""
    ti = list(USER_TASKS).index(task)
    ev = user_pairs(task, n_eval, seed=1000 + ti)
    tr = user_pairs(task, n_train, seed=2000 + ti, exclude={p for p, _ in ev} | set(exclude))
    return tr, ev


# ----------------------------------------------------------------------------- base model
def build_char_tokenizer(out_dir: Path, vocab: str = "chars"):
    """One token per character. ``vocab="chars"`` (the study's): :data:`CHARS` only, anything
    else unknown. ``vocab="bytes"`` (the demo's): the same ids for :data:`CHARS`, then every
    other printable ASCII character and newline, then the 256 byte tokens ``<0x00>``..
    ``<0xFF>`` any other character falls back to, with the ByteFallback decoder Llama-style
    tokenizers use -- the decoder vLLM's structured-output backend (llguidance) reads; it
    cannot read a bare ``Fuse`` decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab == "bytes":
        extra = [c for c in PRINTABLE if c not in CHARS]
        ids = {t: i for i, t in enumerate(SPECIALS + list(CHARS) + extra + BYTE_TOKENS)}
        tok = Tokenizer(models.BPE(ids, [], byte_fallback=True))
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    elif vocab == "chars":
        ids = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
        tok = Tokenizer(models.WordLevel(ids, unk_token="<pad>"))
        tok.decoder = decoders.Fuse()
    else:
        raise ValueError(f"vocab={vocab!r}: expected 'chars' or 'bytes'")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.model_max_length = 4096
    fast.save_pretrained(str(out_dir))
    return fast


def make_base(out_dir: str | Path, *, steps: int = 3000, batch: int = 32, hidden: int = 128,
              layers: int = 4, lr: float = 3e-3, seed: int = 0, tags: tuple[str, ...] = TAGS,
              max_positions: int = 256, log=print, on_step=None) -> Path:
    """Train the base model from scratch (idempotent: reuses a finished one).

    ``on_step(step, loss)``, if given, is called after every step (progress bars)."""
    import torch
    import torch.nn.functional as F

    out = Path(out_dir)
    marker = out / "quality_base.json"
    spec = {"steps": steps, "batch": batch, "hidden": hidden, "layers": layers, "lr": lr,
            "seed": seed, "tags": list(tags), "letters": LETTERS}
    if max_positions != 256:   # (the study's base predates this knob: keep its spec valid)
        spec["max_positions"] = max_positions
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(out)
    torch.manual_seed(seed)
    model = _new_base_model(len(tok), hidden, layers, max_positions)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.05, 1 - (s - warm) / (steps - warm)))
    rng = random.Random(seed)
    t0, losses = time.time(), []
    model.train()
    for step in range(steps):
        ids, lab = _base_batch(rng, tok, tags, batch)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if step % 250 == 0 or step == steps - 1:
            log(f"base step {step + 1}/{steps} loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    marker.write_text(json.dumps({"spec": spec, "losses": losses[::10],
                                  "seconds": round(time.time() - t0, 1)}))
    return out


def with_byte_vocab(src: Path, dst: Path) -> Path:
    """``src`` (a base trained over :data:`CHARS`) served with the ``"bytes"`` vocabulary at
    ``dst``: the same weights, the new tokens added by :func:`_extend_vocab`."""
    from transformers import AutoModelForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(dst, "bytes")
    model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    _extend_vocab(model, len(tok), tok.bos_token_id)
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst


def _extend_vocab(model, size: int, never_id: int) -> None:
    """Grow the embeddings to ``size`` tokens after training: each new token reads as
    ``<pad>`` and scores as ``never_id`` (``<bos>``, a token training taught the model never
    to predict), so the model says what it said before unless a grammar asks for a new one."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if size == old:
        return
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        new_emb = torch.cat([emb, emb[:1].expand(size - old, -1)]).clone()
        new_head = torch.cat([head, head[never_id:never_id + 1].expand(size - old, -1)]).clone()
        model.resize_token_embeddings(size, mean_resizing=False)
        model.get_input_embeddings().weight.copy_(new_emb)
        model.get_output_embeddings().weight.copy_(new_head)
    model.config.vocab_size = size


def _new_base_model(vocab: int, hidden: int, layers: int, max_positions: int):
    """A randomly initialised small Llama (float32), from torch's current seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=max_positions,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.02)
    return LlamaForCausalLM(cfg).to(torch.float32)


def _base_batch(rng: random.Random, tok, tags: tuple[str, ...], batch: int):
    """(input ids, labels) of ``batch`` tagged pairs, padded; labels only on the response."""
    import torch

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    seqs, labs = [], []
    for _ in range(batch):
        p, r = base_pair(rng, tags)
        pi, ri = enc(p), enc(r) + [tok.eos_token_id]
        seqs.append(pi + ri)
        labs.append([-100] * len(pi) + ri)
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    lab = torch.tensor([lb + [-100] * (T - len(lb)) for lb in labs])
    return ids, lab


def base_skill_check(model_dir: Path, n: int = 40, seed: int = 99,
                     tags: tuple[str, ...] = TAGS) -> dict:
    """Greedy exact match of the base model on each tagged task (it must know them)."""
    from trainer.train import evaluate

    rng = random.Random(seed)
    out = {}
    for tag in tags:
        ex = []
        for _ in range(n):
            ws = words(rng)
            ex.append((f"{tag}: " + " ".join(ws) + ">", apply(tag, ws)))
        out[tag] = evaluate(str(model_dir), None, None, ex).accuracy
    return out


# ----------------------------------------------------------------------------- study
def run_study(a) -> dict:
    """Train every (task, kind, rank, seed) adapter on one base model and evaluate it; the
    results with per-configuration means and the setup."""
    from trainer.train import evaluate

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    base = make_base(work / "base", steps=a.base_steps, batch=a.base_batch, hidden=a.hidden, log=log)
    base_meta = json.loads((base / "quality_base.json").read_text())
    skills = base_skill_check(base)
    log(f"base skills (tagged, greedy exact match): {skills}")

    res = {"setup": {}, "base": {}, "runs": [], "summary": []}
    for task in a.tasks:
        train_file, ev = _write_task_data(work, task, a.n_train, a.n_eval)
        b = evaluate(str(base), None, None, ev, batched=True, batch_size=50)
        res["base"][task] = b.summary()
        log(f"[{task}] base: {b.summary()}")
        for kind, variant in runs_of(a):
            for rank in a.ranks:
                for seed in a.seeds:
                    row = _study_run(a, work, base, task, train_file, kind, variant, rank, seed)
                    res["runs"].append(row)
                    partial = Path(a.results) / "quality.partial.json"
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.write_text(json.dumps(res, indent=1))
                    log(f"[{task}] {kind} r={rank} seed={seed}: loss {row['eval_loss']:.4f} "
                        f"acc {row['accuracy']:.2f} ({row['train_seconds']:.0f}s, "
                        f"{time.time() - t0:.0f}s total)")
    kinds = [label(k, v) for k, v in runs_of(a)]
    res["summary"] = _study_summary(res["runs"], a.tasks, kinds, a.ranks)
    res["setup"] = _study_setup(a, base_meta, skills, kinds, t0)
    return res


def _write_task_data(work: Path, task: str, n_train: int, n_eval: int):
    """(train.jsonl path, eval pairs) of one task, written under ``work/data/task``."""
    from trainer.data import write_jsonl

    tr, ev = task_data(task, n_train, n_eval)
    d = work / "data" / task
    write_jsonl(d / "train.jsonl", tr)
    write_jsonl(d / "eval.jsonl", ev)
    return d / "train.jsonl", ev


def _study_run(a, work: Path, base: Path, task: str, train_file: Path, kind: str, variant,
               rank: int, seed: int) -> dict:
    """Train one adapter and return its results row."""
    from trainer.train import TrainConfig, train

    iv, positions, layers = variant or ("loreft", "all", None)
    out = work / "adapters" / f"{task}-{label(kind, variant)}-r{rank}-s{seed}"
    cfg = TrainConfig(model=str(base), data=str(train_file),
                      eval_data=str(train_file.parent / "eval.jsonl"), out=str(out), kind=kind,
                      rank=rank, steps=a.adapter_steps, batch_size=a.batch_size,
                      lr=a.lr_reft if kind == "reft_p" else a.lr_lora,
                      seed=seed, max_eval=a.n_eval, quiet=True,
                      eval_batched=True, intervention=iv, positions=positions,
                      layers=layers)
    r = train(cfg)
    lg = json.loads(Path(r.log_path).read_text())
    return {"task": task, "kind": label(kind, variant), "rank": rank, "seed": seed,
            "eval_loss": r.eval["eval_loss"], "accuracy": r.eval["accuracy"],
            "final_train_loss": r.losses[-1], "trainable_params": lg["trainable_params"],
            "train_seconds": lg["train_seconds"]}


def _study_summary(runs: list[dict], tasks, kinds: list[str], ranks) -> list[dict]:
    """Mean and standard deviation over seeds, per (task, kind, rank)."""
    out = []
    for task in tasks:
        for kind in kinds:
            for rank in ranks:
                rows = [r for r in runs if (r["task"], r["kind"], r["rank"]) == (task, kind, rank)]
                ls, acc = [r["eval_loss"] for r in rows], [r["accuracy"] for r in rows]
                out.append({
                    "task": task, "kind": kind, "rank": rank, "n_seeds": len(rows),
                    "eval_loss_mean": statistics.fmean(ls),
                    "eval_loss_std": statistics.stdev(ls) if len(ls) > 1 else 0.0,
                    "accuracy_mean": statistics.fmean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "trainable_params": rows[0]["trainable_params"]})
    return out


def _study_setup(a, base_meta: dict, skills: dict, kinds: list[str], t0: float) -> dict:
    import torch

    return {
        "base_model": {"arch": "LlamaForCausalLM", "hidden": a.hidden, "layers": 4,
                       "heads": 4, "kv_heads": 2, "vocab": "char-level",
                       "pretrain_steps": a.base_steps, "pretrain_batch": a.base_batch,
                       "pretrain_seconds": base_meta.get("seconds"),
                       "tagged_task_accuracy": skills},
        "tasks": {t: TASK_DOC[t] for t in a.tasks},
        "n_train": a.n_train, "n_eval": a.n_eval, "adapter_steps": a.adapter_steps,
        "batch_size": a.batch_size, "lr_lora": a.lr_lora, "lr_reft": a.lr_reft,
        "reft": "LoReFT, all decoder layers, positions=all" if a.reft_variants == [DEFAULT_VARIANT]
                else {"variants (intervention:positions:layers)": a.reft_variants},
        "lora_targets": "q,k,v,o,gate,up,down; alpha = 2*rank",
        "kinds": kinds, "ranks": list(a.ranks), "seeds": list(a.seeds),
        "torch_threads": torch.get_num_threads(), "total_seconds": round(time.time() - t0, 1),
        "command": "python -m trainer.quality " + " ".join(sys.argv[1:]),
    }


DEFAULT_VARIANT = "loreft:all:all"


def parse_variant(spec: str) -> tuple[str, str, tuple[int, ...] | None]:
    """``intervention:positions:layers``, e.g. ``direft:all:all``, ``loreft:f3+l3:all``,
    ``loreft:all:2,3`` -> (intervention, positions, layers or None = all)."""
    try:
        iv, pos, layers = spec.split(":")
        if iv not in ("loreft", "direft") or not re.fullmatch(r"all|[fl]\d+(\+[fl]\d+)?", pos):
            raise ValueError(spec)
        return iv, pos, None if layers == "all" else tuple(int(x) for x in layers.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--reft-variants {spec!r}: use intervention:positions:layers with intervention "
            "loreft|direft, positions all|f<p>|l<s>|f<p>+l<s>, layers all or e.g. 2,3; e.g. "
            "direft:all:all or loreft:f3+l3:2,3") from None


def runs_of(a) -> list[tuple[str, tuple | None]]:
    """(kind, ReFT variant or None) in study order; reft_p once per --reft-variants entry."""
    out = []
    for kind in a.kinds:
        if kind == "reft_p":
            out += [(kind, parse_variant(v)) for v in a.reft_variants]
        else:
            out.append((kind, None))
    return out


def label(kind: str, variant) -> str:
    """Row label: the kind, with a ReFT variant other than the default in brackets."""
    if variant is None or variant == parse_variant(DEFAULT_VARIANT):
        return kind
    iv, pos, layers = variant
    return f"reft_p[{iv},{pos},L{'all' if layers is None else '+'.join(map(str, layers))}]"


def merge(parts: list[dict]) -> dict:
    """Combine results of one study split over processes (by task and/or by kind)."""
    res = {"setup": dict(parts[0]["setup"]), "base": {}, "runs": [], "summary": []}
    for p in parts:
        res["base"].update(p["base"])
        res["runs"] += p["runs"]
        res["summary"] += p["summary"]
    kinds = list(dict.fromkeys(k for p in parts for k in p["setup"]["kinds"]))
    tasks = list(res["base"])
    res["summary"].sort(key=lambda s: (tasks.index(s["task"]), kinds.index(s["kind"]), s["rank"]))
    res["setup"]["kinds"] = kinds
    res["setup"]["ranks"] = sorted({r for p in parts for r in p["setup"]["ranks"]})
    res["setup"]["tasks"] = {k: v for p in parts for k, v in p["setup"]["tasks"].items()}
    res["setup"]["command"] = [p["setup"]["command"] for p in parts]
    res["setup"]["total_seconds"] = [p["setup"]["total_seconds"] for p in parts]
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(res["base"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.5), squeeze=False)
    for j, task in enumerate(tasks):
        for i, (metric, label) in enumerate((("eval_loss", "eval loss (CE/token)"),
                                             ("accuracy", "exact match"))):
            ax = axes[i][j]
            for kind in res["setup"]["kinds"]:
                rows = [s for s in res["summary"] if s["task"] == task and s["kind"] == kind]
                ax.errorbar([s["rank"] for s in rows], [s[f"{metric}_mean"] for s in rows],
                            yerr=[s[f"{metric}_std"] for s in rows], marker="o", capsize=3,
                            label=KIND_LABEL.get(kind, kind))
            ax.axhline(res["base"][task][metric], color="gray", ls="--", label="base (no adapter)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank")
            ax.set_ylabel(label)
            if metric == "eval_loss":
                ax.set_yscale("log")
                ax.set_title(f"user task: {task}")
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(res: dict) -> str:
    lines = ["| task | kind | rank | params | eval loss (mean ± sd) | exact match (mean ± sd) |",
             "|---|---|---|---|---|---|"]
    for task, b in res["base"].items():
        lines.append(f"| {task} | base (no adapter) | – | 0 | {b['eval_loss']:.3f} | {b['accuracy']:.2f} |")
        for s in res["summary"]:
            if s["task"] == task:
                lines.append(f"| {task} | {s['kind']} | {s['rank']} | {s['trainable_params']:,} | "
                             f"{s['eval_loss_mean']:.3f} ± {s['eval_loss_std']:.3f} | "
                             f"{s['accuracy_mean']:.2f} ± {s['accuracy_std']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/preft-quality", help="base model, data, adapters")
    p.add_argument("--results", default="bench/results", help="quality.json / quality.png go here")
    p.add_argument("--tasks", nargs="+", default=["reverse", "cipher"], choices=list(USER_TASKS))
    p.add_argument("--kinds", nargs="+", default=["lora_p", "reft_p", "lora"],
                   choices=["lora_p", "reft_p", "lora"])
    p.add_argument("--reft-variants", nargs="+", default=[DEFAULT_VARIANT],
                   metavar="IV:POS:LAYERS", help="reft_p runs, one per entry: intervention "
                   "(loreft|direft), positions (all|f<p>|l<s>|f<p>+l<s>), layers (all or "
                   "e.g. 2,3); default loreft:all:all")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--base-steps", type=int, default=3000)
    p.add_argument("--base-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core box more threads are slower)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--adapter-steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--lr-reft", type=float, default=5e-3)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="instead of running: merge quality.json files of runs split by task "
                        "(e.g. one process per task) into --results")
    a = p.parse_args(argv)
    try:   # before the base model is trained, not after
        [parse_variant(v) for v in a.reft_variants]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if a.merge:
        res = merge([json.loads(Path(f).read_text()) for f in a.merge])
    else:
        import torch
        torch.set_num_threads(a.threads)
        res = run_study(a)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "quality.png")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
