"""The ``hot_set`` prefill placement (router/pool.py ``HotSet``, router/hot_set.py), its
trace simulation (bench/routing_sim.py), the router's pin sync and the worker's pins
(prefill_worker/lora_pins.py, ``AdapterHost`` mirror); no engine, no Ray."""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from bench.routing import zipf_mix
from bench.routing_sim import SimEngine, compare, simulate
from cluster.config import ConfigError, EngineConfig, PrefillConfig, RouterConfig
from cluster.messages import WorkerInfo
from router.hot_set import DecayedCounts, Homes, MissCost, assign_homes
from router.pin_sync import PinSync
from router.pool import POLICIES, HotSet, Locality, WorkerHandle, load_bound


def _workers(n: int) -> list[WorkerHandle]:
    return [WorkerHandle(WorkerInfo(f"p{i}", "prefill", "L", 1, 1, None, True, 0.0, 0), None)
            for i in range(n)]


@pytest.mark.parametrize("adapters, floor", [(16, 0.9), (64, 0.84)])
def test_simulated_hit_rate_beats_locality_on_the_bench_mix(adapters, floor):
    """The bench's mix (2 workers, host tier 4, Zipf 1.1, 300 requests, concurrency 4),
    simulated: hot_set gets close to the static partition, locality does not."""
    res = compare(adapters, policies=["locality", "hot_set"])
    assert res["hot_set"]["vs_static"] >= floor
    assert res["locality"]["vs_static"] < 0.75
    assert res["hot_set"]["hit_rate"] > res["locality"]["hit_rate"] + 0.15


def test_hot_adapters_never_spread_past_max_spread():
    pol = HotSet(max_spread=2, pin_slots=3, host_tier=4)
    ws = _workers(4)
    _, mix = zipf_mix(32, 1.1, 2000, seed=3)
    rng, inflight, spread = random.Random(1), [], {}
    for name in mix:
        if len(inflight) >= 12:
            inflight.pop(rng.randrange(len(inflight))).outstanding -= 1
        w = pol.pick(ws, name)
        w.outstanding += 1
        inflight.append(w)
        if name in pol.homes.pinned:   # hot when placed
            spread.setdefault((name, pol.homes.pinned[name]), set()).add(w.worker_id)
    assert spread and max(len(s) for s in spread.values()) <= 2
    assert max(len(s) for s in spread.values()) == 2   # it does spill, within the cap


def test_bounded_load_holds_for_hot_and_cold_adapters():
    pol = HotSet(max_spread=2, pin_slots=1, host_tier=4, epsilon=0.25)
    ws = _workers(2)
    for _ in range(20):
        pol.pick(ws, "hot")
    home = next(w for w in ws if w.worker_id == pol.homes.pinned["hot"])
    other = next(w for w in ws if w is not home)
    home.outstanding = 10
    assert home.outstanding >= load_bound(ws, 0.25)
    assert pol.pick(ws, "hot") is other         # over the bound: spills within max_spread
    assert pol.pick(ws, "cold-x") is other
    home.outstanding, other.outstanding = 0, 0
    assert pol.pick(ws, "hot") is home


def test_a_resident_adapter_outweighs_a_small_queue():
    """Score = outstanding + miss cost: home with one more request still wins."""
    pol = HotSet(max_spread=2, pin_slots=1, host_tier=4, miss_cost=2.0)
    ws = _workers(2)
    for _ in range(20):
        pol.pick(ws, "hot")
    home = next(w for w in ws if w.worker_id == pol.homes.pinned["hot"])
    home.outstanding = 2
    assert pol.pick(ws, "hot") is home          # 2 queued vs a store fetch worth 3
    home.outstanding = 4
    assert pol.pick(ws, "hot") is not home


def test_pins_fit_the_host_tier_and_spare_the_batch_slots():
    eng = EngineConfig(model="m")
    assert PrefillConfig(engine=eng, max_loras=1, max_cpu_loras=4).pinnable_loras == 3
    assert PrefillConfig(engine=eng, max_loras=4, max_cpu_loras=4).pinnable_loras == 0
    assert PrefillConfig(engine=eng, max_loras=2, max_cpu_loras=4).pinnable_loras == 2
    assert PrefillConfig(engine=eng).pinnable_loras == 24       # 32 host, 8 batch slots
    cfg = PrefillConfig(engine=eng, max_loras=1, max_cpu_loras=4)
    pol = HotSet.from_config(RouterConfig(max_spread=3), cfg)
    assert (pol.pin_slots, pol.max_spread) == (3, 3)
    _, mix = zipf_mix(64, 1.1, 500)
    for name in mix:
        pol.pick(_workers(2), name)
        pins = pol.pins()
        assert all(len(p) <= cfg.pinnable_loras < cfg.max_cpu_loras for p in pins.values())
    assert sum(map(len, pins.values())) == 6
    with pytest.raises(ValueError, match="no unpinned slot"):
        SimEngine(4).set_pins(("a", "b", "c", "d"))


