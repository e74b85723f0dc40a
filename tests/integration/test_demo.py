"""The embedded demo (trainer/demo.py, `preft demo`): trained adapters visibly change the output.

Builds the demo exactly as a newcomer's first `preft demo` does (base model trained from
scratch, then alice/bob/carol trained with trainer.train: ~3-4 CPU minutes), serves it on its
own cluster and checks, through the real router:

* the base model copies untagged prompts; each adapter says what it was trained to say (every
  demo prompt, and most held-out prompts), and never what the base model says;
* the served tokens equal the single-process reference (tests/reference.py: adapter on the
  prompt forward only, base model afterwards) up to the first near-tie -- for a LoRA-P, a
  LoReFT-P and a DiReFT-P adapter trained here, not random weights;
* `preft demo` itself prints a ✓ for every row (run in-process on the same assets).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

GAP_TOL = 1e-3
HELD_OUT = 12   # held-out prompts per adapter sent through the cluster


@pytest.fixture(scope="module")
def demo(demo_home):
    """The session's demo build (tests/conftest.py: ``demo_home``, in ``$PREFT_HOME``)."""
    return demo_home._asdict()


@pytest.fixture(scope="module")
def dcluster(demo, tmp_path_factory):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)
    from app.launcher import LocalCluster

    eng = EngineConfig(model=demo["model"], max_model_len=512)
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng, max_lora_rank=16),
                        decode=DecodeConfig(engine=eng), router=RouterConfig(port=0),
                        adapters=tuple(demo["adapters"].items()),
                        run_dir=str(tmp_path_factory.mktemp("demo-run")), name="demotest")
    c = LocalCluster(cfg).start_in_thread()
    yield c
    c.stop()


def _held_out(demo, name: str) -> list[str]:
    path = demo["home"] / "demo" / "data" / name / "eval.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()][:HELD_OUT]


def test_build_record_and_reuse(demo):
    from trainer.demo import DEMO, DEMO_PROMPTS, build

    if demo["ticks"]:   # built in this session (not found already built in $PREFT_HOME)
        w, done, total = demo["ticks"][-1]
        assert done == total == 2000 + sum(a.steps for a in DEMO)   # the bar reaches its end
        assert {w for w, _, _ in demo["ticks"]} >= {"base model",
                                                    *(f"{a.name}: {a.label}" for a in DEMO)}
    for a in DEMO:
        r = demo["rec"]["adapters"][a.name]
        assert r["eval_exact_match"] >= 0.85, (a.name, r)   # held-out, as served (PreFT)
        train = (demo["home"] / "demo" / "data" / a.name / "train.jsonl").read_text()
        assert not any(json.dumps(p) in train for p in DEMO_PROMPTS)   # demo prompts are unseen
    marker = demo["home"] / "demo" / "demo.json"
    before = marker.stat().st_mtime_ns
    _, _, rec = build(demo["home"], progress=lambda *a: pytest.fail("rebuilt an unchanged demo"))
    assert rec == demo["rec"] and marker.stat().st_mtime_ns == before


def test_each_adapter_says_what_it_was_trained_to(dcluster, demo):
    from preft_client import PreftClient
    from trainer.demo import DEMO, DEMO_PROMPTS, expected

    with PreftClient(dcluster.address, timeout=120) as client:
        def say(adapter, prompt):
            c = client.generate(adapter, prompt=prompt, max_tokens=48, temperature=0.0)
            assert c.finish_reason == "stop", (adapter, prompt, c.text)   # ended at EOS
            return c.text

        base = {p: say(None, p) for p in DEMO_PROMPTS}
        assert all(base[p] == expected("", p) for p in DEMO_PROMPTS), base
        for a in DEMO:
            held = _held_out(demo, a.name)
            base.update({p: say(None, p) for p in held})
            outs = {p: say(a.name, p) for p in (*DEMO_PROMPTS, *held)}
            wrong = {p: o for p, o in outs.items() if p in DEMO_PROMPTS and o != expected(a.task, p)}
            assert not wrong, f"{a.name} ({a.task}) on the demo prompts: {wrong}"
            hits = sum(outs[p] == expected(a.task, p) for p in held)
            assert hits >= 0.75 * len(held), f"{a.name}: {hits}/{len(held)} held-out exact"
            same = [p for p, o in outs.items() if o == base[p]]
            assert not same, f"{a.name} says what the base model says on {same}"
        copies = sum(base[p] == expected("", p) for p in base)
        assert copies >= 0.9 * len(base), f"base copies {copies}/{len(base)}"


