"""Replaced adapter versions leave the adapter store (issue 26, item 7): on the session
cluster, an adapter is registered, a request on it is in flight, and the adapter is
replaced. The old version's store copy is deleted once the grace period has passed and no
worker reports holding that version; the request in flight finishes with the old
version's exact tokens, and the new version serves from its own copy."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.integration

PROMPT = "a request that outlives its adapter version " * 3
N = 64



def test_replaced_version_leaves_the_store_while_its_request_completes(cluster, client,
                                                                       assets, tmp_path):
    from app.tiny import make_lora_adapter

    v1 = make_lora_adapter(tmp_path / "v1", assets["model"], seed=71)
    v2 = make_lora_adapter(tmp_path / "v2", assets["model"], seed=72)
    retired, _ = cluster._server.service._retirements()
    grace, retired.grace_s = retired.grace_s, 1.0    # the router's request timeout otherwise
    store = cluster.store.root
    try:
        info1 = client.register_adapter("retiree", v1, public=True)
        expected = client.generate("retiree", prompt=PROMPT, max_tokens=N,
                                   ignore_eos=True).token_ids
        assert (store / info1.sha256).is_dir()
        streaming, deleted, got = threading.Event(), threading.Event(), []

        def run() -> None:
            try:
                for i, d in enumerate(client.stream("retiree", prompt=PROMPT, max_tokens=N,
                                                    ignore_eos=True)):
                    got.extend(d.token_ids)
                    if i == 1:            # decoding on v1's prompt KV: now replace v1
                        streaming.set()
                        deleted.wait(60)
            except Exception as e:  # noqa: BLE001 -- asserted below
                got.append(e)
            finally:
                streaming.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert streaming.wait(60)
        info2 = client.register_adapter("retiree", v2, public=True)
        assert info2.version == info1.version + 1 and info2.sha256 != info1.sha256
        gone = cluster.wait_until(lambda: not (store / info1.sha256).exists(), 30)
        deleted.set()
        t.join(60)
        assert gone, "the replaced version's store copy is still there"
        assert got == list(expected), "the request in flight on v1 did not finish as v1"
        assert (store / info2.sha256).is_dir()
        out2 = client.generate("retiree", prompt=PROMPT, max_tokens=N, ignore_eos=True)
        assert out2.token_ids != expected
    finally:
        retired.grace_s = grace
        client.delete_adapter("retiree")
    assert not (store / info2.sha256).exists()
