"""Grouped multi-adapter LoRA (lora_kernel.grouped_lora): wrapper math and a real engine."""

from __future__ import annotations

import random

import pytest
import torch

import vllm
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.platforms.cpu import CpuPlatform

from lora_kernel import grouped_lora as gl
from lora_kernel.grouped_lora import GroupedPunicaWrapperCPU

STOCK = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"

# Packed projections of a Llama/Qwen-style layer, as vLLM's LoRA layers see them:
# name -> (input size, output slices).  qkv: q/k/v of different sizes (GQA), gate_up: 2 slices.
PROJECTIONS = {
    "qkv_proj": (64, (64, 16, 16)),
    "o_proj": (64, (64,)),
    "gate_up_proj": (64, (96, 96)),
    "down_proj": (96, (64,)),
}
MAX_RANK = 16
N_SLOTS = 5


@pytest.fixture(autouse=True)
def _restore_patch():
    yield
    gl.uninstall_grouped_lora()


def _layout(rng: random.Random, n_req: int) -> list[tuple[int, int]]:
    """(num tokens, slot) per request: empty requests, single tokens, no-adapter (-1)."""
    out = []
    for _ in range(n_req):
        length = rng.choice([0, 1, 1, 2, 3, 7, 16, 33])
        slot = rng.choice([-1, -1] + list(range(N_SLOTS)))
        out.append((length, slot))
    return out


def _wrapper(cls, layout: list[tuple[int, int]], ids: list[int | None]):
    """A punica wrapper with metadata for ``layout``; slot ``s`` holds adapter id ``ids[s]``."""
    token_ids = [ids[slot] if slot >= 0 else 0 for n, slot in layout for _ in range(n)]
    prompt_ids = [ids[slot] if slot >= 0 else 0 for n, slot in layout if n > 0]
    w = cls(max_num_batched_tokens=max(len(token_ids), 1), max_batches=len(layout) + 1,
            device="cpu")
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(prompt_ids), is_prefill=True),
                      list(ids), N_SLOTS, vocab_size=32)
    return w


def _stacked(in_size: int, slices: tuple[int, ...], ranks: list[int], dtype, gen):
    """vLLM-layout stacked weights: A [slots,1,max_rank,in], B [slots,1,out,max_rank], zero-padded."""
    a_st, b_st = [], []
    for n_out in slices:
        a = torch.zeros(N_SLOTS, 1, MAX_RANK, in_size)
        b = torch.zeros(N_SLOTS, 1, n_out, MAX_RANK)
        for s, r in enumerate(ranks):
            a[s, 0, :r] = torch.randn(r, in_size, generator=gen) / in_size ** 0.5
            b[s, 0, :, :r] = torch.randn(n_out, r, generator=gen)
        a_st.append(a.to(dtype))
        b_st.append(b.to(dtype))
    return tuple(a_st), tuple(b_st)


def _reference(y, x, layout, a_st, b_st, slices, scale):
    """Plain per-request x . A^T . B^T . scale in float64."""
    y = y.double().clone()
    row = 0
    for n, slot in layout:
        if slot >= 0 and n:
            off = 0
            for a, b, n_out in zip(a_st, b_st, slices):
                xs = x[row:row + n].double()
                y[row:row + n, off:off + n_out] += (
                    (xs @ a[slot, 0].double().T) * scale) @ b[slot, 0].double().T
                off += n_out
        row += n
    return y


TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj", sorted(PROJECTIONS))
@pytest.mark.parametrize("seed", range(4))
def test_add_lora_linear_matches_per_request_reference(dtype, proj, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    in_size, slices = PROJECTIONS[proj]
    layout = _layout(rng, rng.randint(1, 12))
    if seed == 0:  # all requests without adapter: must be an exact no-op
        layout = [(n, -1) for n, _ in layout]
    ranks = [rng.choice([1, 4, 8, MAX_RANK]) for _ in range(N_SLOTS)]
    a_st, b_st = _stacked(in_size, slices, ranks, dtype, gen)
    n_tok = sum(n for n, _ in layout)
    x = torch.randn(n_tok, in_size, generator=gen).to(dtype)
    y0 = torch.randn(n_tok, sum(slices), generator=gen).to(dtype)
    scale = 0.5 if seed % 2 else 1.0
    ref = _reference(y0, x, layout, a_st, b_st, slices, scale)

    w = _wrapper(GroupedPunicaWrapperCPU, layout, [11, 12, 13, 14, 15])
    y = y0.clone()
    w.add_lora_linear(y, x, a_st, b_st, scale, slices)
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    if all(slot < 0 for _, slot in layout):
        assert torch.equal(y, y0)

    # The split path the row/column-parallel layers use: shrink into an fp32 buffer, expand.
    for as_tensor in (False, True):
        buf = torch.zeros(len(slices), n_tok, MAX_RANK, dtype=torch.float32)
        y2 = y0.clone()
        w.add_shrink(buf if as_tensor else tuple(buf.unbind(0)), x, a_st, scale)
        w.add_expand(y2, buf, b_st, slices, offset_start=0, add_inputs=True)
        torch.testing.assert_close(y2.double(), ref, **TOL[dtype])


def test_expand_with_offset_start_and_overwrite():
    layout = [(3, 0), (2, -1), (4, 1)]
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(2, 1, 8, 4, generator=gen)
    h = torch.randn(9, 4, generator=gen)
    w = _wrapper(GroupedPunicaWrapperCPU, layout, [7, 8])
    y = torch.ones(9, 20)
    w.add_expand(y, (h,), (b,), (8,), offset_start=5, add_inputs=False)
    exp = torch.ones(9, 20)
    exp[0:3, 5:13] = h[0:3] @ b[0, 0].T
    exp[5:9, 5:13] = h[5:9] @ b[1, 0].T
    torch.testing.assert_close(y, exp)  # -1 rows and other columns untouched


def test_segments_merge_adjacent_requests_and_drop_no_adapter():
    idx = torch.tensor([-1, -1, 2, 2, 2, 0, 0, -1, 2, 3])
    assert gl.lora_segments(idx) == [(2, 5, 2), (5, 7, 0), (8, 9, 2), (9, 10, 3)]
    assert gl.lora_segments(torch.tensor([], dtype=torch.long)) == []
    w = _wrapper(GroupedPunicaWrapperCPU, [(2, 1), (0, 0), (3, 1), (1, 0)], [5, 6])
    assert w.token_segments == [(0, 5, 1), (5, 6, 0)]
    assert w.sampler_segments == [(0, 2, 1), (2, 3, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_and_embedding(dtype):
    gen = torch.Generator().manual_seed(3)
    layout = [(4, 1), (1, -1), (2, 2), (3, 1)]
    w = _wrapper(GroupedPunicaWrapperCPU, layout, [21, 22, 23, None, None])
    ranks = [8, 4, MAX_RANK, 0, 0]
    # logits: one row per sampled request (prompt mapping), vocab 50
    a_st, b_st = _stacked(32, (50,), ranks, dtype, gen)
    hs = torch.randn(4, 32, generator=gen).to(dtype)
    logits = torch.randn(4, 50, generator=gen).to(dtype)
    req_layout = [(1, slot) for n, slot in layout if n]
    ref = _reference(logits, hs, req_layout, a_st, b_st, (50,), 1.0)
    w.add_lora_logits(logits, hs, a_st[0], b_st[0], 1.0)
    torch.testing.assert_close(logits.double(), ref, **TOL[dtype])
    # embedding: y += x @ B^T per token run
    n_tok = sum(n for n, _ in layout)
    xe = torch.randn(n_tok, MAX_RANK, generator=gen).to(dtype)
    ye = torch.randn(n_tok, 50, generator=gen).to(dtype)
    exp = ye.double().clone()
    row = 0
    for n, slot in layout:
        if slot >= 0:
            exp[row:row + n] += xe[row:row + n].double() @ b_st[0][slot, 0].double().T
        row += n
    w.add_lora_embedding(ye, xe, b_st[0], add_inputs=True)
    torch.testing.assert_close(ye.double(), exp, **TOL[dtype])


def test_agrees_with_stock_wrapper_when_last_slot_is_free():
    """Stock torch ops index weights with -1 (= last slot); with it empty they are correct."""
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    in_size, slices = PROJECTIONS["qkv_proj"]
    layout = _layout(rng, 10)
    ranks = [8, 8, 8, 8, 0]
    layout = [(n, min(slot, N_SLOTS - 2)) for n, slot in layout]
    ids = [1, 2, 3, 4, None]
    a_st, b_st = _stacked(in_size, slices, ranks, torch.float32, gen)
    n_tok = sum(n for n, _ in layout)
    x = torch.randn(n_tok, in_size, generator=gen)
    y0 = torch.randn(n_tok, sum(slices), generator=gen)
    outs = []
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        y = y0.clone()
        _wrapper(cls, layout, ids).add_lora_linear(y, x, a_st, b_st, 1.0, slices)
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_install_is_idempotent_and_uninstall_restores():
    assert CpuPlatform.get_punica_wrapper() == STOCK
    gl.install_grouped_lora()
    gl.install_grouped_lora()
    assert gl.is_grouped_lora_installed()
    assert CpuPlatform.get_punica_wrapper() == "lora_kernel.grouped_lora.GroupedPunicaWrapperCPU"
    from vllm.lora.punica_wrapper import get_punica_wrapper
    assert isinstance(get_punica_wrapper(16, max_batches=4, device="cpu"),
                      GroupedPunicaWrapperCPU)
    gl.uninstall_grouped_lora()
    gl.uninstall_grouped_lora()
    assert CpuPlatform.get_punica_wrapper() == STOCK
    assert type(get_punica_wrapper(16, max_batches=4, device="cpu")) is PunicaWrapperCPU


def test_install_refuses_other_vllm_version(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match=r"0\.32\.0.*0\.33\.0"):
        gl.install_grouped_lora()
    assert CpuPlatform.get_punica_wrapper() == STOCK


def test_install_refuses_changed_signature(monkeypatch):
    def add_lora_linear(self, y, x, lora_a, lora_b, scale, output_slices, **kw):
        pass
    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", add_lora_linear)
    with pytest.raises(RuntimeError, match="add_lora_linear"):
        gl.install_grouped_lora()
    assert not gl.is_grouped_lora_installed()


# ------------------------------------------------------------------ real engine
PROMPTS = ["The prefill pool reads the prompt", "Hello world! How are",
           "Numbers like 0 1 2 3", "The scheduler batches requests"]
N_NEW = 6


def _hf_greedy(model_dir, adapter_dir, prompt_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = list(ids)
            for _ in range(N_NEW):
                logits = model(torch.tensor([seq])).logits[0, -1]
                seq.append(int(logits.argmax()))
            outs.append(seq[len(ids):])
    return outs


def test_engine_greedy_matches_hf_peft(tmp_path, monkeypatch):
    """Tiny Llama + 2 adapters in a real vLLM engine with the grouped path: mixed batch
    (adapter A, adapter B, no adapter) decodes token-for-token like HF+PEFT."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from app.tiny import make_lora_adapter, make_tiny_model
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model_dir = str(make_tiny_model(tmp_path / "tiny"))
    adapters = [str(make_lora_adapter(tmp_path / f"lora{k}", model_dir, seed=k, rank=8))
                for k in (1, 2)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]

    gl.install_grouped_lora()
    # max_loras=2 with 2 adapters: every slot is occupied, so a no-adapter request in the
    # same batch would pick up the last slot on the stock torch-ops path.
    llm = LLM(model=model_dir, enforce_eager=True, distributed_executor_backend="uni",
              dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8,
              max_model_len=256, max_num_seqs=16, enable_prefix_caching=False, seed=0)
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    wrappers = list(runner.lora_manager._adapter_manager.punica_wrapper_mapping.values())
    assert wrappers and all(isinstance(w, GroupedPunicaWrapperCPU) for w in wrappers)

    lora_reqs = [LoRARequest("a", 1, adapters[0]), LoRARequest("b", 2, adapters[1]), None]
    batch, reqs, which = [], [], []
    for i, ids in enumerate(prompt_ids):
        for j, lr in enumerate(lora_reqs):
            batch.append({"prompt_token_ids": ids})
            reqs.append(lr)
            which.append((i, j))
    sp = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(batch, sp, lora_request=reqs,
                                                              use_tqdm=False)]
    ref = {j: _hf_greedy(model_dir, adapters[j] if j < 2 else None, prompt_ids)
           for j in range(3)}
    mismatches = [(i, j, got[k], ref[j][i]) for k, (i, j) in enumerate(which)
                  if got[k] != ref[j][i]]
    assert not mismatches, mismatches
    # the adapters really change the output
    assert any(ref[0][i] != ref[2][i] for i in range(len(PROMPTS)))
    assert any(ref[1][i] != ref[2][i] for i in range(len(PROMPTS)))
