"""Train a PreFT adapter (lora_p, reft_p) or an all-token LoRA by SFT on a JSONL file.

Data: one JSON object per line, {"prompt": str, "response": str} or a chat
{"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}: the prompt is
every message but the last through the model's own chat template (its tokenizer's
chat_template), else "<|role|>\\n<content>\\n" per message, then "<|assistant|>\\n" -- the
template the HTTP gateway serves chats with (client/preft_client/chat.py, docs/http.md); the last
message is the response. Prompts are tokenized like the serving engine does; responses get
EOS appended.

Kinds and what the loss sees (L = cross-entropy over every response token):
  lora_p  PEFT LoRA on the prompt only. Forward 1: the prompt with the adapter ON
          (use_cache) -> logits of the last prompt position (response token 1, adapter on)
          and the prompt's KV. Forward 2: response[:-1] with the adapter OFF over that KV.
          Gradients reach the adapter through the KV and the first token -- exactly what
          the cluster serves (prefill with the adapter, decode with the base model).
  reft_p  LoReFT/DiReFT interventions on decoder-layer outputs at prompt positions
          (--layers, --positions), same two forwards (hooks active in forward 1 only).
  lora    standard all-token LoRA (adapter on in both forwards), the PEFT baseline.

Output (--out): the adapter directory the cluster loads as is (PEFT LoRA dir for
lora_p/lora, ReFT-P dir per prefill_worker/adapters/reft_p.py), train_log.json (config,
seed, per-step losses, eval metrics) and loss.png. Deterministic given --seed (same
machine, same thread count). Evaluation (--eval-data) is greedy: exact match of the whole
response (EOS included) and eval loss, with the same PreFT semantics as tests/reference.py.

Example:
  python -m trainer.train --model ~/.cache/preft/tiny-llama --data train.jsonl \\
      --eval-data eval.jsonl --kind lora_p --rank 8 --steps 200 --out adapters/alice
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

KINDS = ("lora_p", "reft_p", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    model: str                      # base model directory (HF format, with tokenizer)
    data: str                       # training JSONL
    out: str                        # output adapter directory
    kind: str = "lora_p"
    rank: int = 8
    alpha: float | None = None      # LoRA alpha; default 2 * rank
    targets: tuple[str, ...] = LORA_TARGETS
    intervention: str = "loreft"    # reft_p: loreft | direft
    layers: tuple[int, ...] | None = None   # reft_p: decoder layers; default all
    positions: str = "all"          # reft_p: all | f<p> | l<s> | f<p>+l<s>
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None         # default: 1e-3 (lora kinds), 2e-3 (reft_p)
    weight_decay: float = 0.0
    warmup: int | None = None       # default: steps // 10
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_data: str | None = None
    eval_every: int = 0             # eval loss every N steps (0: only at the end)
    eval_batched: bool = False      # final eval: batched greedy (faster; see evaluate)
    max_eval: int = 200             # at most this many eval examples for the final eval
    append_eos: bool = True
    log_every: int = 10
    plot: bool = True
    quiet: bool = False
    threads: int = 0                # torch threads (0: torch's default)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TrainConfig.kind={self.kind!r}: use one of {list(KINDS)}")
        for name in ("rank", "steps", "batch_size", "grad_accum", "max_eval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r} must be a positive integer")
        if self.intervention not in ("loreft", "direft"):
            raise ValueError(f"TrainConfig.intervention={self.intervention!r}: use loreft or direft")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"TrainConfig.targets={list(self.targets)!r}: supported are "
                             f"{list(LORA_TARGETS)}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"TrainConfig.threads={self.threads!r} must be >= 0 (0: default)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r} must be > 0")
        if self.positions != "all":
            import re
            if not all(re.fullmatch(r"[fl]\d+", p) for p in self.positions.split("+")):
                raise ValueError(f"TrainConfig.positions={self.positions!r}: use all, f<p>, "
                                 "l<s> or f<p>+l<s>")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if self.kind == "reft_p" else 1e-3)


@dataclass
class EvalResult:
    accuracy: float                 # exact match of the greedy output with the response
    eval_loss: float                # mean CE per response token (same semantics)
    n: int
    outputs: list = field(default_factory=list)   # greedy token ids per example
    gaps: list = field(default_factory=list)      # top-1 minus top-2 logit per step
    targets: list = field(default_factory=list)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "eval_loss": self.eval_loss, "n": self.n}


@dataclass
class TrainResult:
    out: str
    losses: list
    eval: dict | None
    log_path: str
    seconds: float


# ----------------------------------------------------------------------------- model side
def load_base(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tok


class Control:
    """Where the adapter is on: ``prompt()`` wraps forward 1, ``response()`` forward 2."""

    def __init__(self, model, kind: str | None, reft=None) -> None:
        self.model, self.kind, self.reft = model, kind, reft

    def set_sel(self, sel) -> None:
        if self.reft is not None:
            self.reft.sel = sel

    @contextlib.contextmanager
    def prompt(self):
        if self.kind is None:          # base model: adapter never on
            with self._lora_off():
                yield
        elif self.reft is not None:
            self.reft.active = True
            try:
                yield
            finally:
                self.reft.active = False
        else:
            yield

    @contextlib.contextmanager
    def response(self):
        if self.kind == "lora":
            yield
        else:
            with self._lora_off():
                yield

    def _lora_off(self):
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            return self.model.disable_adapter()
        return contextlib.nullcontext()


def batch_loss(model, ctl: Control, batch, pad_id: int):
    """Sum of CE over the response tokens of ``batch`` (list of Example) and their count.

    Prompts are left-padded (explicit position ids, so every row sees positions 0..n-1),
    responses right-padded; forward 1 = prompts (adapter per ``ctl.prompt``), forward 2 =
    responses[:-1] over forward 1's KV (adapter per ``ctl.response``)."""
    import torch
    import torch.nn.functional as F

    from trainer.reft import select_positions

    B = len(batch)
    P = max(len(e.prompt) for e in batch)
    R = max(len(e.response) for e in batch)
    pids = torch.full((B, P), pad_id, dtype=torch.long)
    pmask = torch.zeros((B, P), dtype=torch.long)
    rin = torch.full((B, max(R - 1, 1)), pad_id, dtype=torch.long)
    rmask = torch.zeros((B, max(R - 1, 1)), dtype=torch.long)
    labels = torch.full((B, R), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n, m = len(e.prompt), len(e.response)
        pids[i, P - n:] = torch.tensor(e.prompt)
        pmask[i, P - n:] = 1
        if m > 1:
            rin[i, :m - 1] = torch.tensor(e.response[:-1])
            rmask[i, :m - 1] = 1
        labels[i, :m] = torch.tensor(e.response)
    lengths = pmask.sum(1)
    ppos = (pmask.cumsum(1) - 1).clamp(min=0)
    if ctl.reft is not None:
        ctl.set_sel(select_positions(ctl.reft.positions, lengths, P))
    with ctl.prompt():
        out1 = model(input_ids=pids, attention_mask=pmask, position_ids=ppos, use_cache=True,
                     logits_to_keep=1)
    logits = [out1.logits[:, -1:]]
    if R > 1:
        rpos = lengths.unsqueeze(1) + torch.arange(rin.shape[1]).unsqueeze(0)
        with ctl.response():
            out2 = model(input_ids=rin, attention_mask=torch.cat([pmask, rmask], 1),
                         position_ids=rpos, past_key_values=out1.past_key_values,
                         use_cache=True)
        logits.append(out2.logits[:, :R - 1])
    logits = torch.cat(logits, 1).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def attach_adapter(model, kind: str | None, adapter_dir: str | None):
    """Load a saved adapter onto ``model`` for evaluation; returns (model, Control)."""
    from trainer.reft import LoadedReft

    if adapter_dir is None or kind is None:
        return model, Control(model, None)
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    is_reft = (str(cfg.get("peft_type", "")).upper() == "REFT_P"
               or cfg.get("preft_kind") == "reft_p")
    if kind == "reft_p" or is_reft:
        if kind != "reft_p" or not is_reft:
            raise ValueError(f"kind={kind!r} does not match the adapter at {adapter_dir} "
                             f"(peft_type={cfg.get('peft_type')!r})")
        return model, Control(model, kind, LoadedReft(model, adapter_dir))
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return peft, Control(peft, kind)


def greedy(model, ctl: Control, prompt, n: int):
    """Greedy decoding, step for step as tests/reference.py: the prompt forward under
    ``ctl.prompt`` gives token 1; every later token is one forward under ``ctl.response``."""
    import torch

    def step(ids, past):
        out = model(input_ids=torch.tensor([list(ids)]), past_key_values=past, use_cache=True)
        logits = out.logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        return int(logits.argmax()), float(top2[0] - top2[1]), out.past_key_values

    ctl.set_sel(None)   # batch of one, positions chosen below
    if ctl.reft is not None:
        from trainer.reft import select_positions
        ctl.set_sel(select_positions(ctl.reft.positions, torch.tensor([len(prompt)]), len(prompt)))
    with torch.no_grad():
        with ctl.prompt():
            tok, gap, past = step(prompt, None)
        toks, gaps = [tok], [gap]
        for _ in range(n - 1):
            with ctl.response():
                tok, gap, past = step([tok], past)
            toks.append(tok)
            gaps.append(gap)
    return tuple(toks), tuple(gaps)


def greedy_batch(model, ctl: Control, prompts, n: int, pad_id: int):
    """Batched greedy decoding with the same semantics as :func:`greedy` (prompt forward
    under ``ctl.prompt``, then one step per token under ``ctl.response``), left-padded
    prompts with explicit positions. Float sums differ slightly from batch-1 decoding, so
    use it for accuracy numbers, :func:`greedy` where token-exact agreement matters."""
    import torch

    from trainer.reft import select_positions

    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p))
        mask[i, P - len(p):] = 1
    lengths = mask.sum(1)
    if ctl.reft is not None:
        ctl.set_sel(select_positions(ctl.reft.positions, lengths, P))
    with torch.no_grad():
        with ctl.prompt():
            out = model(input_ids=ids, attention_mask=mask,
                        position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True,
                        logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        past, toks = out.past_key_values, [tok]
        for t in range(n - 1):
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], 1)
            with ctl.response():
                out = model(input_ids=tok.unsqueeze(1), attention_mask=mask,
                            position_ids=(lengths + t).unsqueeze(1), past_key_values=past,
                            use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            past = out.past_key_values
            toks.append(tok)
    return [tuple(int(x) for x in row) for row in torch.stack(toks, 1)]


def _as_examples(tok, examples, append_eos: bool = True):
    from trainer.data import Example, tokenize

    out = []
    for e in examples:
        if isinstance(e, Example):
            out.append(e)
        elif isinstance(e, dict):
            out.extend(tokenize(tok, [(e["prompt"], e["response"])], append_eos))
        elif isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[0], str):
            out.extend(tokenize(tok, [tuple(e)], append_eos))
        else:  # (prompt ids, response ids)
            out.append(Example(tuple(int(x) for x in e[0]), tuple(int(x) for x in e[1])))
    return out


