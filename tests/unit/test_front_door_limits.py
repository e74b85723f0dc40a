"""Limits at every front door (issue 26, item 5), without an engine.

- The HTTP gateway answers a body over its limit with 413 before anything reads it: a
  ``Content-Length`` over it is refused with the body never read (the ASGI ``receive`` here
  fails if called) and without an API key; a chunked body is read only up to the limit.
- The router's validation (``cluster.messages.Sampling.validate``, reached through
  ``router.generate.to_sampling``) refuses too many or too long stop strings, too many
  logit_bias entries and stop token ids, naming the field, the limit and the value given;
  the gateway refuses too many chat messages the same way (HTTP 400).
- The SDK receives a reply message as large as the router may send: top-20 prompt logprobs
  of a 16k-token prompt (~6 MiB, over gRPC's default 4 MiB) arrive, where they used to fail
  with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from cluster.errors import InvalidRequest
from cluster.messages import (MAX_LOGIT_BIAS, MAX_REPLY_BYTES, MAX_REQUEST_BYTES,
                              MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, Sampling)
from http_gateway.schema import MAX_CHAT_MESSAGES
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc


# --------------------------------------------------------------------------- the gateway

def _app(**kwargs):
    from http_gateway import create_app

    return create_app("127.0.0.1:1", **kwargs)   # no router: nothing here reaches one


def _post(app, path: str, headers: dict, receive) -> tuple[int, dict, dict]:
    """Run one ASGI request; (status, response headers, JSON body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 1234),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
            json.loads(body))


async def _never_read():
    raise AssertionError("the body was read")


def test_content_length_over_the_limit_is_413_unread_and_without_a_key():
    status, headers, body = _post(_app(), "/v1/completions",
                                  {"content-type": "application/json",
                                   "content-length": "200000000"}, _never_read)
    assert status == 413, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 413
    msg = err["message"]
    assert "200000000" in msg and str(MAX_REQUEST_BYTES) in msg and "64 MiB" in msg, msg
    assert "--max-body-mib" in msg and "--http-max-body-mib" in msg, msg
    assert headers.get("connection") == "close"


def test_the_limit_is_configurable_and_checked():
    status, _, body = _post(_app(max_body_bytes=1000), "/v1/chat/completions",
                            {"content-length": "1001"}, _never_read)
    assert status == 413 and "1000 bytes" in body["error"]["message"], body
    with pytest.raises(ValueError, match="max_body_bytes"):
        _app(max_body_bytes=0)


def test_chunked_body_is_read_only_up_to_the_limit():
    reads = []

    async def endless():
        reads.append(1)
        assert len(reads) < 100, "read on past the limit"
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    status, _, body = _post(_app(max_body_bytes=4096), "/v1/completions", {}, endless)
    assert status == 413 and "4096" in body["error"]["message"], body
    assert len(reads) == 5


def _chunks(data: bytes, size: int = 7):
    parts = [data[i:i + size] for i in range(0, len(data), size)]

    async def receive():
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}
    return receive


def test_bodies_within_the_limit_reach_the_app():
    """Chunked or with a Content-Length, a body under the limit is parsed as before (here a
    bad temperature: the 400 names it, so the body arrived whole)."""
    data = json.dumps({"prompt": "hi", "temperature": 9}).encode()
    for headers in ({}, {"content-length": str(len(data))}):
        status, _, body = _post(_app(max_body_bytes=len(data)), "/v1/completions",
                                {"content-type": "application/json", **headers},
                                _chunks(data))
        assert status == 400 and body["error"]["param"] == "temperature", body


def test_too_many_chat_messages_is_400_naming_the_limit():
    data = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 10_000}).encode()
    status, _, body = _post(_app(), "/v1/chat/completions",
                            {"content-type": "application/json"}, _chunks(data, 1 << 16))
    assert status == 400, body
    err = body["error"]
    assert err["param"] == "messages", err
    assert str(MAX_CHAT_MESSAGES) in err["message"] and "10000" in err["message"], err


