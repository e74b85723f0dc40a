"""The KV endpoint (issue 14, item 2): one per engine, passed explicitly, never waiting.

No engine. The endpoint a worker creates with its engine is what both sides of the split
connector use (it reaches them in the KV transfer config, never a process-global); its one
release route never blocks the prefill actor's event loop, and an offer released before it
arrives is freed when it arrives. Two endpoints on loopback (a real gloo pair) check the
decode side's release message, membership pruning and transfer records.
"""

from __future__ import annotations

import asyncio
import copy
import pickle
import time
from types import SimpleNamespace

import pytest
import torch

from kv_transfer.connector import PreftKVConnector
from kv_transfer.endpoint import KVEndpoint
from cluster.messages import KVHandle
from kv_transfer.transport import Offer, TorchDistTransport, TransferError

BLOCK = 4
SHAPE = (2, 16, 64)   # kv_heads, block_size, 2*head_size
SECRET = "endpoint-test-secret"


def _connector(endpoint: KVEndpoint):
    """Both roles of the connector vLLM would build for ``endpoint``'s engine."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    xfer = SimpleNamespace(engine_id=endpoint.engine_id, kv_role=endpoint.role,
                           kv_connector_extra_config={"endpoint": endpoint})
    cfg = SimpleNamespace(kv_transfer_config=xfer, cache_config=SimpleNamespace(block_size=BLOCK))
    return (PreftKVConnector(cfg, KVConnectorRole.SCHEDULER),
            PreftKVConnector(cfg, KVConnectorRole.WORKER))


def _prefill_worker(endpoint: KVEndpoint):
    """What PrefillWorker's release paths use of the actor: its endpoint."""
    return SimpleNamespace(kv=endpoint, worker_id=endpoint.engine_id)


# --------------------------------------------------------------------------- release
def test_prefill_release_of_an_unknown_transfer_never_blocks_the_event_loop():
    """The router releases a transfer decode never pulled; it may already be gone (pulled,
    expired) or not offered yet. The actor's event loop must not wait for it (the old
    route waited up to 5 s for the offer, on the loop)."""
    from prefill_worker.worker import PrefillWorker

    ep = KVEndpoint("prefill-t", "kv_producer", hold_ttl_s=60, secret="s")
    ticks: list[float] = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def run():
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        freed = await PrefillWorker.release(_prefill_worker(ep), 4242)
        took = time.monotonic() - t0
        await asyncio.sleep(0.05)
        tick.cancel()
        return freed, took

    freed, took = asyncio.run(run())
    assert freed is False and took < 0.5
    assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.5   # the loop kept running


def test_offer_released_before_it_arrives_is_freed_when_it_arrives():
    ep = KVEndpoint("prefill-t", "kv_producer", hold_ttl_s=60, secret="s")
    assert ep.release(7) is False and ep.take_finished() == set()
    ep.wake.clear()
    ep.offers.add(Offer(7, "r7", [1, 2], 8, expires_at=time.monotonic() + 60))
    assert len(ep.offers) == 0                      # never held
    assert ep.wake.is_set()                         # the engine loop steps to free it
    assert ep.take_finished() == {"r7"}
    ep.offers.add(Offer(8, "r8", [3], 4, expires_at=time.monotonic() + 60))
    assert len(ep.offers) == 1 and ep.take_finished() == set()   # others are held as usual


def test_held_offer_released_once_and_a_claim_for_it_gives_up_at_once():
    ep = KVEndpoint("prefill-t", "kv_producer", hold_ttl_s=60, secret="s")
    tid, held = ep.hold("r1", [4, 5], 8)
    ep.wake.clear()
    assert ep.release(tid) is True and ep.wake.is_set()
    assert ep.release(tid) is False                 # the second route finds nothing
    assert ep.take_finished() == {"r1"} and ep.take_finished() == set()
    t0 = time.monotonic()
    assert ep.offers.claim(tid, timeout=5.0) is None
    assert time.monotonic() - t0 < 0.5              # released: no wait for a late offer


def test_request_ended_at_prefill_frees_its_blocks_without_waiting():
    """PrefillWorker._handle: EOS or a stop string in the first token -- nobody will pull."""
    from prefill_worker.worker import PrefillWorker

    ep = KVEndpoint("prefill-t", "kv_producer", hold_ttl_s=60, secret="s")
    tid, _ = ep.hold("req-eos", [1], 3)
    out = SimpleNamespace(kv_transfer_params={"transfer_id": tid, "num_tokens": 3,
                                              "num_blocks": 1})
    t0 = time.monotonic()
    assert PrefillWorker._handle(_prefill_worker(ep), out, "stop") is None
    assert time.monotonic() - t0 < 0.5
    assert len(ep.offers) == 0 and ep.take_finished() == {"req-eos"}


def test_unreleased_offers_still_expire():
    ep = KVEndpoint("prefill-t", "kv_producer", hold_ttl_s=60, secret="s")
    ep.offers.add(Offer(9, "r9", [1], 4, expires_at=time.monotonic() - 1))
    assert ep.take_finished() == {"r9"} and ep.offers.expired == 1


