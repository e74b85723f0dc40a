"""Trainer (trainer/train.py): the loss falls, adapters load where the cluster loads them,
and the trained adapter's PreFT semantics are the reference's (tests/reference.py).

Runs on the tiny random model (app/tiny.py); a few dozen steps each, no engine.
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("peft")

WORDS = ("the prefill pool reads prompt with adapter and decode writes answer quick brown "
         "fox river sea model cache tokens batch").split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine more threads are much slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from app.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from trainer.data import write_jsonl

    rng = random.Random(1)
    pairs = [(" ".join(rng.sample(WORDS, 4)), " ".join(rng.sample(WORDS, 2))) for _ in range(8)]
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", pairs)
    # the chat form of the same kind of data, to exercise the template
    with open(d / "chat.jsonl", "w") as f:
        for p, r in pairs[:4]:
            f.write(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": p},
                                             {"role": "assistant", "content": r}]}) + "\n")
    return {"pairs": pairs, "train": str(d / "train.jsonl"), "chat": str(d / "chat.jsonl")}


def _base_shape(model_dir):
    from prefill_worker.adapters.base import BaseModelShape
    from transformers import AutoConfig

    return BaseModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))


@pytest.mark.parametrize("kind,extra", [
    ("lora_p", {"lr": 3e-3}),
    ("reft_p", {"lr": 1e-2, "layers": (1, 3), "positions": "f2+l2"}),
    ("reft_p", {"lr": 1e-2, "layers": (0, 2), "intervention": "direft"}),
])
def test_loss_falls_and_adapter_validates(kind, extra, tiny, data, tmp_path):
    from prefill_worker.adapters.base import KINDS
    from trainer.train import TrainConfig, train

    cfg = TrainConfig(model=tiny, data=data["train"], out=str(tmp_path / kind), kind=kind,
                      rank=4, steps=30, batch_size=8, seed=0, quiet=True, **extra)
    res = train(cfg)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < 0.7 * first, (kind, first, last)
    log = json.loads((tmp_path / kind / "train_log.json").read_text())
    assert log["seed"] == 0 and len(log["losses"]) == 30 and log["config"]["kind"] == kind
    assert (tmp_path / kind / "loss.png").stat().st_size > 0
    # the serving side's validator accepts the directory as is
    spec = KINDS[kind](tmp_path / kind, _base_shape(tiny), 64, 1 << 30)
    assert spec.kind == kind and spec.rank == 4


def test_deterministic_given_seed(tiny, data, tmp_path):
    from trainer.train import TrainConfig, train

    runs = [train(TrainConfig(model=tiny, data=data["chat"], out=str(tmp_path / f"r{i}"),
                              kind="lora_p", rank=2, steps=4, batch_size=2, seed=5, quiet=True,
                              plot=False)).losses for i in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kind,mode", [("lora_p", "preft"), ("reft_p", "preft"), ("lora", "lora")])
def test_evaluate_equals_reference(kind, mode, tiny, data, tmp_path):
    """The trained adapter's greedy output under trainer.evaluate is the reference's: for
    PreFT kinds the adapter is on for the prompt (first token) and off afterwards."""
    from reference import Reference
    from transformers import AutoTokenizer

    from trainer.train import TrainConfig, evaluate, train

    extra = {"layers": (1, 3), "lr": 1e-2} if kind == "reft_p" else {"lr": 3e-3}
    out = tmp_path / kind
    train(TrainConfig(model=tiny, data=data["train"], out=str(out), kind=kind, rank=4,
                      steps=12, batch_size=8, seed=1, quiet=True, plot=False, **extra))
    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = [tok(p)["input_ids"] for p, _ in data["pairs"][:4]]
    n = 12
    ev = evaluate(tiny, str(out), kind, [(p, [0] * n) for p in prompts])
    ref = Reference(tiny)
    differs_from_lora = 0
    for p, got in zip(prompts, ev.outputs):
        want = ref.generate(p, str(out), n, mode=mode)
        k = want.comparable_prefix(1e-4)
        assert got[:k] == want.tokens[:k]
        if kind == "lora_p":
            differs_from_lora += got != ref.generate(p, str(out), n, mode="lora").tokens
    if kind == "lora_p":   # not vacuous: PreFT decoding is not all-token LoRA decoding
        assert differs_from_lora >= 1


def test_preft_response_runs_through_base_weights(tiny, data, tmp_path):
    """lora_p's training loss equals a hand-computed loss with the adapter off at response
    positions (and differs from the all-token loss)."""
    import torch
    import torch.nn.functional as F

    from trainer.data import Example
    from trainer.train import Control, attach_adapter, batch_loss, load_base, train, TrainConfig

    out = tmp_path / "a"
    train(TrainConfig(model=tiny, data=data["train"], out=str(out), kind="lora_p", rank=4,
                      steps=8, lr=3e-3, batch_size=8, seed=0, quiet=True, plot=False))
    model, tok = load_base(tiny)
    peft, ctl = attach_adapter(model, "lora_p", str(out))
    ex = Example(tuple(tok("the quick brown fox")["input_ids"]),
                 tuple(tok(" river sea model")["input_ids"]))
    with torch.no_grad():
        got, n = batch_loss(peft, ctl, [ex], 0)
        a = peft(input_ids=torch.tensor([ex.prompt]), use_cache=True)
        with peft.disable_adapter():
            b = peft(input_ids=torch.tensor([ex.response[:-1]]), past_key_values=a.past_key_values,
                     use_cache=True)
        logits = torch.cat([a.logits[:, -1:], b.logits], 1)[0]
        want = F.cross_entropy(logits, torch.tensor(ex.response), reduction="sum")
        lora_loss, _ = batch_loss(peft, Control(peft, "lora"), [ex], 0)
    assert n == len(ex.response)
    assert abs(float(got) - float(want)) < 1e-3 * max(1.0, abs(float(want)))
    assert abs(float(got) - float(lora_loss)) > 1e-3


def test_chat_template_and_errors(tmp_path):
    from trainer.data import chat_to_pair, read_pairs
    from trainer.train import TrainConfig

    p, r = chat_to_pair([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert (p, r) == ("<|user|>\nhi\n<|assistant|>\n", "yo")   # preft_client.chat's default
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_pairs(bad)
    with pytest.raises(ValueError, match="TrainConfig.kind"):
        TrainConfig(model="m", data="d", out="o", kind="prefix")


def test_cli_help_and_preft_subcommand():
    import argparse

    from trainer.cli import add_train_parser

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    add_train_parser(sub)
    args = p.parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--kind", "reft_p",
                         "--layers", "1", "3", "--positions", "f2+l2"])
    assert args.kind == "reft_p" and args.layers == [1, 3] and callable(args.fn)


def test_user_task_data_honours_exclusions():
    """Eval prompts never leak into training data; excluded prompts are never generated."""
    from trainer.quality import task_data, user_pairs

    first = user_pairs("cipher", 5, seed=7)
    again = user_pairs("cipher", 50, seed=7, exclude={first[0][0], first[3][0]})
    prompts = [p for p, _ in again]
    assert first[0][0] not in prompts and first[3][0] not in prompts   # same seed: would recur
    assert first[1][0] in prompts and len(set(prompts)) == 50
    tr, ev = task_data("reverse", 300, 100, exclude=("bad cafe head>",))
    assert not {p for p, _ in tr} & ({p for p, _ in ev} | {"bad cafe head>"})
    assert all(p.endswith(">") for p, _ in tr + ev)


def test_demo_vocabulary_grows_after_training_without_changing_the_model(tmp_path):
    """The demo's tokenizer (vocab="bytes") keeps the study's ids for the characters it trains
    on; the other tokens are added after training, read as <pad> and scored as <bos>, so the
    trained model's logits over its own characters are unchanged and no new token outscores
    them (a grammar may still pick one)."""
    import torch

    from trainer.quality import (CHARS, SPECIALS, _extend_vocab, _new_base_model,
                                 build_char_tokenizer)

    chars, full = build_char_tokenizer(tmp_path / "c"), build_char_tokenizer(tmp_path / "b", "bytes")
    assert [full.convert_ids_to_tokens(i) for i in range(len(chars))] == SPECIALS + list(CHARS)
    assert full("{\"a\": 1}\n")["input_ids"] and full.decode(full("é{}")["input_ids"]) == "é{}"
    torch.manual_seed(0)
    model = _new_base_model(len(chars), 32, 1, 64).eval()
    ids = torch.tensor([chars("bad cafe>")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _extend_vocab(model, len(full), full.bos_token_id)
        after = model(input_ids=ids).logits
    assert model.config.vocab_size == len(full) == after.shape[-1]
    # (a wider head may change the matmul's blocking: equal to float rounding, not bitwise)
    torch.testing.assert_close(after[..., :len(chars)], before, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        after[..., len(chars):],
        before[..., full.bos_token_id:full.bos_token_id + 1].expand_as(after[..., len(chars):]),
        rtol=0, atol=1e-5)
