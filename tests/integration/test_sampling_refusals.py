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


# --------------------------------------------------------------------------- front-door limits
# (issue 26, item 5: docs/http.md, "Limits")

def test_a_200_mb_body_is_413_before_it_is_sent(gateway):
    """Headers saying 200 MB and 64 KiB of the body: the answer comes at once, 413 with an
    OpenAI error naming the limit and how to change it, and the connection is closed."""
    import json
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(gateway.base_url)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.hostname}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(head + b'{"model": "base", "prompt": "' + b"x" * (64 << 10))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert status.split()[1] == b"413", answer[:500]
    err = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert "200000000" in err["message"] and "64 MiB" in err["message"], err
    assert "--max-body-mib" in err["message"], err


def test_200000_stop_strings_are_refused_naming_the_limit(client, gateway):
    from cluster.messages import MAX_STOP_STRINGS
    from preft_client import InvalidArgument

    stop = [f"s{i}" for i in range(200_000)]
    with pytest.raises(InvalidArgument) as e:
        client.generate(None, prompt="hello", max_tokens=4, stop=stop)
    msg = e.value.message
    assert "stop" in msg and str(MAX_STOP_STRINGS) in msg and "200000" in msg, msg
    with httpx.Client(base_url=gateway.base_url, timeout=120) as h:
        r = h.post("/v1/completions", json={"model": "base", "prompt": "hi", "stop": stop})
        chat = h.post("/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "hi"}] * 10_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    assert chat.status_code == 400 and "4096" in chat.json()["error"]["message"], chat.text


def test_top_20_prompt_logprobs_of_the_longest_prompt(client):
    """The longest prompt the model accepts (max_model_len 1024 - 1 tokens), every position's
    top 20. On the tiny model this reply is ~0.4 MiB, under gRPC's default 4 MiB; the case
    over it (a 16k-token prompt) is tests/unit/test_front_door_limits.py's."""
    ids = [7 + (i * 37) % 500 for i in range(1023)]
    c = client.generate(None, prompt_token_ids=ids, max_tokens=1, prompt_logprobs=20)
    assert len(c.prompt_logprobs) == 1023
    assert all(len(lp.top) == 20 for lp in c.prompt_logprobs[1:])
    assert c.usage.prompt_tokens == 1023
