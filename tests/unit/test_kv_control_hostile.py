"""The prefill KV endpoint under hostile control messages (issue 12, item 7).

Over a real gloo pair on loopback, messages are written straight into the endpoint's
TCPStore, as any process that can reach its port could. Each must be refused with an error
the sender can read, and afterwards the same endpoint must pair a good peer and move real
bytes. The endpoint's store must listen on its own address only.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.distributed import TCPStore

from kv_transfer.transport import Offer, OfferTable, TransferError, sign
from test_transport import N_BLOCKS, _engine, _finished

SECRET = "cluster-a-secret"
# Every new TCPStore connection does a reverse DNS lookup; where DNS drops a query that
# alone costs 5 s, so timeouts here leave room for one such stall.
TIMEOUT_S = 15
WAIT = timedelta(seconds=TIMEOUT_S)


@pytest.fixture
def endpoint():
    prod, p_layers, _ = _engine(seed=1, name="prefill", secret=SECRET, timeout_s=TIMEOUT_S)
    offers = OfferTable()
    host, port = prod.serve(offers)
    raw = TCPStore(host, port, is_master=False, timeout=WAIT)
    peers: list = []
    yield dict(prod=prod, p_layers=p_layers, offers=offers, host=host, port=port, raw=raw,
               nonce=raw.get("nonce").decode(), peers=peers)
    for t in peers:
        t.close()
    prod.close()


def _peer(ep, name="decode", secret=SECRET, seed=2):
    t, layers, _ = _engine(seed=seed, name=name, secret=secret, timeout_s=TIMEOUT_S)
    ep["peers"].append(t)
    return t, layers


def _good_transfer(ep, transfer_id, src=(3, 9), dst=(0, 11), cons=None):
    """Offer ``src`` and pull it into ``dst`` (a fresh good peer unless ``cons``): real bytes."""
    if cons is None:
        cons, c_layers = _peer(ep, name=f"decode-{transfer_id}", seed=transfer_id)
    else:
        cons, c_layers = cons
    ep["offers"].add(Offer(transfer_id, f"r{transfer_id}", list(src), 16 * len(src),
                           time.monotonic() + 60))
    rec = cons.pull(ep["host"], ep["port"], transfer_id, 0, list(dst))
    assert rec.ok
    for s_layer, d_layer in zip(ep["p_layers"], c_layers):
        for s, d in zip(src, dst):
            assert torch.equal(d_layer[d], s_layer[s])


def _answer(store, key: str) -> dict:
    store.wait([key], WAIT)          # on the old code: no answer, the thread had died
    return json.loads(store.get(key))


def _join(ep, make) -> dict:
    """Claim a join slot, write ``make(key, nonce)`` into it, return the endpoint's answer."""
    raw = ep["raw"]
    n = raw.add("joins", 1) - 1
    raw.set(f"join/{n}", make(f"join/{n}", ep["nonce"]))
    return _answer(raw, f"joinack/{n}")


def _fingerprint(ep) -> str:
    return ep["prod"].layout.fingerprint()


# --------------------------------------------------------------------------- joins
BAD_JOINS = {
    "not-json": (lambda ep, k, n: b"{not json", "not JSON"),
    "not-an-object": (lambda ep, k, n: "[1, 2]", "expected a JSON object"),
    "empty-object": (lambda ep, k, n: "{}", "cluster secret"),
    "unsigned-close": (lambda ep, k, n: json.dumps({"op": "close"}), "cluster secret"),
    "no-secret": (lambda ep, k, n: json.dumps({"peer": "d", "layout": _fingerprint(ep)}),
                  "cluster secret"),
    "wrong-secret": (lambda ep, k, n: sign("cluster-b-secret", n, k, {
        "peer": "d", "layout": _fingerprint(ep)}), "cluster secret"),
    "other-endpoint-nonce": (lambda ep, k, n: sign(SECRET, "0" * 32, k, {
        "peer": "d", "layout": _fingerprint(ep)}), "cluster secret"),
    "replayed-into-another-slot": (lambda ep, k, n: sign(SECRET, n, "join/999", {
        "peer": "d", "layout": _fingerprint(ep)}), "cluster secret"),
    "peer-wrong-type": (lambda ep, k, n: sign(SECRET, n, k, {
        "peer": ["d"], "layout": _fingerprint(ep)}), "peer="),
    "peer-missing": (lambda ep, k, n: sign(SECRET, n, k, {"layout": _fingerprint(ep)}),
                     "peer="),
    "peer-oversized": (lambda ep, k, n: sign(SECRET, n, k, {
        "peer": "d" * 1000, "layout": _fingerprint(ep)}), "peer="),
    "layout-wrong-type": (lambda ep, k, n: sign(SECRET, n, k, {"peer": "d", "layout": 7}),
                          "layout="),
    "oversized-message": (lambda ep, k, n: "x" * 100_000, "control messages are at most"),
}


