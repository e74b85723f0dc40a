"""Prompt-only adapter slots (``colocated_worker/prompt_slots.py``) without an engine: the
version check against the installed vLLM's scheduler source, which running requests count
against ``max_loras``, the wrapped ``schedule``/``update_from_output`` on a scheduler that
counts LoRAs the way vLLM 0.32's does, the runner's active-adapter filter, and the ReFT-P pin
credits that end a pin at the first token."""

from __future__ import annotations

import inspect
import threading
from types import SimpleNamespace

import pytest

from colocated_worker.adapter_span import OPEN, SPAN_ARG
from colocated_worker.prompt_lora import active_requests
from colocated_worker.prompt_slots import (PromptSlots, PromptSlotsUnsupported, _wrap,
                                           check_vllm, hide_decoding_loras, holds_slot,
                                           restore_loras, step_rows)


def _vllm_scheduler():
    import vllm
    from vllm.v1.core.sched.scheduler import Scheduler

    return (vllm.__version__, inspect.getsource(Scheduler.schedule),
            list(inspect.signature(Scheduler.update_from_output).parameters)[1:])


def test_the_installed_vllm_is_the_one_it_was_written_for():
    check_vllm(*_vllm_scheduler())


@pytest.mark.parametrize("change", ["version", "count", "admit", "update"])
def test_any_other_vllm_is_refused(change):
    version, src, params = _vllm_scheduler()
    if change == "version":
        version = "0.33.0"
    elif change == "count":
        src = src.replace("for req in scheduled_running_reqs", "for req in self.running")
    elif change == "admit":
        src = src.replace("not in scheduled_loras", "not in active_loras")
    else:
        params = ["scheduler_output"]
    with pytest.raises(PromptSlotsUnsupported, match="refuse|update_from_output"):
        check_vllm(version, src, params)


def test_a_running_request_holds_a_slot_only_until_its_span_is_computed():
    assert holds_slot(3, 0, (0, 10)) and holds_slot(3, 9, (0, 10))
    assert not holds_slot(3, 10, (0, 10)) and not holds_slot(3, 25, (0, 10))
    assert holds_slot(3, 25, (0, OPEN))         # all-token: for life
    assert holds_slot(3, 25, (7, OPEN))         # activated LoRA: for life
    assert not holds_slot(0, 0, None)           # the base model holds none
    assert not holds_slot(3, 0, None)           # a LoRA request without a span: nowhere


class Obj(SimpleNamespace):
    """Hashable by identity, as vLLM's Request and LoRARequest objects are used here."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def _req(rid, lora, computed, prompt, end=None):
    """A scheduler request; ``end``: its adapter span's end (default: the prompt's, PreFT)."""
    lr = Obj(lora_int_id=lora) if lora else None
    extra = {SPAN_ARG: [0, prompt if end is None else end]} if lora else None
    return Obj(request_id=rid, lora_request=lr, num_computed_tokens=computed,
               num_prompt_tokens=prompt, is_finished=lambda: False,
               sampling_params=SimpleNamespace(extra_args=extra))


def test_hidden_loras_are_the_decoding_ones_and_come_back():
    reqs = [_req("a", 1, 10, 10), _req("b", 2, 4, 10), _req("c", 3, 12, 10, OPEN),
            _req("d", 0, 1, 5)]
    before = [r.lora_request for r in reqs]
    hidden = hide_decoding_loras(reqs)
    assert [r.request_id for r, _ in hidden] == ["a"]
    assert reqs[0].lora_request is None and reqs[1].lora_request is before[1]
    restore_loras(hidden)
    assert [r.lora_request for r in reqs] == before


class VllmLikeScheduler:
    """The LoRA accounting of vLLM 0.32's ``Scheduler.schedule``: every running request is
    scheduled and its LoRA counted; a waiting request of a new LoRA is skipped once
    ``max_loras`` are counted. Prompts run in one step (no chunking)."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras, self.running, self.waiting, self.requests = max_loras, [], [], {}

    def add(self, r) -> None:
        self.waiting.append(r)
        self.requests[r.request_id] = r

    def schedule(self):
        scheduled = {r.request_id: (r.num_prompt_tokens - r.num_computed_tokens
                                    if r.num_computed_tokens < r.num_prompt_tokens else 1)
                     for r in self.running}
        loras = {r.lora_request.lora_int_id for r in self.running if r.lora_request}
        assert len(loras) <= self.max_loras
        for r in list(self.waiting):
            lora = r.lora_request.lora_int_id if r.lora_request else 0
            if lora and len(loras) == self.max_loras and lora not in loras:
                continue
            self.waiting.remove(r)
            self.running.append(r)
            loras.add(lora) if lora else None
            scheduled[r.request_id] = r.num_prompt_tokens
        for rid, n in scheduled.items():
            self.requests[rid].num_computed_tokens += n
        return SimpleNamespace(num_scheduled_tokens=scheduled)

    def update_from_output(self, scheduler_output, model_runner_output):
        return model_runner_output


