"""A LoRA-P adapter trained by trainer/train.py is served as is, with the trainer's semantics.

Train ~30 steps on the tiny model, upload the output directory through the router
(RegisterAdapter), and check that the cluster's greedy tokens equal trainer.evaluate's greedy
tokens (adapter on the prompt, base model afterwards) token for token, up to the first
near-tie (top-2 logit gap < GAP_TOL: vLLM and HF sum floats in different orders), as in
test_exact.py. Prompts are sent as token ids, tokenized once by the trainer's tokenizer.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
N_TOKENS = 16
WORDS = ("the prefill pool reads prompt with adapter and decode writes answer quick brown "
         "fox river sea model cache tokens batch").split()


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    import torch

    from trainer.data import write_jsonl
    from trainer.train import TrainConfig, train

    rng = random.Random(5)
    pairs = [(" ".join(rng.sample(WORDS, 5)), " ".join(rng.sample(WORDS, 3))) for _ in range(8)]
    d = tmp_path_factory.mktemp("trained")
    write_jsonl(d / "train.jsonl", pairs)
    threads = torch.get_num_threads()
    try:
        res = train(TrainConfig(model=assets["model"], data=str(d / "train.jsonl"),
                                out=str(d / "adapter"), kind="lora_p", rank=8, steps=30,
                                lr=3e-3, batch_size=8, seed=0, quiet=True, plot=False, threads=1))
    finally:
        torch.set_num_threads(threads)
    assert res.losses[-1] < res.losses[0]
    return {"dir": res.out, "pairs": pairs}


def test_trained_lora_p_served_equals_trainer_eval(cluster, client, assets, trained):
    from transformers import AutoTokenizer

    from trainer.train import evaluate

    info = client.register_adapter("trained-lora-p", trained["dir"], public=True)
    assert info.name == "trained-lora-p"
    tok = AutoTokenizer.from_pretrained(assets["model"])
    prompts = [tok(p)["input_ids"] for p, _ in trained["pairs"][:3]]
    prompts.append(tok("the decode pool writes the answer")["input_ids"])  # not a training prompt
    ev = evaluate(assets["model"], trained["dir"], "lora_p", [(p, [0] * N_TOKENS) for p in prompts],
                  max_new_tokens=N_TOKENS)
    base = evaluate(assets["model"], None, None, [(p, [0] * N_TOKENS) for p in prompts],
                    max_new_tokens=N_TOKENS)
    compared = cut = 0
    for p, want, gaps, base_out in zip(prompts, ev.outputs, ev.gaps, base.outputs):
        c = client.generate("trained-lora-p", prompt_token_ids=p, max_tokens=N_TOKENS,
                            temperature=0.0, ignore_eos=True)
        assert len(c.token_ids) == N_TOKENS
        k = next((i for i, g in enumerate(gaps) if g < GAP_TOL), N_TOKENS)
        assert tuple(c.token_ids[:k]) == want[:k], (
            f"cluster {tuple(c.token_ids[:k])} vs trainer {want[:k]}")
        compared += k
        cut += N_TOKENS - k
        assert want != base_out   # the trained adapter changes the output: not vacuous
    print(f"\n{len(prompts)} prompts, {compared} steps compared, {cut} cut at near-ties")
    assert cut <= N_TOKENS   # at most one sequence's worth of steps lost to near-ties
