"""Tensor-parallel KV endpoints (kv_transfer/ranks.py) without engines: what crosses to the
ranks, how the ranks' reports add up, and the rank-count check at pairing."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from cluster.messages import KVHandle
from kv_transfer.endpoint import KVEndpoint
from kv_transfer.ranks import RankedEndpoint, RankReport, RankSpec
from kv_transfer.transport import TransferRecord


def _spec(role="kv_producer", tp=2, secret="s3cr3t-value"):
    return RankSpec("prefill-0", role, tp, "127.0.0.1", 30.0, 120.0, "torch_dist", True,
                    secret=secret)


def _handle(ports=(), port=7000):
    return KVHandle(5, "10.0.0.1", port, "prefill-0", 40, 3, "L4/x", rank_ports=ports)


def test_the_ranked_endpoint_pickles_to_its_spec_and_hides_the_secret():
    ep = RankedEndpoint(_spec())
    back = pickle.loads(pickle.dumps(ep))
    assert back == _spec()                     # what vLLM's executor sends each rank
    assert "s3cr3t" not in repr(back) and "s3cr3t" not in repr(ep)
    rank1 = back.open_rank(1)
    assert (rank1.rank, rank1.tp_size, rank1.layerwise) == (1, 2, False)


def test_a_decode_rank_pulls_from_the_prefill_rank_of_its_number():
    d1 = KVEndpoint("decode-0", "kv_consumer", rank=1, tp_size=2)
    assert d1.peer(_handle(ports=(7001, 7002))) == ("10.0.0.1", 7002)
    single = KVEndpoint("decode-1", "kv_consumer")
    assert single.peer(_handle()) == ("10.0.0.1", 7000)


@pytest.mark.parametrize("ports,tp", [((7001, 7002), 1), ((), 2), ((1, 2, 3, 4), 2)])
def test_unequal_rank_counts_are_refused_naming_both_sizes(ports, tp):
    d = KVEndpoint("decode-0", "kv_consumer", rank=0, tp_size=tp)
    with pytest.raises(ValueError) as ei:
        d.peer(_handle(ports=ports))
    msg = str(ei.value)
    assert f"tensor_parallel_size={len(ports) or 1}" in msg
    assert f"tensor_parallel_size={tp}" in msg and "same size" in msg


def _rec(tid, nbytes, seconds, ok=True, error=""):
    return TransferRecord(tid, "prefill-0", 3, nbytes, seconds, ok, error, "gloo")


def test_a_transfer_record_is_the_sum_of_every_ranks_part():
    ep = RankedEndpoint(_spec(role="kv_consumer"))
    ep.on_output(SimpleNamespace(finished_sending=None, kv_connector_worker_meta=RankReport(
        [_rec(9, 100, 0.5)], 0)))
    assert ep.pop_record(9) is None            # rank 1's part not reported yet
    ep.on_output(SimpleNamespace(finished_sending=None, kv_connector_worker_meta=RankReport(
        [_rec(9, 100, 0.7, ok=False, error="rank 1 lost its peer")], 2)))
    rec = ep.pop_record(9)
    assert (rec.bytes, rec.seconds, rec.ok) == (200, 0.7, False)
    assert "rank 1 lost its peer" in rec.error
    assert ep.offers.expired == 2
    assert RankReport([_rec(1, 1, 1)], 1).aggregate(RankReport([_rec(1, 2, 1)], 2)).expired == 3


def test_holds_and_releases_reach_the_ranks_through_the_next_steps_metadata():
    ep = RankedEndpoint(_spec())
    tid, held = ep.hold("req-1", [4, 5, 6], 40)
    assert held and len(ep.offers) == 1
    assert ep.release(tid) is False            # freed when the ranks report it
    holds, drops, members = ep.take_outbox()
    assert holds == [(tid, "req-1", [4, 5, 6], 40)] and drops == [tid] and members is None
    assert ep.take_outbox() == ([], [], None)
    ep.on_output(SimpleNamespace(finished_sending={"req-1"}, kv_connector_worker_meta=None))
    assert len(ep.offers) == 0


def test_decode_prunes_every_rank_port_of_a_live_prefill_worker():
    d = KVEndpoint("decode-0", "kv_consumer", rank=1, tp_size=2)
    closed = []
    d.transport = SimpleNamespace(prune=lambda live_addresses: closed.append(live_addresses))
    d.prune({"p": SimpleNamespace(role="prefill", worker_id="prefill-0",
                                  kv_address="10.0.0.1:7001+7002")})
    assert closed == [{("10.0.0.1", 7001), ("10.0.0.1", 7002)}]


def test_parts_a_rank_never_reports_are_forgotten_in_bounded_memory(monkeypatch):
    import kv_transfer.ranks as ranks

    monkeypatch.setattr(ranks, "_MAX_RECORDS", 5)
    ep = RankedEndpoint(_spec(role="kv_consumer"))
    for tid in range(20):   # only rank 0's part of each arrives
        ep.on_output(SimpleNamespace(finished_sending=None,
                                     kv_connector_worker_meta=RankReport([_rec(tid, 1, 0.1)])))
    assert len(ep._parts) <= 6 and ep.records() == []
