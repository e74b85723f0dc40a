"""Every sampling value vLLM would refuse is refused at the router, naming the field and its
range: gRPC INVALID_ARGUMENT through the SDK, HTTP 400 through the gateway -- never INTERNAL
from an engine (temperature 5 used to reach vLLM's ``SamplingParams`` and come back as
INTERNAL / HTTP 500). Real router, workers and gateway (the session cluster); afterwards the
same client still generates, so nothing was left broken."""

from __future__ import annotations

import grpc
import httpx
import pytest

pytestmark = pytest.mark.integration

BAD = [("temperature", 5.0, "[0, 2]"), ("top_p", 0.0, "(0, 1]"), ("top_k", -5, ">= 0"),
       ("min_p", 2.0, "[0, 1]")]


@pytest.mark.parametrize("field, value, bounds", BAD)
def test_sdk_gets_invalid_argument_naming_the_field(client, field, value, bounds):
    from preft_client import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        client.generate(None, prompt="hello", max_tokens=4, **{field: value})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.message and bounds in e.value.message, e.value.message
    with pytest.raises(InvalidArgument, match=field):   # streaming: the same refusal
        list(client.stream(None, prompt="hello", max_tokens=4, **{field: value}))


@pytest.mark.parametrize("field, value, bounds", BAD)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_http_gets_400_naming_the_field(gateway, path, field, value, bounds):
    body = {"model": "base", "max_tokens": 4, field: value}
    body.update({"prompt": "hello"} if path == "/v1/completions"
                else {"messages": [{"role": "user", "content": "hello"}]})
    with httpx.Client(base_url=gateway.base_url, timeout=120) as c:
        r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_temperature_at_vllms_bound_is_served(client, gateway):
    c = client.generate(None, prompt="hello", max_tokens=3, temperature=2.0, seed=1,
                        ignore_eos=True)
    assert c.usage.completion_tokens == 3
    with httpx.Client(base_url=gateway.base_url, timeout=120) as h:
        r = h.post("/v1/completions", json={"model": "base", "prompt": "hello", "max_tokens": 3,
                                            "temperature": 2, "top_k": -1, "seed": 1,
                                            "ignore_eos": True})
    assert r.status_code == 200, r.text
