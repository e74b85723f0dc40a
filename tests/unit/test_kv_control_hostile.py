"""The KV control plane under hostile peers, both directions (issues 12 and 26).

Over real pairs on loopback (ZeroMQ with CURVE for control; gloo, memfd shared memory or
the CUDA IPC protocol for bytes):
- a process without the cluster's secret cannot pair, pull, release or close anything;
- a process that writes the old protocol's keys (``fin``, ``done``, ``joinack`` with CUDA
  IPC handles, shared-memory acks naming another transfer's segment) into the rendezvous
  store changes nothing: no block is freed early, no foreign KV is copied, both ends keep
  serving;
- an authenticated but broken peer's malformed or out-of-place messages are refused with
  an error it can read, and the pair and the endpoint keep serving.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
import torch
from torch.distributed import TCPStore

from kv_transfer import control, cuda_ipc, shm
from kv_transfer.control import (Confirm, Done, Join, PairLost, Pull, Refused, Release,
                                 TransferError)
from kv_transfer.transport import Offer, OfferTable
from test_transport import _engine, _finished

SECRET = "cluster-a-secret"
TIMEOUT_S = 6


@pytest.fixture
def endpoint():
    prod, p_layers, _ = _engine(seed=1, name="prefill", secret=SECRET, timeout_s=TIMEOUT_S)
    offers = OfferTable()
    host, port = prod.serve(offers)
    peers: list = []
    yield dict(prod=prod, p_layers=p_layers, offers=offers, host=host, port=port, peers=peers)
    for t in peers:
        t.close()
    prod.close()


def _peer(ep, name="decode", secret=SECRET, seed=2, shared_memory=True):
    t, layers, _ = _engine(seed=seed, name=name, secret=secret, timeout_s=TIMEOUT_S,
                           shared_memory=shared_memory)
    ep["peers"].append(t)
    return t, layers


def _good_transfer(ep, transfer_id, src=(3, 9), dst=(0, 11), cons=None):
    """Offer ``src`` and pull it into ``dst`` (a fresh good peer unless ``cons``): real bytes."""
    cons, c_layers = cons or _peer(ep, name=f"decode-{transfer_id}", seed=transfer_id)
    ep["offers"].add(Offer(transfer_id, f"r{transfer_id}", list(src), 16 * len(src),
                           time.monotonic() + 60))
    rec = cons.pull(ep["host"], ep["port"], transfer_id, 0, list(dst))
    assert rec.ok
    for s_layer, d_layer in zip(ep["p_layers"], c_layers):
        for s, d in zip(src, dst):
            assert torch.equal(d_layer[d], s_layer[s])


class _Raw:
    """A bare CURVE client of the endpoint: with the secret, an authenticated peer that
    may send anything; with another, a stranger."""

    def __init__(self, ep, secret=SECRET):
        import zmq

        self.ctx = zmq.Context()
        self.client = control.ControlClient(self.ctx, secret, ep["host"], ep["port"])
        self.sock = self.client._sock

    def ask(self, msg, timeout=3.0):
        self.sock.send(msg if isinstance(msg, bytes) else control.encode(msg))
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return control.decode_answer(self.sock.recv())

    def close(self):
        self.client.close()
        self.ctx.term()


# --------------------------------------------------------------------------- strangers
def test_a_peer_without_the_secret_cannot_pair_pull_or_release(endpoint):
    ep = endpoint
    ep["offers"].add(Offer(5, "r5", [2, 4], 32, time.monotonic() + 60))
    stranger, _ = _peer(ep, name="decode-b", secret="cluster-b-secret")
    with pytest.raises(PairLost, match="secret"):
        stranger.pull(ep["host"], ep["port"], 5, 0, [0, 1])
    raw = _Raw(ep, secret="cluster-b-secret")
    try:     # the handshake fails: nothing it sends reaches the endpoint
        assert raw.ask(Release(0, 0, 5), timeout=1.0) is None
        assert raw.ask(Join("x", ep["prod"].layout.fingerprint()), timeout=1.0) is None
    finally:
        raw.close()
    assert len(ep["offers"]) == 1 and ep["prod"].peers() == []   # nothing claimed, no pair
    cons = _peer(ep)
    assert cons[0].pull(ep["host"], ep["port"], 5, 0, [6, 7]).ok
    assert _finished(ep["offers"]) == {"r5"}
    assert torch.equal(cons[1][1][6], ep["p_layers"][1][2])


def test_the_transport_refuses_to_run_without_a_secret():
    with pytest.raises(ValueError, match="TransferConfig.secret"):
        _engine(name="no-secret", secret="")


# --------------------------------------------------------------------------- the store
def _forge_everything(host: str, port: int, stop: threading.Event, seg_name: str) -> None:
    """What the old protocol read from the store, written by a process that can reach it."""
    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=5))
    ipc = {"dtype": "float32", "storages": [{"handle": "AA==", "size": 1 << 40,
                                             "offset": 1 << 62, "rc_offset": 0}],
           "layers": []}
    while not stop.is_set():
        for n in range(3):
            store.set(f"joinack/{n}", msgspec.json.encode({"ok": True, "mode": "cuda_ipc",
                                                           "ipc": ipc}))
            for seq in range(4):
                store.set(f"fin/ack/{n}/{seq}", "done")
                store.set(f"done/ack/{n}/{seq}", "1")
                store.set(f"ack/{n}/{seq}", msgspec.json.encode(
                    {"ok": True, "segment": seg_name, "chunks": 0}))
                store.set(f"ack/{n}/{seq}/0", msgspec.json.encode({"ok": True}))
        time.sleep(0.01)


@pytest.mark.parametrize("path", ["shm", "gloo", "cuda_ipc"])
def test_forged_store_keys_free_nothing_early_and_copy_nothing_foreign(endpoint, monkeypatch,
                                                                       path):
    """While a raw store client keeps writing every key the old protocol trusted, each pull
    still moves exactly its own blocks, and prefill frees them only after the real peer
    said so (cuda_ipc: its copy, slowed here, had finished)."""
    ep = endpoint
    copied_at: list[float] = []
    if path == "cuda_ipc":
        ep["prod"].same_host_mode = "cuda_ipc"
        monkeypatch.setattr(cuda_ipc, "export", lambda layers: {"exported": True})
        monkeypatch.setattr(cuda_ipc, "open_layers", lambda desc, **kw: ep["p_layers"])
        real_copy = cuda_ipc.copy_blocks

        def slow_copy(*a):
            time.sleep(0.5)        # the window the forged fin used to exploit
            real_copy(*a)
            copied_at.append(time.monotonic())
        monkeypatch.setattr(cuda_ipc, "copy_blocks", slow_copy)
    cons, c_layers = _peer(ep, shared_memory=path != "gloo")
    if path == "cuda_ipc":
        cons.same_host_mode = "cuda_ipc"
    stop = threading.Event()
    forger = threading.Thread(target=_forge_everything, args=(
        ep["host"], ep["prod"]._store.port, stop, "preft-kv-1-0123456789abcdef"))
    forger.start()
    freed_at: dict[str, float] = {}
    try:
        for tid, src, dst in ((1, [3, 9], [0, 11]), (2, [4, 5, 6], [1, 2, 3])):
            ep["offers"].add(Offer(tid, f"r{tid}", src, 16 * len(src), time.monotonic() + 60))
            watcher = threading.Thread(target=lambda: freed_at.update(
                {r: time.monotonic() for r in _finished(ep["offers"], 8)}))
            watcher.start()
            rec = cons.pull(ep["host"], ep["port"], tid, 0, dst)
            watcher.join()
            assert rec.ok and rec.transport == path
            for s_layer, d_layer in zip(ep["p_layers"], c_layers):
                assert torch.equal(d_layer[dst], s_layer[src])      # its own KV, nothing else
            assert f"r{tid}" in freed_at
            if path == "cuda_ipc":
                assert freed_at[f"r{tid}"] >= copied_at[-1]         # not freed early
    finally:
        stop.set()
        forger.join()
    _good_transfer(ep, 30, cons=(cons, c_layers))                   # both ends keep serving
    assert ep["prod"].refused == 0


# --------------------------------------------------------------------------- authenticated peers
BAD_MESSAGES = {
    "not-msgpack": (b"\xc1\xc1\xc1", "malformed"),
    "unknown-tag": (msgspec.msgpack.encode({"type": "frobnicate", "pair": 0}), "malformed"),
    "not-an-object": (msgspec.msgpack.encode([1, 2, 3]), "malformed"),
    "oversized": (b"\x00" * (control.MAX_MESSAGE + 1), "control messages are at most"),
    "far-oversized": (b"\x00" * (control.MAX_MESSAGE + 100), None),  # ZeroMQ drops it
    "pull-id-string": (msgspec.msgpack.encode({"type": "pull", "pair": 0, "seq": 1,
                                               "transfer_id": "2", "start_block": 0,
                                               "num_blocks": 1}), "transfer_id"),
    "pull-id-negative": (Pull(0, 1, -1, 0, 1), "transfer_id"),
    "pull-id-huge": (msgspec.msgpack.encode({"type": "pull", "pair": 0, "seq": 1,
                                             "transfer_id": (1 << 64) - 1, "start_block": 0,
                                             "num_blocks": 1}), "transfer_id"),
    "pull-zero-blocks": (Pull(0, 1, 2, 0, 0), "num_blocks"),
    "pull-huge-blocks": (Pull(0, 1, 2, 0, 1 << 30), "num_blocks"),
    "join-peer-oversized": (Join("d" * 1000, "L"), "peer"),
    "confirm-unknown-mode": (msgspec.msgpack.encode({"type": "confirm", "pair": 0,
                                                     "mode": "rdma"}), "mode"),
    "another-connections-pair": (Release(0, 1, 2), "not this connection's"),
    "pair-never-made": (Pull(99, 0, 2, 0, 1), "not this connection's"),
}


@pytest.fixture
def paired(endpoint):
    """A good peer already paired (one real transfer done), and offer 2 held: 3 blocks."""
    cons = _peer(endpoint)
    _good_transfer(endpoint, 1, cons=cons)
    assert _finished(endpoint["offers"]) == {"r1"}
    endpoint["offers"].add(Offer(2, "r2", [4, 5, 6], 48, time.monotonic() + 60))
    client = cons[0]._clients[(endpoint["host"], endpoint["port"])]
    return endpoint, cons, client


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_a_bad_message_is_refused_and_everyone_keeps_serving(paired, case):
    ep, cons, client = paired
    raw = _Raw(ep)
    try:
        msg, expected = BAD_MESSAGES[case]
        t0 = time.monotonic()
        answer = raw.ask(msg, timeout=2.0)
        if expected is None:
            assert answer is None                              # the frame never arrived
        else:
            assert isinstance(answer, Refused) and expected in answer.error, answer
            assert time.monotonic() - t0 < 2.0
    finally:
        raw.close()
    # Nothing was claimed or freed: offer 2 is still held for the real pull, on the same pair.
    assert len(ep["offers"]) == 1 and ep["offers"].take_finished() == set()
    cons[0].pull(ep["host"], ep["port"], 2, 0, [8, 9, 10])
    assert cons[0]._clients[(ep["host"], ep["port"])] is client and not client.broken
    for s_layer, d_layer in zip(ep["p_layers"], cons[1]):
        assert torch.equal(d_layer[8:11], s_layer[4:7])
    assert _finished(ep["offers"]) == {"r2"}
    _good_transfer(ep, 22)                      # and the endpoint still pairs


def test_out_of_place_messages_on_a_pair_are_refused(endpoint):
    ep = endpoint
    raw = _Raw(ep)
    try:
        joined = raw.ask(Join("raw-peer", ep["prod"].layout.fingerprint(), same_host=True))
        assert isinstance(joined, control.Joined) and joined.token
        # shm without having proved the same host (never connected to the fd socket)
        refused = raw.ask(Confirm(joined.pair, "shm"), timeout=8)
        assert isinstance(refused, Refused) and "proof" in refused.error
    finally:
        raw.close()
    raw = _Raw(ep)
    try:
        joined = raw.ask(Join("raw-peer-2", ep["prod"].layout.fingerprint()))
        assert isinstance(raw.ask(Confirm(joined.pair, "group")), control.Confirmed)
    finally:
        raw.close()
    ep["offers"].add(Offer(4, "r4", [1], 16, time.monotonic() + 60))
    _good_transfer(ep, 23)
    assert len(ep["offers"]) == 1          # offer 4 untouched by any of it


def test_a_request_out_of_order_or_a_done_never_lent_changes_nothing(paired):
    ep, cons, client = paired
    client.control.send(Done(client.pair, 0))      # nothing was lent under seq 0
    client.control.send(Release(client.pair, client.seq + 5, 2))   # skips ahead: refused
    with pytest.raises(TransferError):
        client.control.receive(2.0, client.seq + 5)
    assert len(ep["offers"]) == 1 and ep["offers"].take_finished() == set()
    cons[0].pull(ep["host"], ep["port"], 2, 0, [8, 9, 10])
    assert torch.equal(cons[1][0][9], ep["p_layers"][0][5])


def test_a_segment_the_pair_was_not_sent_is_never_mapped():
    """Decode maps only segments that arrived on its own pair's descriptor channel: an
    answer naming any other (another transfer's, another pair's) fails the pull."""
    server = shm.FdServer()
    mine, other = shm.Segment.create(256, torch.float32), shm.Segment.create(256, torch.float32)
    try:
        token = server.offer(0)
        chan = shm.FdChannel(server.name, token, 1.0)
        conn = server.channel(0, 2.0)
        shm.send_segment(conn, mine)
        got = chan.receive(torch.float32)
        assert got.id == mine.id
        with pytest.raises(OSError):               # nothing else comes: times out
            chan.receive(torch.float32)
        assert other.id != got.id
        got.close()
        chan.close()
        conn.close()
    finally:
        mine.close()
        other.close()
        server.close()


def test_an_authenticated_pull_past_the_offer_is_refused_and_frees_it(paired):
    """Well-formed, but beyond what the offer holds: its blocks are freed, the pair serves."""
    ep, cons, client = paired
    for start, num in ((5, 1), (2, 1), (0, 4), (0, 1)):
        ep["offers"].add(Offer(3, "r3", [7, 8], 32, time.monotonic() + 60))
        seq = client.seq
        client.seq += 1
        client.control.send(Pull(client.pair, seq, 3, start, num))
        with pytest.raises(TransferError, match="prefill holds 2"):
            client.control.receive(3.0, seq)
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
    assert _listening(endpoint["prod"]._store.port) == ["0100007F"]


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
