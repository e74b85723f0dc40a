"""The sampling surface's pieces without engines: validation naming the field, the typed
wire for logprobs and logit_bias, the decode engine's first-token penalty rows, and the
OpenAI logprob shapes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cluster.errors import InvalidRequest
from cluster.messages import (MAX_LOGPROBS, PrefillRequest, PrefillResult, Sampling,
                              TokenLogprob)
from cluster.plane import ENCODER, PlaneError, decode, decoder


@pytest.mark.parametrize("field, kw", [
    ("top_k", dict(top_k=-1)),
    ("min_p", dict(min_p=1.01)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=float("nan"))),
    ("presence_penalty", dict(presence_penalty=-2.5)),
    ("frequency_penalty", dict(frequency_penalty=float("inf"))),
    ("logit_bias", dict(logit_bias=((5, 101.0),))),
    ("logit_bias", dict(logit_bias=((-1, 1.0),))),
    ("min_tokens", dict(min_tokens=17)),
    ("stop_token_ids", dict(stop_token_ids=(-3,))),
    ("logprobs", dict(logprobs=21)),
    ("prompt_logprobs", dict(prompt_logprobs=-1)),
])
def test_sampling_refuses_bad_knobs_naming_the_field(field, kw):
    with pytest.raises(InvalidRequest) as e:
        Sampling(max_tokens=16, **kw).validate()
    assert e.value.field == field


# Values vLLM's SamplingParams refuses (temperature 5 reached the engine as INTERNAL), and
# neighbours it takes: each refused here iff vLLM refuses it (test below), naming the field.
VLLM_EDGES = [dict(temperature=t) for t in (5.0, 2.0001, 2.0, 1e-3, 0.0, -0.1)] + \
    [dict(top_p=v) for v in (0.0, 1e-6, 1.0, 1.01)] + \
    [dict(top_k=v) for v in (-5, 0, 1, 40)] + \
    [dict(min_p=v) for v in (2.0, 1.0, 0.0, -0.01)] + \
    [dict(presence_penalty=v) for v in (-2.0, 2.0, 2.5)] + \
    [dict(frequency_penalty=v) for v in (-2.01, 0.0)] + \
    [dict(repetition_penalty=v) for v in (0.0, -1.0, 0.5)] + \
    [dict(min_tokens=v) for v in (0, 16, 17)] + [dict(logprobs=v) for v in (0, 20, 21)]


@pytest.mark.parametrize("field, value", [("temperature", 5.0), ("top_p", 0.0), ("top_k", -5),
                                          ("min_p", 2.0), ("temperature", float("nan"))])
def test_the_first_hour_values_are_refused_with_their_range(field, value):
    with pytest.raises(InvalidRequest) as e:
        Sampling(max_tokens=16, **{field: value}).validate()
    assert e.value.field == field and str(e.value).startswith(f"{field}: must be")
    assert "must be in " in str(e.value) or ">= 0" in str(e.value), str(e.value)   # the range


def test_whatever_vllm_refuses_the_router_refuses_first():
    """The installed vLLM's own rules (SamplingParams._verify_args and the processor's
    max_logprobs): a request vLLM would refuse never gets past ``Sampling.validate``."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    for kw in VLLM_EDGES:
        try:
            SamplingParams(max_tokens=16, **kw)
            vllm_ok = kw.get("logprobs", 0) <= MAX_LOGPROBS   # the processor's max_logprobs
        except (ValueError, VLLMValidationError):
            vllm_ok = False
        try:
            Sampling(max_tokens=16, **kw).validate()
            ours = True
        except InvalidRequest as e:
            assert e.field == next(iter(kw)), (kw, e)
            ours = False
        assert vllm_ok or not ours, f"vLLM refuses {kw} but the router lets it through"
        assert ours or not vllm_ok, f"the router refuses {kw}, which vLLM takes"


def test_sdk_refuses_negatives_naming_the_field_and_takes_vllms_top_k_off():
    import grpc

    from preft_client import InvalidArgument
    from preft_client.client import _request

    for field in ("top_k", "min_tokens", "logprobs", "n"):
        with pytest.raises(InvalidArgument) as e:
            _request("a", "x", None, 4, 1.0, 1.0, None, None, False, None, **{field: -5})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.message.startswith(f"sampling.{field}: must be >= 0"), e.value.message
    with pytest.raises(InvalidArgument, match="stop_token_ids"):
        _request("a", "x", None, 4, 1.0, 1.0, None, None, False, None, stop_token_ids=[3, -1])
    req = _request("a", "x", None, 4, 1.0, 1.0, None, None, False, None, top_k=-1)
    assert req.sampling.top_k == 0


