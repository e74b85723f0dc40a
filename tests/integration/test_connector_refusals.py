"""A bad request fails alone (issue 26, item 4): decode requests built to be inconsistent at
the KV connector -- a handle whose block count or token count disagrees with its prompt, a
handle naming a transfer the prefill worker does not hold, a grammar that refuses the first
token -- are sent straight to the session cluster's decode worker (its plane, no router)
while four honest streams decode on the same engine. Each bad one ends with its own error;
the engine lives on, every honest stream finishes with exactly the tokens the normal path
gives, and no KV block stays held on either side.

Before the connector refused such requests they raised inside vLLM's scheduler callbacks
(``update_state_after_alloc``: "decode allocated N blocks for M remote blocks"; an assertion
on a handle longer than the prompt), which ended the engine loop and failed every request
on the worker.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

pytestmark = pytest.mark.integration

HONEST = [("ada", "the honest stream number one keeps going " * 3),
          ("bea", "a second honest request on the same engine " * 2),
          (None, "the base model decodes beside them " * 3),
          ("rlo", "and a fourth one with a reft adapter " * 2)]
MAX_TOKENS = 160     # long enough to decode through every bad request


def _prefill(cluster, rid: str):
    """A prefill straight on the worker actor: its result, its KV held for decode."""
    import ray

    from cluster.messages import PrefillRequest, Sampling

    req = PrefillRequest(rid, None, Sampling(max_tokens=8), prompt_text="a bad request " * 6)
    res = ray.get(cluster.pool.prefill[0].actor.prefill.remote(req), timeout=60)
    assert res.kv is not None
    return res


def _decode_error(cluster, res, kv, first_token: int | None = None, **sampling):
    """Decode on the decode worker's plane with handle ``kv``: the error it ends with."""
    from cluster.messages import DecodeRequest, Sampling
    from plane_client import plane_call

    req = DecodeRequest(res.request_id, res.prompt_token_ids,
                        res.first_token if first_token is None else first_token, kv,
                        res.kv_namespace, Sampling(max_tokens=8, **sampling))
    return plane_call(cluster, cluster.pool.decode[0], "decode", req)[1]



def _held_and_used(cluster) -> tuple[int, int]:
    import ray

    held = sum(ray.get(w.actor.held_transfers.remote(), timeout=10) for w in cluster.pool.prefill)
    used = sum(ray.get(w.actor.kv_usage.remote(), timeout=10).blocks_in_use
               for w in cluster.pool.decode)
    return held, used


def _not_a_digit_token(cluster) -> int:
    """A token whose text has no digit (the regex guide below refuses it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cluster.cfg.decode.engine.model)
    return next(i for i in tok.encode("hello world", add_special_tokens=False)
                if not any(c.isdigit() for c in tok.decode([i])) and tok.decode([i]).strip())


def _honest_streams(client, results: list, started: threading.Barrier) -> list:
    def run(k: int) -> None:
        adapter, prompt = HONEST[k]
        try:
            ids: list[int] = []
            for i, d in enumerate(client.stream(adapter, prompt=prompt, max_tokens=MAX_TOKENS,
                                                  ignore_eos=True)):
                ids += d.token_ids
                if i == 1:
                    started.wait(60)     # decoding: its second delta came from the decode worker
            results[k] = ids
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            results[k] = e
            started.abort()

    ts = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(HONEST))]
    for t in ts:
        t.start()
    return ts


def test_inconsistent_decode_requests_fail_alone(cluster, client):
    from concurrent.futures import ThreadPoolExecutor

    expected = [client.generate(a, prompt=p, max_tokens=MAX_TOKENS, ignore_eos=True).token_ids
                for a, p in HONEST]
    bad = [_prefill(cluster, f"refused-{i}") for i in range(4)]
    letter = _not_a_digit_token(cluster)
    calls = {
        # four more blocks than the prompt needs: the engine allocates fewer
        "blocks": (bad[0], replace(bad[0].kv, num_blocks=bad[0].kv.num_blocks + 4), {}),
        # longer than the prompt: vLLM asserted on it inside the scheduler
        "tokens": (bad[1], replace(bad[1].kv, num_tokens=bad[1].kv.num_tokens + 40,
                                   num_blocks=bad[1].kv.num_blocks + 3), {}),
        # a transfer the prefill worker never held
        "unknown": (bad[2], replace(bad[2].kv, transfer_id=bad[2].kv.transfer_id ^ 1), {}),
        # a grammar the first token does not fit
        "grammar": (bad[3], bad[3].kv, dict(guide="regex", guide_spec="[0-9]+",
                                            first_token=letter)),
    }
    results: list = [None] * len(HONEST)
    started = threading.Barrier(len(HONEST) + 1)
    ts = _honest_streams(client, results, started)
    started.wait(120)
    with ThreadPoolExecutor(len(calls)) as ex:
        futs = {w: ex.submit(_decode_error, cluster, res, kv, **kw)
                for w, (res, kv, kw) in calls.items()}
        errors = {w: f.result(timeout=120) for w, f in futs.items()}
    for t in ts:
        t.join(120)
    for what, err in errors.items():
        assert err is not None, f"{what}: the bad request was decoded"
        assert err.grpc_code in ("UNAVAILABLE", "INVALID_ARGUMENT"), (what, repr(err))
    for k, got in enumerate(results):
        assert not isinstance(got, BaseException), (HONEST[k], got)
        assert got == list(expected[k]), f"honest stream {k} differs from the normal path"
    # the engine lives on, and nothing stays held (the unknown transfer's own KV: released)
    assert client.generate("ada", prompt="still serving", max_tokens=4).token_ids
    import ray
    ray.get(cluster.pool.prefill[0].actor.release.remote(bad[2].kv.transfer_id), timeout=10)
    assert cluster.wait_until(lambda: _held_and_used(cluster) == (0, 0), 30), _held_and_used(cluster)
