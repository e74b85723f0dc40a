"""Single-process PreFT reference: the semantics the cluster must reproduce token for token.

HF model + PEFT adapter over the prompt -> KV_A(prompt) and the first token (adapter on);
then the adapter disabled, greedy decoding over that same cache. Also the two contrasts the
tests use to show equality is not vacuous: all-token LoRA (adapter on at every step) and
base-only (adapter never on). float32 on CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


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

    @torch.no_grad()
    def generate(self, prompt: list[int], adapter_dir: str | None, n: int,
                 mode: str = "preft") -> RefOutput:
        """mode: "preft" (adapter on the prompt only), "lora" (every step), "base" (never)."""
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