@pytest.mark.parametrize("case", list(BAD_JOINS))
def test_bad_join_is_refused_and_the_endpoint_keeps_pairing(endpoint, case):
    make, expected = BAD_JOINS[case]
    ack = _join(endpoint, lambda key, nonce: make(endpoint, key, nonce))
    assert expected in ack.get("error", ""), ack
    assert endpoint["prod"].refused == 1 and endpoint["prod"].peers() == []
    _good_transfer(endpoint, 21)
    assert endpoint["prod"].peers() == ["decode-21"]


@pytest.mark.parametrize("secret", ["cluster-b-secret", ""])
def test_peer_of_another_cluster_is_refused_then_a_good_peer_pulls(endpoint, secret):
    ep = endpoint
    ep["offers"].add(Offer(5, "r5", [2, 4], 32, time.monotonic() + 60))
    stranger, _ = _peer(ep, name="decode-b", secret=secret)
    with pytest.raises(TransferError, match="cluster secret"):
        stranger.pull(ep["host"], ep["port"], 5, 0, [0, 1])
    assert len(ep["offers"]) == 1 and ep["prod"].peers() == []  # nothing claimed, no pair
    cons = _peer(ep)
    rec = cons[0].pull(ep["host"], ep["port"], 5, 0, [6, 7])
    assert rec.ok and _finished(ep["offers"]) == {"r5"}
    assert torch.equal(cons[1][1][6], ep["p_layers"][1][2])
    assert torch.equal(cons[1][1][7], ep["p_layers"][1][4])


def test_abandoned_join_slot_does_not_block_later_peers():
    """Skipped after two of the endpoint's timeouts (6 s: a short one, but one that outlasts
    a DNS stall); the peer behind it waits longer than that for its answer."""
    prod, p_layers, _ = _engine(seed=1, name="prefill", secret=SECRET, timeout_s=6)
    offers = OfferTable()
    host, port = prod.serve(offers)
    raw = TCPStore(host, port, is_master=False, timeout=WAIT)
    cons, c_layers, _ = _engine(seed=2, name="decode", secret=SECRET, timeout_s=TIMEOUT_S)
    try:
        raw.add("joins", 1)                         # claims join/0, never writes it
        offers.add(Offer(8, "r8", [5], 16, time.monotonic() + 60))
        cons.pull(host, port, 8, 0, [1])            # join/1, behind the abandoned slot
        assert torch.equal(c_layers[0][1], p_layers[0][5])
        assert "claimed but not written" in json.loads(raw.get("joinack/0"))["error"]
    finally:
        cons.close()
        prod.close()


# --------------------------------------------------------------------------- pulls
def _pull(**fields):
    return dict(op="pull", transfer_id=2, start_block=0, num_blocks=3) | fields


BAD_REQUESTS = {
    "not-json": ("raw", b"\xff\xfe{{", "not JSON"),
    "not-an-object": ("raw", b'"pull"', "expected a JSON object"),
    "oversized-message": ("raw", b"[" * 1_000_000, "control messages are at most"),
    "no-secret": ("unsigned", _pull(), "cluster secret"),
    "wrong-secret": ("wrong-secret", _pull(), "cluster secret"),
    "unsigned-close": ("unsigned", {"op": "close"}, "cluster secret"),
    "unsigned-release": ("unsigned", {"op": "release", "transfer_id": 2}, "cluster secret"),
    "op-missing": ("signed", {"transfer_id": 2}, "op="),
    "op-unknown": ("signed", _pull(op="frobnicate"), "op="),
    "op-wrong-type": ("signed", _pull(op=7), "op="),
    "transfer-id-missing": ("signed", {"op": "pull", "start_block": 0, "num_blocks": 3},
                            "transfer_id="),
    "transfer-id-string": ("signed", _pull(transfer_id="2"), "transfer_id="),
    "transfer-id-bool": ("signed", _pull(transfer_id=True), "transfer_id="),
    "transfer-id-float": ("signed", _pull(transfer_id=2.0), "transfer_id="),
    "transfer-id-negative": ("signed", _pull(transfer_id=-1), "transfer_id="),
    "transfer-id-huge": ("signed", _pull(transfer_id=1 << 70), "transfer_id="),
    "release-id-string": ("signed", {"op": "release", "transfer_id": "2"}, "transfer_id="),
    "start-block-missing": ("signed", {"op": "pull", "transfer_id": 2, "num_blocks": 3},
                            "start_block="),
    "start-block-negative": ("signed", _pull(start_block=-1), "start_block="),
    "start-block-past-cache": ("signed", _pull(start_block=N_BLOCKS, num_blocks=1),
                               "start_block="),
    "num-blocks-missing": ("signed", {"op": "pull", "transfer_id": 2, "start_block": 0},
                           "num_blocks="),
    "num-blocks-zero": ("signed", _pull(num_blocks=0), "num_blocks="),
    "num-blocks-negative": ("signed", _pull(num_blocks=-3), "num_blocks="),
    "num-blocks-huge": ("signed", _pull(num_blocks=10**12), "num_blocks="),
    "num-blocks-past-cache": ("signed", _pull(start_block=1, num_blocks=N_BLOCKS),
                              "num_blocks="),
    "num-blocks-list": ("signed", _pull(num_blocks=[3]), "num_blocks="),
}