def test_router_config_fields_are_validated():
    assert RouterConfig(prefill_policy="hot_set").prefill_policy == "hot_set"
    with pytest.raises(ConfigError, match="RouterConfig.max_spread=0"):
        RouterConfig(max_spread=0)
    with pytest.raises(ConfigError, match="RouterConfig.pin_sync_s"):
        RouterConfig(pin_sync_s=0)
    with pytest.raises(ConfigError, match="hot_set"):
        RouterConfig(prefill_policy="hottest")
    assert "hot_set" in POLICIES and POLICIES["locality"].from_config(RouterConfig(), None)


def test_decayed_counts_and_sticky_balanced_homes():
    c = DecayedCounts(half_life=10)
    c.add("a")
    for _ in range(10):
        c.add("b")
    assert c.counts["a"] == pytest.approx(c.inc / c.growth / 2, rel=1e-9)   # 10 requests on: half
    for name, n in (("h1", 50), ("h2", 30), ("h3", 20), ("h4", 10), ("w", 5), ("x", 1)):
        for _ in range(n):
            c.add(name)
    homes = assign_homes(c, ["p0", "p1"], 2, Homes())
    assert len(homes.pinned) == 4 and set(homes.pinned.values()) == {"p0", "p1"}
    assert homes.cold in ("p0", "p1") and set(homes.warm.values()) == {"p0", "p1"} - {homes.cold}
    assert assign_homes(c, ["p0", "p1"], 2, homes) == homes          # sticky
    assert assign_homes(c, ["p0", "p1"], 0, Homes()).pinned == {}


def test_miss_cost_by_tier():
    m = MissCost(disk=2.0)
    assert (m("engine"), m("disk"), m("store")) == (0.0, 2.0, 3.0)


def test_simulated_pins_are_never_evicted():
    e = SimEngine(3)
    e.set_pins(("a", "b"))
    for name in "xyzxyz":
        e.use(name)
    assert {"a", "b"} <= set(e.lru) and len(e.lru) == 3
    r = simulate(Locality(), ["a"] * 10)
    assert r["hits"] == 10 - r["spread"]["a"]   # one first load per worker it landed on


# ---------------------------------------------------------------- the router's pin sync
class _Actor:
    def __init__(self):
        self.calls = []
        self.pin_adapters = SimpleNamespace(remote=self._remote)

    def _remote(self, refs):
        self.calls.append(tuple(r.name for r in refs))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self.calls[-1])
        return fut


def test_pin_sync_sends_changes_only_and_clears_without_pins():
    ws = _workers(2)
    for w in ws:
        w.actor = _Actor()
    rec = lambda n: SimpleNamespace(name=n, version=1, kind="lora_p", sha256="s", uri="u")  # noqa: E731
    view = SimpleNamespace(adapters={n: rec(n) for n in ("a", "b", "c")})
    policy = SimpleNamespace(pins=lambda: {"p0": ("a", "gone"), "p1": ("b",)})
    pool = SimpleNamespace(prefill=ws, prefill_policy=policy)
    sync = PinSync(pool, view, resend_s=1e9)

    async def main():
        await sync.sync_once()
        await sync.sync_once()                       # nothing changed: nothing sent
        pool.prefill_policy = Locality()             # no pins: clear what was sent
        await sync.sync_once()

    asyncio.run(main())
    assert ws[0].actor.calls == [("a",), ()] and ws[1].actor.calls == [("b",), ()]


# ---------------------------------------------------------------- the worker's pins
def test_engine_pins_use_the_host_tier_only_and_survive_lru_eviction():
    from vllm.utils.cache import LRUCache

    from prefill_worker import lora_pins

    cache = LRUCache(3)
    added = []

    def add_lora(req):
        added.append(req.lora_int_id)
        cache[req.lora_int_id] = object()
        return True

    runner = SimpleNamespace(lora_manager=SimpleNamespace(
        _adapter_manager=SimpleNamespace(_registered_adapters=cache)))
    wrapper = SimpleNamespace(worker=SimpleNamespace(model_runner=runner))

    def collective_rpc(fn, args=()):   # vLLM's: fn(worker wrapper, *args) on every rank
        return [fn(wrapper, *args)]
    engine = SimpleNamespace(add_lora=add_lora, collective_rpc=collective_rpc)
    lora_pins.pin(engine, SimpleNamespace(lora_int_id=7))
    lora_pins.pin(engine, SimpleNamespace(lora_int_id=7))   # loaded once
    assert added == [7] and lora_pins.pinned(engine) == {7}
    for i in range(1, 6):
        cache[i] = object()
    assert 7 in cache
    lora_pins.unpin(engine, 7)
    cache[9] = object()
    cache[10] = object()
    assert 7 not in cache
    with pytest.raises(lora_pins.PinUnsupported):
        lora_pins.host_tier(SimpleNamespace())


def test_adapter_host_mirror_keeps_pinned_entries():
    from prefill_worker.adapter_host import AdapterHost

    host = AdapterHost.__new__(AdapterHost)
    host.cfg = SimpleNamespace(max_cpu_loras=3)
    host._engine_loras, host._pinned = OrderedDict(), {1, 2}
    for i in (1, 2, 3, 4, 5):
        host._touch_engine(i)
    assert list(host._engine_loras) == [1, 2, 5]