def test_chat_content_over_the_limit_is_400():
    from http_gateway.schema import ChatCompletionRequest

    big = "x" * (16 << 20)
    with pytest.raises(ValueError, match="characters of content"):
        ChatCompletionRequest(messages=[{"role": "user", "content": big}] * 2 +
                              [{"role": "user", "content": [{"type": "text", "text": "y"}]}])


# --------------------------------------------------------------------------- the router

def _refused(**params) -> str:
    from router.generate import to_sampling

    sp = pb.SamplingParams(max_tokens=4, **{k: v for k, v in params.items() if k != "bias"})
    sp.logit_bias.update(params.get("bias", {}))
    with pytest.raises(InvalidRequest) as e:
        to_sampling(sp)
    assert e.value.grpc_code == "INVALID_ARGUMENT"
    return str(e.value)


@pytest.mark.parametrize("field, params, limit, given", [
    ("stop", dict(stop=[f"s{i}" for i in range(200_000)]), MAX_STOP_STRINGS, "200000"),
    ("stop", dict(stop=["x" * (MAX_STOP_CHARS + 1)]), MAX_STOP_CHARS, str(MAX_STOP_CHARS + 1)),
    ("logit_bias", dict(bias={i: 1.0 for i in range(500_000)}), MAX_LOGIT_BIAS, "500000"),
    ("stop_token_ids", dict(stop_token_ids=range(5000)), MAX_STOP_TOKEN_IDS, "5000"),
])
def test_router_refuses_naming_field_limit_and_value(field, params, limit, given):
    msg = _refused(**params)
    assert msg.startswith(f"{field}: ") and str(limit) in msg and given in msg, msg


def test_at_the_limits_is_accepted():
    Sampling(stop=tuple(f"s{i}" for i in range(MAX_STOP_STRINGS - 1)) + ("x" * MAX_STOP_CHARS,),
             logit_bias=tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS)),
             stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS))).validate()


# --------------------------------------------------------------------------- reply size

def test_sdk_and_router_agree_on_message_sizes():
    from preft_client import client

    assert client.MAX_REQUEST_BYTES == MAX_REQUEST_BYTES
    assert client.MAX_REPLY_BYTES == MAX_REPLY_BYTES


def _long_prompt_logprobs(positions: int) -> pb.Final:
    top = [pb.TopLogprob(token_id=30_000 + i, logprob=-2.5 - i, token=f" tok{i}")
           for i in range(20)]
    one = pb.TokenLogprob(token_id=12_345, logprob=-1.5, rank=3, token=" the", top=top)
    return pb.Final(request_id="r", finish_reason="length",
                    usage=pb.Usage(prompt_tokens=positions, completion_tokens=1),
                    prompt_logprobs=[one] * positions)


class _BigReply(pb_grpc.RouterServicer):
    def __init__(self, final: pb.Final) -> None:
        self.final = final

    async def Generate(self, request, context):
        yield pb.GenerateResponse(delta=pb.TokenDelta(token_ids=[1], text="a"))
        yield pb.GenerateResponse(final=self.final)


def test_sdk_receives_prompt_logprobs_over_4_mib():
    """Top-20 prompt logprobs of a 16k-token prompt: one Final message over gRPC's default
    4 MiB receive limit (the session cluster's tiny model, 1024 tokens, makes ~0.4 MiB)."""
    from preft_client import AsyncPreftClient

    final = _long_prompt_logprobs(16_384)
    assert final.ByteSize() > 4 << 20

    async def run():
        server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_REPLY_BYTES)])
        pb_grpc.add_RouterServicer_to_server(_BigReply(final), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncPreftClient(f"127.0.0.1:{port}", timeout=60, retries=0) as c:
                return await c.generate(None, prompt="hi", max_tokens=1, prompt_logprobs=20)
        finally:
            await server.stop(0)

    done = asyncio.run(run())
    assert len(done.prompt_logprobs) == 16_384
    assert len(done.prompt_logprobs[-1].top) == 20