def _run(sched, steps: int, slots: PromptSlots, done: list) -> None:
    _wrap(sched, slots, done.append)
    for _ in range(steps):
        sched.update_from_output(sched.schedule(), None)


def test_wrapped_scheduler_admits_prompts_of_new_adapters_while_others_decode():
    plain, wrapped = VllmLikeScheduler(2), VllmLikeScheduler(2)
    for s in (plain, wrapped):
        for i in range(8):
            s.add(_req(f"r{i}", i + 1, 0, 5))
    slots, done = PromptSlots(2), []
    _run(wrapped, 5, slots, done)
    assert len(wrapped.running) == 8 and slots.max_batch_adapters == 8
    assert slots.wide_steps >= 1 and slots.max_slot_adapters == 2
    assert slots.prefill_adapters == 0 and slots.decoding == 8
    # each request's prompt is done once (update_from_output after the step that did it)
    assert sorted(r.request_id for r in done) == [f"r{i}" for i in range(8)]
    assert slots.prompts_done == 8
    for _ in range(4):   # unwrapped: two adapters' requests decode, nobody else gets in
        plain.schedule()
    assert len(plain.running) == 2
    # the requests' LoRAs are all back after each step
    assert all(r.lora_request is not None for r in wrapped.running)


def test_all_token_adapters_keep_their_slot_while_decoding():
    s = VllmLikeScheduler(2)
    for i, lora in enumerate((1, 2, 3)):
        s.add(_req(f"r{i}", lora, 0, 5, OPEN if lora in (1, 2) else None))
    slots = PromptSlots(2)
    _wrap(s, slots, None)
    for _ in range(3):
        s.update_from_output(s.schedule(), None)
    assert [r.request_id for r in s.running] == ["r0", "r1"]   # r2 waits: no slot free
    assert slots.all_token_decode_steps == 2 and slots.wide_steps == 0


def test_step_rows_and_counters():
    reqs = {"a": _req("a", 1, 10, 10), "b": _req("b", 2, 20, 10, OPEN), "c": _req("c", 0, 4, 10)}
    rows, completing = step_rows(SimpleNamespace(num_scheduled_tokens={"a": 4, "b": 1,
                                                                        "c": 4, "x": 1}), reqs)
    assert rows == [(1, True, False), (2, False, True), (0, True, False)]
    assert completing == [reqs["a"]]
    seen = []
    slots = PromptSlots(1, sink=lambda d, p: seen.append((d, p)))
    slots.record(rows)
    assert (slots.decoding, slots.prefill_adapters, slots.batch_adapters) == (1, 1, 2)
    assert slots.wide_steps == 1 and seen == [(1, 1)]
    assert set(slots.fields()) >= {"decoding_requests", "prefill_adapters", "wide_steps"}


def test_only_the_adapters_the_mapping_uses_are_activated():
    lr = {i: Obj(lora_int_id=i) for i in (1, 2, 3)}
    assert active_requests(set(lr.values()), (0, 1), (1, 1, 0, 3)) == {lr[1], lr[3]}
    assert active_requests(set(lr.values()), (0,), (0, 0)) == set()


def test_reft_pins_end_at_the_first_token_and_unpins_balance():
    from prefill_worker.adapter_host import AdapterHost
    from prefill_worker.reft_runtime import EXTRA_ARG, ReftRuntime

    host = object.__new__(AdapterHost)   # the pin bookkeeping only (no model, no engine)
    host.reft, host._ended_early, host._pin_lock = ReftRuntime(4), {}, threading.Lock()
    r = SimpleNamespace(reft_key="reft:1", reft_weights="w")
    engine_req = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={EXTRA_ARG: "reft:1"}))
    host.pin(r)
    host.pin(r)
    host.prompt_done(engine_req)            # one of the two has its first token
    assert host.reft.active() == 1
    host.prompt_done(engine_req)
    assert host.reft.active() == 0          # both decoding: the weights may be evicted
    host.unpin(r, after_engine_step=False)
    host.unpin(r, after_engine_step=False)
    assert host.reft.active() == 0 and host._ended_early == {}
    host.prompt_done(SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None)))
    assert host._ended_early == {}


def test_prefix_cache_lookups_split_at_each_span_start():
    reqs = {"base": _req("base", 0, 0, 600), "al": _req("al", 2, 0, 600, OPEN),
            "pre": _req("pre", 1, 0, 600)}
    reqs["al"].sampling_params.extra_args[SPAN_ARG][0] = 590
    reqs["gone"] = Obj(num_preemptions=1, num_prompt_tokens=5, sampling_params=None)
    slots = PromptSlots(2)
    new = [SimpleNamespace(req_id=r, num_computed_tokens=c)
           for r, c in (("base", 512), ("al", 512), ("pre", 0), ("gone", 3), ("x", 1))]
    assert slots.record_lookups(new, reqs) == [(600, 512, 0, 0), (590, 512, 10, 0),
                                               (0, 0, 600, 0)]
    assert slots.fields()["prefix_cache"] == {"base_queries": 1190, "base_hits": 1024,
                                              "adapter_queries": 610, "adapter_hits": 0}