def test_demo_adapters_token_exact_vs_reference(dcluster, demo):
    from transformers import AutoTokenizer

    from preft_client import PreftClient
    from reference import Reference
    from trainer.demo import DEMO, DEMO_PROMPTS

    n = 24
    tok = AutoTokenizer.from_pretrained(demo["model"])
    ref = Reference(demo["model"])
    compared = cut = 0
    with PreftClient(dcluster.address, timeout=120) as client:
        for a in DEMO:
            for prompt in (*DEMO_PROMPTS, *_held_out(demo, a.name)[:3]):
                ids = tok(prompt)["input_ids"]
                c = client.generate(a.name, prompt_token_ids=ids, max_tokens=n,
                                    temperature=0.0, ignore_eos=True)
                r = ref.generate(ids, demo["adapters"][a.name], n, mode="preft")
                k = r.comparable_prefix(GAP_TOL)
                assert tuple(c.token_ids[:k]) == r.tokens[:k], (
                    f"{a.name} on {prompt!r}: cluster {c.token_ids[:k]} vs reference {r.tokens[:k]}")
                compared += k
                cut += n - k
    print(f"\n{compared} steps compared, {cut} cut at near-ties")
    assert cut <= 2 * n   # trained adapters are decisive: near-ties are rare


def test_preft_demo_command(demo, tmp_path, monkeypatch, capsys):
    import app.assets as assets
    import app.cli as cli

    monkeypatch.setattr(assets, "DEFAULT_HOME", demo["home"])
    rc = cli.main(["demo", "--name", "democmd", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 0
    rows = 3 * (1 + len(demo["adapters"]))
    assert "✗" not in err and err.count("✓") == rows + 2, err   # + column header, footer
    for name, a in demo["rec"]["adapters"].items():
        assert a["label"] in err


# ------------------------------------------------------------------ a new user's first hour
# Structured output and chat on the embedded demo model, the only model a new user has: its
# tokenizer used to have a bare Fuse decoder, which vLLM's structured-output backend
# (llguidance) cannot read ("can't determine decoder type"), and a vocabulary without the chat
# template's characters (chat returned empty text).
README_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
BOUNDED = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                  "maximum": 99}},
           "required": ["a"], "additionalProperties": False}


@pytest.fixture(scope="module")
def dhttp(dcluster):
    """The demo cluster's OpenAI gateway, in the router's process (`preft up --http-port`)."""
    gw = dcluster.start_http(timeout=120)
    yield gw
    gw.stop()


def _json_prefix_ok(text: str, finish: str) -> bool:
    """A whole JSON object, or (cut off by max_tokens) the start of one."""
    if finish == "stop":
        return isinstance(json.loads(text), dict)
    return text.startswith("{")


def test_readme_structured_output_on_the_demo_model(dcluster):
    from preft_client import PreftClient

    with PreftClient(dcluster.address, timeout=120) as client:
        # the README's SDK snippet, as written
        c = client.generate("alice", prompt="Hi", max_tokens=32, n=4, temperature=0.8, seed=1,
                            logprobs=2, prompt_logprobs=1, presence_penalty=0.5,
                            json_schema=README_SCHEMA)
        assert len(c.samples) == 4
        assert all(_json_prefix_ok(s.text, s.finish_reason) for s in c.samples), c.samples
        for adapter in (None, "bob", "carol"):
            g = client.generate(adapter, prompt="bad cafe head>", max_tokens=16,
                                temperature=0.0, json_schema=BOUNDED)
            assert g.finish_reason == "stop", (adapter, g.text)
            assert 0 <= json.loads(g.text)["a"] <= 99, (adapter, g.text)
        pick = client.generate("bob", prompt="bad cafe head>", max_tokens=8, temperature=0.0,
                               choice=["yes", "no"])
        assert pick.text in ("yes", "no")


def test_cli_json_schema_example_on_the_demo_model(dcluster, tmp_path, capsys):
    import app.cli as cli

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(BOUNDED))
    rc = cli.main(["generate", "--address", dcluster.address, "--adapter", "carol", "--n", "4",
                   "--temperature", "1", "--logprobs", "2", "--max-tokens", "16",
                   "--json-schema", str(schema), "Describe it as JSON"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.count('{"a":') >= 4, out.out


def test_http_response_format_and_chat_on_the_demo_model(dhttp, dcluster):
    import httpx

    from preft_client import PreftClient
    from trainer.demo import DEMO_PROMPTS

    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": BOUNDED}}
    with httpx.Client(base_url=dhttp.base_url, timeout=120) as h:
        r = h.post("/v1/chat/completions", json={
            "model": "bob", "messages": [{"role": "user", "content": "bad cafe head"}],
            "max_tokens": 16, "temperature": 0, "response_format": fmt})
        assert r.status_code == 200, r.text
        assert 0 <= json.loads(r.json()["choices"][0]["message"]["content"])["a"] <= 99
        said = {}
        for model in ("base", "bob"):
            r = h.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 32, "temperature": 0,
                "messages": [{"role": "system", "content": "be terse"},
                             {"role": "user", "content": "bad cafe head"}]})
            assert r.status_code == 200, r.text
            said[model] = r.json()["choices"][0]["message"]["content"]
    # the demo's own chat template: the last user message and ">", the prompt it knows
    assert said == {"base": "bad cafe head", "bob": "BAD CAFE HEAD"}, said
    with PreftClient(dcluster.address, timeout=120) as client:
        sdk = client.generate("bob", prompt=DEMO_PROMPTS[0], max_tokens=32, temperature=0.0)
    assert sdk.text == said["bob"]