def evaluate(model_dir: str, adapter_dir: str | None, kind: str | None, examples, *,
             max_new_tokens: int | None = None, batch_size: int = 16,
             append_eos: bool = True, batched: bool = False) -> EvalResult:
    """Greedy exact-match accuracy and eval loss of an adapter (or the base model: kind or
    adapter_dir None) on ``examples`` -- Example objects, (prompt ids, response ids) pairs,
    (prompt, response) strings or {"prompt", "response"} dicts. PreFT semantics for
    lora_p/reft_p (adapter on the prompt only, as tests/reference.py), all-token for lora.
    Each greedy output has the response's length (or ``max_new_tokens``). ``batched``:
    decode ``batch_size`` examples at a time (:func:`greedy_batch`; faster, not token-exact
    against the reference at near-ties, and no gaps)."""
    model, tok = load_base(model_dir)
    exs = _as_examples(tok, examples, append_eos)
    model, ctl = attach_adapter(model, kind, adapter_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eval_loss = _eval_loss(model, ctl, exs, pad, batch_size)
    outs, gaps, hits = [], [], 0
    if batched:
        for i in range(0, len(exs), batch_size):
            chunk = exs[i:i + batch_size]
            n = max_new_tokens or max(len(e.response) for e in chunk)
            outs += greedy_batch(model, ctl, [e.prompt for e in chunk], n, pad)
        gaps = [() for _ in exs]
    else:
        for e in exs:
            o, g = greedy(model, ctl, e.prompt, max_new_tokens or len(e.response))
            outs.append(o)
            gaps.append(g)
    for e, o in zip(exs, outs):
        hits += o[:len(e.response)] == e.response
    return EvalResult(hits / max(len(exs), 1), eval_loss, len(exs), outs, gaps,
                      [e.response for e in exs])


# ----------------------------------------------------------------------------- training
def _eval_loss(model, ctl, exs, pad, bs) -> float:
    import torch

    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(exs), bs):
            loss, k = batch_loss(model, ctl, exs[i:i + bs], pad)
            tot += float(loss)
            n += k
    return tot / max(n, 1)