def _encode(kind: str, body, key: str, nonce: str):
    if kind == "raw":
        return body
    if kind == "unsigned":
        return json.dumps(body)
    return sign(SECRET if kind == "signed" else "cluster-b-secret", nonce, key, body)


def _request(client, kind: str, body) -> dict:
    """Write one message on ``client``'s pair, as its next request; the endpoint's answer."""
    seq, client.seq = client.seq, client.seq + 1
    key = f"pull/{client.pair}/{seq}"
    client.store.set(key, _encode(kind, body, key, client.nonce))
    return _answer(client.store, f"ack/{client.pair}/{seq}")


@pytest.fixture
def paired(endpoint):
    """A good peer already paired (one real transfer done), and offer 2 held: 3 blocks."""
    cons = _peer(endpoint)
    _good_transfer(endpoint, 1, cons=cons)
    assert _finished(endpoint["offers"]) == {"r1"}
    endpoint["offers"].add(Offer(2, "r2", [4, 5, 6], 48, time.monotonic() + 60))
    client = cons[0]._clients[(endpoint["host"], endpoint["port"])]
    return endpoint, cons, client


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_and_the_pair_keeps_serving(paired, case):
    ep, cons, client = paired
    kind, body, expected = BAD_REQUESTS[case]
    t0 = time.monotonic()
    ack = _request(client, kind, body)
    assert expected in ack.get("error", ""), ack
    assert time.monotonic() - t0 < 2.0        # refused on sight, not after a claim wait
    assert ep["prod"].refused == 1
    # Nothing was claimed or freed: offer 2 is still held for the real pull, on the same pair.
    assert len(ep["offers"]) == 1 and ep["offers"].take_finished() == set()
    cons[0].pull(ep["host"], ep["port"], 2, 0, [8, 9, 10])
    assert cons[0]._clients[(ep["host"], ep["port"])] is client and not client.broken
    for s_layer, d_layer in zip(ep["p_layers"], cons[1]):
        assert torch.equal(d_layer[8:11], s_layer[4:7])
    assert _finished(ep["offers"]) == {"r2"}
    _good_transfer(ep, 22)                      # and the accept thread still pairs


def test_claim_past_the_offer_is_refused_and_frees_it(paired):
    """Well-formed and within the cache, but beyond what the offer holds: the decode side's
    request cannot be served, so its blocks are freed; the pair keeps serving."""
    ep, cons, client = paired
    for start, num in ((5, 1), (2, 1), (0, 4), (0, 1)):
        ep["offers"].add(Offer(3, "r3", [7, 8], 32, time.monotonic() + 60))
        ack = _request(client, "signed", _pull(transfer_id=3, start_block=start, num_blocks=num))
        assert "prefill holds 2" in ack.get("error", ""), ack
        assert _finished(ep["offers"]) == {"r3"}
    assert ep["prod"].refused == 4
    cons[0].pull(ep["host"], ep["port"], 2, 1, [0, 1])
    assert torch.equal(cons[1][2][0], ep["p_layers"][2][5])
    assert torch.equal(cons[1][2][1], ep["p_layers"][2][6])


# --------------------------------------------------------------------------- binding
def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_endpoint_listens_on_its_kv_host_only(endpoint):
    assert _listening(endpoint["port"]) == ["0100007F"]    # 127.0.0.1, not 0.0.0.0 or ::


# --------------------------------------------------------------------------- config
def test_cluster_secret_is_shared_hidden_and_drawn_when_empty():
    from cluster.config import (ClusterConfig, ConfigError, DecodeConfig, EngineConfig,
                                PrefillConfig, TransferConfig)
    from app.launcher import with_kv_secret

    engine = EngineConfig(model="/models/tiny")
    cfg = ClusterConfig(PrefillConfig(engine), DecodeConfig(engine))
    a, b = with_kv_secret(cfg), with_kv_secret(cfg)
    secret = a.prefill.transfer.secret
    assert len(secret) == 32 and secret == a.decode.transfer.secret
    assert secret != b.prefill.transfer.secret              # random per cluster
    assert secret not in repr(a) and "secret" not in repr(a.prefill.transfer)
    mine = replace(cfg, decode=DecodeConfig(engine, TransferConfig(secret="s1")))
    assert with_kv_secret(mine).prefill.transfer.secret == "s1"
    with pytest.raises(ConfigError, match="secret differ"):
        with_kv_secret(replace(mine, prefill=PrefillConfig(engine, TransferConfig(secret="s2"))))
    with pytest.raises(ConfigError, match="TransferConfig.secret"):
        TransferConfig(secret=123)