# --------------------------------------------------------------------------- split connector
def test_prefill_connector_sides_meet_only_through_the_endpoint():
    from vllm.v1.request import RequestStatus

    ep = KVEndpoint("prefill-x", "kv_producer", hold_ttl_s=60, secret="s")
    sched, worker = _connector(ep)
    assert sched.worker is None and worker.scheduler is None
    req = SimpleNamespace(request_id="r1", kv_transfer_params={"do_remote_decode": True},
                          is_finished=lambda: True, status=RequestStatus.FINISHED_STOPPED,
                          num_computed_tokens=10)
    delay, params = sched.request_finished(req, [5, 6, 7, 8])
    assert delay and params["num_tokens"] == 10 and params["num_blocks"] == 3
    assert len(ep.offers) == 1                      # held on the endpoint, at once
    assert worker.get_transfer_results(set()).finished_sending == set()
    assert ep.release(params["transfer_id"]) is True
    assert worker.get_transfer_results(set()).finished_sending == {"r1"}


def test_connector_needs_the_endpoint_its_worker_created():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    def config(extra, role="kv_consumer"):
        xfer = SimpleNamespace(engine_id="d", kv_role=role, kv_connector_extra_config=extra)
        return SimpleNamespace(kv_transfer_config=xfer,
                               cache_config=SimpleNamespace(block_size=BLOCK))

    with pytest.raises(RuntimeError, match="needs the KVEndpoint its worker created"):
        PreftKVConnector(config({}), KVConnectorRole.SCHEDULER)
    with pytest.raises(RuntimeError, match="kv_role 'kv_producer'"):
        PreftKVConnector(config({"endpoint": KVEndpoint("d", "kv_consumer", secret="s")}, "kv_producer"),
                         KVConnectorRole.WORKER)


def test_endpoint_is_never_copied_to_another_process():
    ep = KVEndpoint("p", "kv_producer", secret=SECRET)
    with pytest.raises(TypeError, match="in-process"):
        pickle.dumps(ep)
    with pytest.raises(TypeError, match="in-process"):
        copy.deepcopy({"endpoint": ep})
    assert SECRET not in repr(ep)


def test_one_transport_and_the_config_names_it():
    from cluster.config import _KV_TRANSPORTS, ConfigError, TransferConfig

    assert _KV_TRANSPORTS == (TorchDistTransport.name,)
    with pytest.raises(ConfigError, match="TransferConfig.transport='rdma'"):
        TransferConfig(transport="rdma")
    with pytest.raises(ValueError, match="unknown transport 'rdma'"):
        KVEndpoint("p", "kv_producer", transport="rdma", secret="s")
    with pytest.raises(ValueError, match="role must be"):
        KVEndpoint("p", "kv_both", secret="s")


# --------------------------------------------------------------------------- over a real pair
def _opened(name: str, role: str, seed: int) -> tuple[KVEndpoint, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn((12, *SHAPE), generator=g) for _ in range(2)]
    ep = KVEndpoint(name, role, timeout_s=10, hold_ttl_s=60, secret=SECRET)
    ep.open(layers, block_size=SHAPE[1])
    return ep, layers


@pytest.fixture
def pair():
    p, p_layers = _opened("prefill", "kv_producer", 1)
    d, d_layers = _opened("decode", "kv_consumer", 2)
    yield p, p_layers, d, d_layers
    d.close()
    p.close()


def _handle(p: KVEndpoint, transfer_id: int, num_blocks: int) -> KVHandle:
    host, port = p.address
    return KVHandle(transfer_id, host, port, p.engine_id, SHAPE[1] * num_blocks, num_blocks,
                    p.layout_fingerprint)


def test_decode_release_takes_the_same_route(pair):
    """Decode's release message reaches the holder's one release route: answered at once,
    even for an offer not there yet, which is then freed on arrival; a pull of a released
    transfer is refused at once instead of waiting for the offer."""
    p, p_layers, d, d_layers = pair
    assert p.ready.is_set() and d.ready.is_set() and p.kv_address.endswith(str(p.address[1]))
    d.send_release(_handle(p, 99, 1))               # forms the pair, then releases
    p.offers.add(Offer(99, "r99", [3], SHAPE[1], expires_at=time.monotonic() + 60))
    assert len(p.offers) == 0 and p.take_finished() == {"r99"}
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="unknown or expired"):
        d.pull(_handle(p, 99, 1), 0, [0])
    assert time.monotonic() - t0 < 2.5              # the claim wait would be 5 s
    tid, _ = p.hold("r5", [4, 5], 2 * SHAPE[1])
    d.pull(_handle(p, tid, 2), 0, [6, 7])
    for src, dst in zip(p_layers, d_layers):
        assert torch.equal(dst[6], src[4]) and torch.equal(dst[7], src[5])
    rec = d.pop_record(tid)
    assert rec is not None and rec.ok and rec.num_blocks == 2
    assert [r.ok for r in d.records()] == [False, True]


def test_membership_prunes_pairs_on_both_sides(pair):
    p, _, d, _ = pair
    d.send_release(_handle(p, 1, 1))                # one pair
    prefill = SimpleNamespace(worker_id="prefill", role="prefill", kv_address=p.kv_address)
    decode = SimpleNamespace(worker_id="decode", role="decode", kv_address="")
    d.prune({"prefill": prefill, "decode": decode})
    p.prune({"prefill": prefill, "decode": decode})
    assert len(d.transport._clients) == 1 and p.transport.peers() == ["decode"]
    p.prune({"prefill": prefill})                   # decode left, from prefill's view
    deadline = time.monotonic() + 5
    while p.transport.peers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.transport.peers() == []
    d.prune({"decode": decode})                     # prefill left, from decode's view
    assert d.transport._clients == {}