def train(cfg: TrainConfig, on_step=None) -> TrainResult:
    """SFT one adapter; writes the adapter, train_log.json and loss.png to ``cfg.out``.

    ``on_step(step, loss)``, if given, is called after every optimizer step (progress bars)."""
    import torch

    from preft_client import chat_template_of
    from trainer.data import read_pairs, tokenize

    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tok = load_base(cfg.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    chat = chat_template_of(cfg.model)   # as the gateway serves chats to this model
    train_ex = tokenize(tok, read_pairs(cfg.data, chat), cfg.append_eos)
    eval_ex = tokenize(tok, read_pairs(cfg.eval_data, chat), cfg.append_eos)[:cfg.max_eval] \
        if cfg.eval_data else []
    model, params, ctl, reft = _attach_adapter(model, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warm = cfg.warmup if cfg.warmup is not None else cfg.steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_schedule(warm, cfg.steps))
    batches = _batches(train_ex, cfg.batch_size, cfg.seed)
    losses, history = [], []
    model.train()
    for step in range(cfg.steps):
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        losses.append(_optimizer_step(ctl, params, opt, sched, micro, pad, cfg, step))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if cfg.eval_every and eval_ex and (step + 1) % cfg.eval_every == 0:
            model.eval()
            history.append({"step": step + 1, "eval_loss": _eval_loss(model, ctl, eval_ex, pad, 32)})
            model.train()
        if not cfg.quiet and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            print(f"step {step + 1}/{cfg.steps} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    model.eval()
    out = _save_adapter(model, reft, cfg)
    train_s = time.time() - t0
    final = None
    if eval_ex:   # from the saved files: also checks that they round-trip
        final = evaluate(cfg.model, str(out), cfg.kind, eval_ex, batched=cfg.eval_batched,
                         batch_size=50 if cfg.eval_batched else 16).summary()
    log = {"config": asdict(cfg), "seed": cfg.seed, "kind": cfg.kind,
           "trainable_params": sum(p.numel() for p in params), "lr": cfg.learning_rate,
           "warmup": warm, "n_train": len(train_ex), "n_eval": len(eval_ex), "losses": losses,
           "eval_history": history, "eval": final, "train_seconds": round(train_s, 2),
           "torch_threads": torch.get_num_threads()}
    log_path = out / "train_log.json"
    log_path.write_text(json.dumps(log, indent=1))
    if cfg.plot:
        _plot(losses, history, out / "loss.png", f"{cfg.kind} r={cfg.rank} seed={cfg.seed}")
    return TrainResult(str(out), losses, final, str(log_path), time.time() - t0)


def _attach_adapter(model, cfg: TrainConfig):
    """(model, trainable params, Control, ReftModule or None): a fresh adapter of
    ``cfg.kind`` on the base model (ReFT-P hooks, or PEFT LoRA wrapping it)."""
    if cfg.kind == "reft_p":
        from trainer.reft import ReftModule

        layers = cfg.layers if cfg.layers is not None else tuple(range(model.config.num_hidden_layers))
        reft = ReftModule(model, cfg.intervention, layers, cfg.rank, cfg.positions, seed=cfg.seed)
        return model, list(reft.parameters()), Control(model, cfg.kind, reft), reft
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
                      target_modules=list(cfg.targets), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, Control(model, cfg.kind), None


def _lr_schedule(warm: int, steps: int):
    def lr_at(s):  # linear warmup, then linear decay to 10%
        if s < warm:
            return (s + 1) / warm
        return 1.0 - 0.9 * (s - warm) / max(steps - warm, 1)
    return lr_at


def _batches(examples: list, batch_size: int, seed: int):
    """Endless batches: each pass over the examples in a fresh seeded shuffle."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        b, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in b]


def _optimizer_step(ctl, params, opt, sched, micro: list, pad: int, cfg: TrainConfig,
                    step: int) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; the loss per response token."""
    import torch

    opt.zero_grad(set_to_none=True)
    total = sum(len(e.response) for b in micro for e in b)
    run = 0.0
    for b in micro:
        loss, _ = batch_loss(ctl.model, ctl, b, pad)
        (loss / total).backward()
        run += loss.item()
    if not math.isfinite(run):
        raise FloatingPointError(f"loss is {run} at step {step}; lower --lr")
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    sched.step()
    return run / total


def _save_adapter(model, reft, cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if reft is not None:
        reft.save(out, cfg.model)
        reft.remove()
    else:
        model.save_pretrained(str(out), safe_serialization=True)
    return out


def _plot(losses, history, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, label="train loss (response tokens)")
    if history:
        ax.plot([h["step"] for h in history], [h["eval_loss"] for h in history], "o-",
                label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("CE / token")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model directory (HF format + tokenizer)")
    p.add_argument("--data", required=True, help="training JSONL ({prompt,response} or {messages})")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--kind", choices=KINDS, default="lora_p",
                   help="lora_p / reft_p: adapter on the prompt only (PreFT); lora: all tokens")
    p.add_argument("--rank", type=int, default=8, help="LoRA r or ReFT rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2*rank)")
    p.add_argument("--targets", nargs="+", default=list(LORA_TARGETS), choices=LORA_TARGETS,
                   help="LoRA target projections (default: all seven)")
    p.add_argument("--intervention", choices=("loreft", "direft"), default="loreft",
                   help="reft_p: LoReFT h+Rᵀ(Wh+b−Rh) or DiReFT h+W₂ᵀ(W₁h+b)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="reft_p: decoder layers to intervene on (default: all)")
    p.add_argument("--positions", default="all",
                   help="reft_p: prompt positions: all | f<p> | l<s> | f<p>+l<s>")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (LoRA), 2e-3 (ReFT)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default steps/10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", default=None, help="held-out JSONL: greedy exact match + loss")
    p.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps")
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--eval-batched", action="store_true",
                   help="batched greedy eval (faster; not token-exact at near-ties)")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to responses")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is fastest on a busy box)")


def config_from_args(a) -> TrainConfig:
    return TrainConfig(
        model=a.model, data=a.data, out=a.out, kind=a.kind, rank=a.rank, alpha=a.alpha,
        targets=tuple(a.targets), intervention=a.intervention,
        layers=tuple(a.layers) if a.layers else None, positions=a.positions, steps=a.steps,
        batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr, weight_decay=a.weight_decay,
        warmup=a.warmup, seed=a.seed, eval_data=a.eval_data, eval_every=a.eval_every,
        max_eval=a.max_eval, eval_batched=a.eval_batched, append_eos=not a.no_eos, plot=not a.no_plot, quiet=a.quiet,
        threads=a.threads)


def run_args(a) -> int:
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.quiet:
        res = train(cfg)
    else:   # a progress bar instead of a line per --log-every steps
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"),
                      transient=False) as bar:
            t = bar.add_task(f"train {cfg.kind} r={cfg.rank}", total=cfg.steps, loss="-")
            res = train(replace(cfg, quiet=True),
                        on_step=lambda s, lv: bar.update(t, completed=s, loss=f"{lv:.4f}"))
    print(json.dumps({"out": res.out, "final_train_loss": res.losses[-1], "eval": res.eval,
                      "seconds": round(res.seconds, 1)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