def test_gateway_refuses_what_the_router_refuses():
    from pydantic import ValidationError

    from http_gateway.schema import CompletionRequest

    for field, value in (("temperature", 5), ("top_p", 0), ("top_k", -5), ("min_p", 2)):
        with pytest.raises(ValidationError) as e:
            CompletionRequest(prompt="x", **{field: value})
        assert e.value.errors()[0]["loc"] == (field,)
    assert CompletionRequest(prompt="x", temperature=2).temperature == 2


def test_sampling_accepts_the_whole_surface():
    s = Sampling(max_tokens=8, top_k=5, min_p=0.1, repetition_penalty=1.2,
                 presence_penalty=-1, frequency_penalty=2, logit_bias=((3, -100.0),),
                 min_tokens=8, stop_token_ids=(4,), logprobs=20, prompt_logprobs=0, echo=True)
    assert s.validate() is s and s.token_ids_used() == (3, 4)


def test_plane_round_trips_logprobs_and_logit_bias():
    import msgspec

    lp = TokenLogprob(7, -0.5, 1, ((7, -0.5), (9, -1.25)), "a", ("a", "b"))
    res = PrefillResult("r", (1, 2), 7, "a", None, None, "ns", 0.0, 0.0,
                        first_logprob=lp, prompt_logprobs=(TokenLogprob(1, 0.0, 0), lp))
    limit = 1 << 20
    assert decode(decoder(PrefillResult), ENCODER.encode(res), limit, "result") == res
    req = PrefillRequest("r", None, Sampling(logit_bias=((5, 1.5), (6, -2.0))),
                         prompt_token_ids=(1,))
    req_type = decoder(PrefillRequest)
    assert decode(req_type, ENCODER.encode(req), limit, "request") == req
    bad = msgspec.to_builtins(req)
    bad["sampling"]["logit_bias"] = [[5, 1.5, 9]]      # a pair must be a pair
    with pytest.raises(PlaneError, match="Expected `array` of length 2"):
        decode(req_type, ENCODER.encode(bad), limit, "request")
    bad["sampling"]["logit_bias"] = [[5, "x"]]
    with pytest.raises(PlaneError, match="Expected `float`"):
        decode(req_type, ENCODER.encode(bad), limit, "request")


def test_decode_rows_count_the_first_token_as_generated():
    """Row i's first token is the last token of its engine prompt (prompt + [first])."""
    from decode_worker.first_token import with_first_tokens

    ids = np.zeros((3, 8), dtype=np.int32)
    ids[0, :3] = [5, 6, 42]        # prompt [5, 6], first token 42
    ids[1, :2] = [9, 17]           # prompt [9], first token 17
    ids[2, :4] = [1, 2, 3, 4]
    batch = SimpleNamespace(token_ids_cpu=ids, num_prompt_tokens=np.array([3, 2, 4]))
    assert with_first_tokens(batch, [[42, 7], [], [4]]) == [[42, 42, 7], [17], [4, 4]]


def test_completion_logprobs_shape():
    from http_gateway.logprobs import CompletionLogprobs, chat_logprobs
    from preft_client import TokenLogprob as SdkLogprob

    first = SdkLogprob(1, 0.0, 0, (), "Hi")
    tok = SdkLogprob(2, -0.25, 2, ((3, -0.1), (2, -0.25)), " there", ("!", " there"))
    lp = CompletionLogprobs()
    block = lp.block((first, tok))
    assert block == {"tokens": ["Hi", " there"], "token_logprobs": [None, -0.25],
                     "top_logprobs": [None, {"!": -0.1, " there": -0.25}],
                     "text_offset": [0, 2]}
    assert lp.block((tok,))["text_offset"] == [8]     # continues across stream chunks
    chat = chat_logprobs((tok,))["content"][0]
    assert chat["token"] == " there" and chat["bytes"] == list(b" there")
    assert [t["token"] for t in chat["top_logprobs"]] == ["!", " there"]


def test_gateway_body_becomes_sdk_knobs():
    from http_gateway.schema import ChatCompletionRequest, CompletionRequest

    body = CompletionRequest(prompt="x", logprobs=3, echo=True, top_k=-1,
                             logit_bias={"12": 5}, presence_penalty=0.5)
    assert body.knobs()["logit_bias"] == {12: 5.0} and body.knobs()["top_k"] == 0
    assert body.answer_knobs() == {"logprobs": 3, "echo": True, "prompt_logprobs": 3, "n": 1}
    # best_of ranks its samples by their logprobs: asked for even when the caller did not
    ranked = CompletionRequest(prompt="x", n=2, best_of=5)
    assert ranked.answer_knobs() == {"logprobs": 0, "echo": False, "prompt_logprobs": None,
                                     "n": 5}
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True,
                                 top_logprobs=4)
    assert chat.answer_knobs() == {"logprobs": 4, "n": 1}
