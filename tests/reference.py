"""Single-process PreFT reference: the semantics the cluster must reproduce token for token.

HF model + PEFT adapter over the prompt -> KV_A(prompt) and the first token (adapter on);
then the adapter disabled, greedy decoding over that same cache. Also the two contrasts the
tests use to show equality is not vacuous: all-token LoRA (adapter on at every step) and
base-only (adapter never on). float32 on CPU. Activated-LoRA adapters
(``alora_invocation_tokens``) are PEFT's own: :meth:`Reference.generate_alora` runs
``PeftModel.generate``.

ReFT-P adapters (``adapter_config.json`` says ``"peft_type": "REFT_P"``): a forward hook on
each chosen decoder layer's output replaces the residual stream h at the selected prompt
positions by Φ(h) (LoReFT: h + Rᵀ(Wh + b − Rh); DiReFT: h + W₂ᵀ(W₁h + b)) during the prompt
forward only; the hooks are then removed and greedy decoding continues over the same
past_key_values. Written from the formulas, independent of the serving code.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch


def unsharded_kv_bytes(model: str, n_tokens: int, kv_layout: str) -> int:
    """KV bytes of an ``n_tokens`` prompt over whole blocks (float32), all KV heads: what a
    transfer moves in total, whatever the engines' tensor-parallel size. ``kv_layout``:
    ``WorkerInfo.kv_layout`` (its block size)."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
    block = int(kv_layout.split("/")[2].split("x")[1])
    return per_token * -(-n_tokens // block) * block


def engine_text(tokenizer, ids) -> str:
    """A vLLM engine's text for generated ``ids``: their decoding (special tokens skipped),
    less a trailing incomplete UTF-8 character (vLLM's incremental detokenizer holds back
    text that ends in U+FFFD and never flushes it)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")


@dataclass(frozen=True)
class RefOutput:
    tokens: tuple[int, ...]
    gaps: tuple[float, ...]   # top-1 minus top-2 logit at each step

    def comparable_prefix(self, tol: float) -> int:
        """Steps that can be compared exactly: up to (excluding) the first near-tie."""
        for i, g in enumerate(self.gaps):
            if g < tol:
                return i
        return len(self.tokens)


class Reference:
    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.peft = None
        self._loaded: dict[str, str] = {}

    def _adapter(self, adapter_dir: str):
        from peft import PeftModel

        name = f"a{len(self._loaded)}" if adapter_dir not in self._loaded else self._loaded[adapter_dir]
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, adapter_dir, adapter_name=name).eval()
        elif adapter_dir not in self._loaded:
            self.peft.load_adapter(adapter_dir, adapter_name=name)
        self._loaded[adapter_dir] = name
        self.peft.set_adapter(name)
        return self.peft

    @staticmethod
    def _step(model, ids, past):
        out = model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True)
        logits = out.logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        return int(logits.argmax()), float(top2[0] - top2[1]), out.past_key_values

    def _ctx(self, adapter_on: bool):
        # PEFT injects its layers into the base modules, so "off" must disable explicitly.
        if self.peft is None or adapter_on:
            return contextlib.nullcontext()
        return self.peft.disable_adapter()

    # ---------------------------------------------------------------- ReFT-P
    @staticmethod
    def is_reft(adapter_dir: str) -> bool:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        return (str(cfg.get("peft_type", "")).upper() == "REFT_P"
                or cfg.get("preft_kind") == "reft_p")

    @staticmethod
    def reft_positions(spec: str, n: int) -> list[int]:
        """Prompt positions a ReFT spec selects: "all", "f<p>", "l<s>", "f<p>+l<s>"."""
        if spec in (None, "all"):
            return list(range(n))
        first = last = 0
        for part in spec.split("+"):
            m = re.fullmatch(r"([fl])(\d+)", part)
            assert m, spec
            if m[1] == "f":
                first = int(m[2])
            else:
                last = int(m[2])
        return [i for i in range(n) if i < first or i >= n - last]

    def _reft_hooks(self, adapter_dir: str, n_prompt: int) -> list:
        from safetensors.torch import load_file

        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        ts = {k: v.to(torch.float32) for k, v in
              load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items()}
        sel = torch.tensor(self.reft_positions(cfg.get("positions", "all"), n_prompt),
                           dtype=torch.long)
        loreft = cfg["intervention"] == "loreft"

        def make(L):
            p = f"layers.{L}."

            def hook(module, args, out):
                h = out[0] if isinstance(out, tuple) else out       # (1, n, d)
                x = h[0, sel]
                if loreft:
                    R, W, b = (ts[p + "rotate_layer.weight"], ts[p + "learned_source.weight"],
                               ts[p + "learned_source.bias"])
                    phi = x + (x @ W.T + b - x @ R.T) @ R
                else:
                    W1, b, W2 = (ts[p + "proj_down.weight"], ts[p + "proj_down.bias"],
                                 ts[p + "proj_up.weight"])
                    phi = x + (x @ W1.T + b) @ W2
                h = h.clone()
                h[0, sel] = phi
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return hook

        layers = self.base.model.layers
        return [layers[L].register_forward_hook(make(L)) for L in cfg["layers"]]

    def _generate_reft(self, prompt, adapter_dir, n, mode) -> RefOutput:
        model = self.peft if self.peft is not None else self.base
        with self._ctx(False):  # no LoRA anywhere
            handles = self._reft_hooks(adapter_dir, len(prompt)) if mode == "preft" else []
            try:
                tok, gap, past = self._step(model, prompt, None)
            finally:
                for h in handles:
                    h.remove()
            tokens, gaps = [tok], [gap]
            for _ in range(n - 1):
                tok, gap, past = self._step(model, [tok], past)
                tokens.append(tok)
                gaps.append(gap)
        return RefOutput(tuple(tokens), tuple(gaps))

    @torch.no_grad()
    def generate_alora(self, prompt: list[int], adapter_dir: str, n: int) -> RefOutput:
        """An activated-LoRA adapter as PEFT serves it: ``PeftModel.generate``, which finds
        the invocation tokens in the prompt and applies the adapter from there on (every
        generated token included); greedy, no EOS stop (``ignore_eos``)."""
        from transformers import GenerationConfig

        model = self._adapter(adapter_dir)
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=0, do_sample=False,
                               eos_token_id=None, pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True)
        out = model.generate(input_ids=torch.tensor([prompt]), generation_config=cfg)
        tokens = tuple(int(t) for t in out.sequences[0, len(prompt):])
        gaps = []
        for logits in out.logits:
            top2 = torch.topk(logits[0].float(), 2).values
            gaps.append(float(top2[0] - top2[1]))
        return RefOutput(tokens, tuple(gaps))

    @torch.no_grad()
    def generate(self, prompt: list[int], adapter_dir: str | None, n: int,
                 mode: str = "preft") -> RefOutput:
        """mode: "preft" (adapter on the prompt only), "lora" (every step), "base" (never).
        ReFT-P adapters support "preft" and "base"."""
        if adapter_dir is not None and self.is_reft(adapter_dir):
            if mode not in ("preft", "base"):
                raise ValueError(f"mode={mode!r} is not defined for ReFT-P adapters")
            return self._generate_reft(prompt, adapter_dir, n, mode)
        if adapter_dir is None:
            mode = "base"
        else:
            self._adapter(adapter_dir)
        model = self.peft if self.peft is not None else self.base
        on_prefill, on_decode = {"preft": (True, False), "lora": (True, True),
                                 "base": (False, False)}[mode]
        with self._ctx(on_prefill):
            tok, gap, past = self._step(model, prompt, None)
        tokens, gaps = [tok], [gap]
        for _ in range(n - 1):
            with self._ctx(on_decode):
                tok, gap, past = self._step(model, [tok], past)
            tokens.append(tok)
            gaps.append(gap)
        return RefOutput(tuple(tokens), tuple(gaps))


# ---------------------------------------------------------------- sampling rules, logprobs
@dataclass(frozen=True)
class Rules:
    """A single engine's greedy rules, written from vLLM's definitions: ``logit_bias`` is
    added, stop tokens are masked until ``min_tokens`` tokens exist, then the repetition
    penalty (tokens of the prompt or the output: positive logits divided, negative
    multiplied) and the frequency and presence penalties (output tokens only) apply."""

    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = ()
    min_tokens: int = 0
    stop_token_ids: tuple = ()

    def apply(self, logits: torch.Tensor, prompt: list[int], out: list[int]) -> torch.Tensor:
        logits = logits.clone()
        for tok, bias in self.logit_bias:
            logits[tok] += bias
        if len(out) < self.min_tokens:
            for tok in self.stop_token_ids:
                logits[tok] = float("-inf")
        seen = torch.tensor(sorted(set(prompt) | set(out)), dtype=torch.long)
        r = self.repetition_penalty
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / r, vals * r)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long),
                                minlength=logits.numel()).float() if out else None
        if counts is not None:
            logits -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0)
        return logits


@dataclass(frozen=True)
class Detailed(RefOutput):
    logprobs: tuple[float, ...] = ()            # each generated token's, raw logits
    top: tuple[tuple[tuple[int, float], ...], ...] = ()   # the top k of each step
    prompt_logprobs: tuple[float, ...] = ()     # prompt positions 1.., adapter on


def _logprob_items(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple]:
    lp = torch.log_softmax(logits.float(), dim=-1)
    v, i = torch.topk(lp, k)
    return lp, tuple(zip(i.tolist(), v.tolist()))


@torch.no_grad()
def detailed(ref: Reference, prompt: list[int], adapter_dir: str | None, n: int,
             rules: Rules = Rules(), k: int = 3) -> Detailed:
    """PreFT (adapter over the prompt only) with greedy ``rules`` applied at every step,
    every generated token's raw logprob and top ``k``, and the prompt's logprobs."""
    reft = adapter_dir is not None and ref.is_reft(adapter_dir)
    if adapter_dir is not None and not reft:
        ref._adapter(adapter_dir)
    model = ref.peft if ref.peft is not None else ref.base
    lora_on_prompt = adapter_dir is not None and not reft
    with ref._ctx(lora_on_prompt):
        handles = ref._reft_hooks(adapter_dir, len(prompt)) if reft else []
        try:
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        finally:
            for h in handles:
                h.remove()
    plp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    prompt_lps = tuple(plp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist())
    logits, past = out.logits[0, -1].float(), out.past_key_values
    toks, gaps, lps, tops = [], [], [], []
    for step in range(n):
        lp, top = _logprob_items(logits, k)
        adj = rules.apply(logits, prompt, toks)
        v = torch.topk(adj, 2).values
        tok = int(adj.argmax())
        toks.append(tok)
        gaps.append(float(v[0] - v[1]))
        lps.append(float(lp[tok]))
        tops.append(top)
        if step == n - 1 or tok in rules.stop_token_ids:
            break
        with ref._ctx(False):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        logits, past = out.logits[0, -1].float(), out.past_key_values
    return Detailed(tuple(toks), tuple(gaps), tuple(lps), tuple(tops), prompt_lps)
