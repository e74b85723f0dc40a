"""The OpenAI-compatible HTTP gateway (http_gateway/).

Against the real cluster: the official ``openai`` package (completions and chat, plain and
streamed, usage), greedy output equal to the gRPC client's, /v1/models, /health, and bad
input answered 4xx with the field named. Against a small fake gRPC router (no engines):
the Authorization header forwarded as gRPC metadata, every status code mapping, and an
error in the middle of a stream.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import grpc
import httpx
import openai
import pytest

from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc
from http_gateway import HttpGatewayThread, format_chat

ADAPTERS = ("ada", "bea", "cid", "dov")
integration = pytest.mark.integration


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def oai(gateway):
    with openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0,
                       timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.base_url, timeout=120) as c:
        yield c


# --------------------------------------------------------------------------- real cluster

@integration
def test_completion_openai_package(oai):
    r = oai.completions.create(model="ada", prompt="Hello world", max_tokens=5, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "ada"
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str) and r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


@integration
def test_greedy_token_id_prompt_equals_grpc_client(oai, client):
    ids = [5, 17, 42, 99, 7, 250, 31]
    for model, adapter in (("bea", "bea"), ("base", None)):
        ref = client.generate(adapter, prompt_token_ids=ids, max_tokens=8, temperature=0.0,
                              ignore_eos=True)
        r = oai.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref.text
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
        chunks = list(oai.completions.create(model=model, prompt=ids, max_tokens=8,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text


@integration
def test_completion_stream_with_usage(oai):
    chunks = list(oai.completions.create(model="cid", prompt=["Operators watch throughput"],
                                         max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) >= 2 and all(c.object == "text_completion" for c in chunks)
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    assert len({c.id for c in chunks}) == 1


@integration
def test_chat_plain_and_streamed_follow_the_template(oai, client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    prompt = "<|system|>\nYou are terse.\n<|user|>\nName a colour.\n<|assistant|>\n"
    from http_gateway import ChatMessage
    assert format_chat([ChatMessage(**m) for m in messages]) == prompt
    ref = client.generate("dov", prompt=prompt, max_tokens=6, temperature=0.0, ignore_eos=True)

    r = oai.chat.completions.create(model="dov", messages=messages, max_tokens=6,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == ref.usage.prompt_tokens

    chunks = list(oai.chat.completions.create(
        model="dov", messages=messages, max_completion_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


@integration
def test_models_and_health(oai, http):
    ids = [m.id for m in oai.models.list()]
    assert set(ADAPTERS) <= set(ids) and "base" in ids
    assert all(m.owned_by == "preft" and m.object == "model" for m in oai.models.list())
    assert oai.models.retrieve("ada").id == "ada"
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert all(cards[a]["preft_kind"] in ("lora_p", "reft_p", "lora") for a in ADAPTERS)
    assert "preft_kind" not in cards["base"]
    assert http.get("/v1/models/ada").json()["preft_kind"] == cards["ada"]["preft_kind"]
    h = http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


@integration
def test_unknown_model_is_404_with_openai_error(http, oai):
    for stream in (False, True):
        r = http.post("/v1/completions", json={"model": "no-such-adapter", "prompt": "hi",
                                               "stream": stream})
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert "no-such-adapter" in err["message"] and err["code"] == 404 and err["type"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert http.get("/v1/models/nope").status_code == 404


@integration
@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"model": "ada", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "ada", "prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": "ada", "prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": "ada", "prompt": []}, "prompt"),
    ("/v1/completions", {"model": "ada", "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": "ada", "prompt": {"x": 1}}, "prompt"),
    ("/v1/completions", {"model": "ada"}, "prompt"),
    ("/v1/completions", {"model": "ada", "prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"model": "ada", "prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": "ada", "prompt": [10**6]}, "prompt_token_ids"),
    ("/v1/completions", {"model": "ada", "prompt": [5] * 1000, "max_tokens": 100}, "max_tokens"),
    ("/v1/chat/completions", {"model": "ada", "messages": [], "max_tokens": 2}, "messages"),
    ("/v1/chat/completions", {"model": "ada", "messages": [{"role": "user", "content": "x"}],
                              "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"model": "ada", "messages": [{"role": "wizard", "content": "x"}]},
     "messages"),
])
def test_bad_input_is_400_naming_the_field(http, path, body, field):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["type"] == "invalid_request_error"


@integration
@pytest.mark.parametrize("adapter", [None, "ada", "rlo"])
def test_completion_logprobs_and_echo_equal_the_reference(http, client, reference, assets,
                                                          cluster, adapter):
    """``logprobs`` + ``echo`` (what lm-evaluation-harness asks for loglikelihood): the
    prompt's logprobs under the adapter, then the completion's (first token from prefill,
    the rest from decode), equal to the reference's; the text is the prompt's then the
    completion's, and the shape is OpenAI's."""
    from reference import detailed
    from sampling_checks import LP_TOL, prompts

    p = prompts(cluster.pool.prefill[0].info.vocab_size)[0]
    ref = detailed(reference, p, assets["adapters"][adapter] if adapter else None, 6, k=2)
    r = http.post("/v1/completions", json={
        "model": adapter or "base", "prompt": p, "max_tokens": 6, "temperature": 0,
        "logprobs": 2, "echo": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    sdk = client.generate(adapter, prompt_token_ids=p, max_tokens=6, ignore_eos=True, echo=True)
    assert choice["text"] == sdk.prompt_text + sdk.text and sdk.prompt_text
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(p) + 6
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = lp["token_logprobs"][1:]
    want = [*ref.prompt_logprobs, *ref.logprobs]
    k = len(p) - 1 + ref.comparable_prefix(1e-3)
    assert max(abs(a - b) for a, b in zip(got[:k], want[:k])) < LP_TOL
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for pos in range(1, len(p) + 6):
        top = lp["top_logprobs"][pos]
        assert lp["tokens"][pos] in top and len(top) <= 3
    # the greedy completion tokens are their position's most likely
    assert all(lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())
               for i in range(len(p), len(p) + ref.comparable_prefix(1e-3)))


@integration
def test_chat_logprobs_plain_and_streamed(oai, client):
    msgs = [{"role": "user", "content": "Tell me something"}]
    sdk = client.generate("bea", prompt=format_chat_text(msgs), max_tokens=6,
                          ignore_eos=True, logprobs=2)
    r = oai.chat.completions.create(model="bea", messages=msgs, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=2,
                                    extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([x.logprob for x in sdk.logprobs])
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    chunks = oai.chat.completions.create(model="bea", messages=msgs, max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         stream=True, extra_body={"ignore_eos": True})
    streamed = [c for ch in chunks for c in ((ch.choices[0].logprobs.content or [])
                                            if ch.choices and ch.choices[0].logprobs else [])]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content])


def format_chat_text(msgs) -> str:
    from http_gateway.schema import ChatMessage

    return format_chat([ChatMessage(**m) for m in msgs])


@integration
def test_penalties_and_logit_bias_over_http_equal_the_sdk(http, client):
    knobs = {"presence_penalty": 0.8, "frequency_penalty": 1.1, "repetition_penalty": 2.0,
             "top_k": 5, "min_p": 0.01}
    p = [7, 8, 9, 7, 8, 9, 7, 8, 9, 10]
    plain = client.generate("ada", prompt_token_ids=p, max_tokens=10, ignore_eos=True)
    p = p + list(plain.token_ids)    # the penalized prompt holds its own greedy answer
    r = http.post("/v1/completions", json={"model": "ada", "prompt": p, "max_tokens": 10,
                                           "temperature": 0, "ignore_eos": True, **knobs})
    sdk = client.generate("ada", prompt_token_ids=p, max_tokens=10, ignore_eos=True, **knobs)
    assert r.json()["choices"][0]["text"] == sdk.text
    plain = client.generate("ada", prompt_token_ids=p, max_tokens=10, ignore_eos=True)
    assert plain.token_ids != sdk.token_ids          # the penalties did something
    forced = plain.token_ids[3]
    r = http.post("/v1/completions", json={"model": "ada", "prompt": p, "max_tokens": 4,
                                           "temperature": 0, "ignore_eos": True,
                                           "logit_bias": {str(forced): 100}})
    ids = client.generate("ada", prompt_token_ids=p, max_tokens=4, ignore_eos=True,
                          logit_bias={forced: 100}).token_ids
    assert ids == (forced,) * 4 and r.json()["choices"][0]["text"] == client.generate(
        "ada", prompt_token_ids=p, max_tokens=4, ignore_eos=True,
        logit_bias={forced: 100}).text


@integration
@pytest.mark.parametrize("body, field", [
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"echo": True, "stream": True}, "echo"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 99, "max_tokens": 4}, "min_tokens"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
])
def test_bad_sampling_over_http_is_400_naming_the_field(http, body, field):
    r = http.post("/v1/completions", json={"model": "ada", "prompt": "hi", **body})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={
        "model": "ada", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"]


@integration
def test_structured_output_over_http(oai, http):
    """response_format json_schema / json_object (chat, plain and streamed) and vLLM's
    structured_outputs (completions): every answer parses and validates."""
    import jsonschema

    from sampling_checks import SCHEMAS

    msgs = [{"role": "user", "content": "Give me data"}]
    for i, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        r = oai.chat.completions.create(model="ada", messages=msgs, max_tokens=80,
                                        temperature=1.0, seed=i, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        chunks = oai.chat.completions.create(model="rlo", messages=msgs, max_tokens=80,
                                             temperature=0, response_format=fmt, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), schema)
    # any JSON object: this random-weight model writes one endless string value, so only
    # the start is checked (bounded schemas above are checked whole)
    r = oai.chat.completions.create(model="bea", messages=msgs, max_tokens=12,
                                    temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith('{"'), r.choices[0].message.content
    r = http.post("/v1/completions", json={"model": "cid", "prompt": "Pick", "max_tokens": 8,
                                           "structured_outputs": {"choice": ["yes", "no"]}})
    assert r.json()["choices"][0]["text"] in ("yes", "no")


@integration
@pytest.mark.parametrize("body, field, says", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "required"),
    ({"response_format": {"type": "xml"}}, "response_format", ""),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
     "response_format", ""),
])
def test_bad_structured_output_is_400(http, body, field, says):
    r = http.post("/v1/chat/completions", json={
        "model": "ada", "messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert field in msg and says in msg, msg


@integration
def test_n_and_best_of_over_http(oai, client):
    p = [11, 12, 13, 14, 15, 16, 17]
    sdk = client.generate("ada", prompt_token_ids=p, max_tokens=6, temperature=1.0, seed=3,
                          n=3, ignore_eos=True, logprobs=0)
    r = oai.completions.create(model="ada", prompt=p, max_tokens=6, temperature=1.0, seed=3,
                               n=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [s.text for s in sdk.samples]
    assert r.usage.completion_tokens == 18
    best = max(sdk.samples, key=lambda s: sum(t.logprob for t in s.logprobs))
    r = oai.completions.create(model="ada", prompt=p, max_tokens=6, temperature=1.0, seed=3,
                               n=1, best_of=3, extra_body={"ignore_eos": True})
    assert len(r.choices) == 1 and r.choices[0].text == best.text
    assert r.choices[0].logprobs is None              # ranked by logprobs, not asked for
    msgs = [{"role": "user", "content": "two answers"}]
    plain = oai.chat.completions.create(model="bea", messages=msgs, max_tokens=5, n=2,
                                        temperature=1.0, seed=1,
                                        extra_body={"ignore_eos": True})
    chunks = oai.chat.completions.create(model="bea", messages=msgs, max_tokens=5, n=2,
                                         temperature=1.0, seed=1, stream=True,
                                         extra_body={"ignore_eos": True})
    texts, finishes = {0: "", 1: ""}, {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in plain.choices}
    assert finishes == {0: "length", 1: "length"}


@integration
@pytest.mark.parametrize("body, field", [
    ({"n": 17}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
])
def test_bad_n_is_400(http, body, field):
    r = http.post("/v1/completions", json={"model": "ada", "prompt": "hi", **body})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


@integration
def test_malformed_bodies_are_400(http):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type":
                                                                    "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b'{"model": "ada", "prompt": "\\ud800"}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert http.get("/v1/nothing").status_code == 404


def test_gateway_imports_neither_torch_nor_vllm():
    code = "import sys, http_gateway; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    mods = set(out.stdout.split())
    assert not {"torch", "vllm", "transformers"} & mods


# --------------------------------------------------------------------------- fake router

class _FakeRouter(pb_grpc.RouterServicer):
    """Answers by adapter name: a status to abort with, or a two-token completion."""

    ABORT = {"deny": grpc.StatusCode.PERMISSION_DENIED, "anon": grpc.StatusCode.UNAUTHENTICATED,
             "busy": grpc.StatusCode.RESOURCE_EXHAUSTED, "down": grpc.StatusCode.UNAVAILABLE,
             "bad": grpc.StatusCode.INVALID_ARGUMENT, "gone": grpc.StatusCode.NOT_FOUND,
             "boom": grpc.StatusCode.INTERNAL}

    def __init__(self):
        self.metadata: list[dict] = []
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled = threading.Event()

    async def ListAdapters(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        adapter = pb.Adapter(name="x", version=3, kind="reft_p")
        return pb.ListAdaptersResponse(adapters=[adapter])

    async def Generate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        self.requests.append(request)
        if request.adapter in self.ABORT:
            await context.abort(self.ABORT[request.adapter], f"sampling.top_p: fake {request.adapter}")
        if request.adapter == "slow":
            await asyncio.sleep(5)
        yield pb.GenerateResponse(delta=pb.TokenDelta(token_ids=[1], text="he"))
        if request.adapter == "hang":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.adapter == "midfail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker died")
        yield pb.GenerateResponse(delta=pb.TokenDelta(token_ids=[2], text="llo"))
        yield pb.GenerateResponse(final=pb.Final(request_id=request.request_id,
                                                 finish_reason="length",
                                                 usage=pb.Usage(prompt_tokens=3,
                                                                completion_tokens=2)))


@pytest.fixture(scope="module")
def fake():
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = _FakeRouter()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state = {}

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_RouterServicer_to_server(servicer, server)
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await hs.set("preft.v1.Router", health_pb2.HealthCheckResponse.SERVING)
        state["server"] = server

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    gw = HttpGatewayThread(f"127.0.0.1:{state['port']}", timeout=1.0)
    gw.start()
    with httpx.Client(base_url=gw.base_url, timeout=30) as c:
        yield servicer, c
    gw.stop()
    asyncio.run_coroutine_threadsafe(state["server"].stop(0), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


def test_bearer_key_is_forwarded_as_grpc_metadata(fake):
    servicer, http = fake
    r = http.post("/v1/completions", json={"model": "x", "prompt": "hi"},
                  headers={"Authorization": "Bearer sk-123"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello"
    assert servicer.metadata[-1]["authorization"] == "Bearer sk-123"
    assert http.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert servicer.metadata[-1]["authorization"] == "Bearer k2"
    http.post("/v1/completions", json={"model": "x", "prompt": "hi"})
    assert "authorization" not in servicer.metadata[-1]
    r = http.post("/v1/completions", json={"model": "x", "prompt": "hi"},
                  headers={"Authorization": "Bearer caf\u00e9".encode("latin-1")})
    assert r.status_code == 401


@pytest.mark.parametrize("adapter, status", [
    ("deny", 403), ("anon", 401), ("busy", 429), ("down", 503), ("bad", 400), ("gone", 404),
    ("boom", 500), ("slow", 504)])
def test_status_codes_map_to_http(fake, adapter, status):
    _, http = fake
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={
            "model": adapter, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == status and err["message"]
    if status == 400:
        assert err["param"] == "top_p"


def test_error_in_the_middle_of_a_stream_is_an_error_event(fake):
    _, http = fake
    r = http.post("/v1/completions", json={"model": "midfail", "prompt": "hi", "stream": True})
    assert r.status_code == 200
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "he"
    assert json.loads(events[-2])["error"]["code"] == 503


def test_client_leaving_a_stream_cancels_the_grpc_call(fake):
    servicer, http = fake
    with http.stream("POST", "/v1/completions",
                     json={"model": "hang", "prompt": "hi", "stream": True}) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert json.loads(first[len("data: "):])["choices"][0]["text"] == "he"
    assert servicer.cancelled.wait(10)


def test_base_model_name_means_no_adapter(fake):
    servicer, http = fake
    r = http.post("/v1/completions", json={"model": "base", "prompt": [1, 2], "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    req = servicer.requests[-1]
    assert req.adapter == "" and list(req.token_ids.ids) == [1, 2]
    assert req.sampling.max_tokens == 16 and req.sampling.temperature == 1.0
    models = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["base", "x"]
    assert models[1]["preft_kind"] == "reft_p" and models[1]["version"] == 3
    assert "preft_kind" not in models[0]
    assert http.get("/health").status_code == 200
