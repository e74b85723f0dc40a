"""Adapter slots for prompts only: the colocated engine's scheduler (steps 3-5 in one engine).

vLLM's v1 scheduler (``Scheduler.schedule``) counts the LoRA of every *running* request it
schedules against ``max_loras`` (``scheduled_loras``) and admits a waiting request of a new
adapter only while fewer than ``max_loras`` are counted; the model runner then activates
every LoRA of the batch's requests in a slot. A colocated request needs its adapter
only for the positions of its adapter span (``colocated_worker/adapter_span.py``;
``colocated_worker/prompt_lora.py`` maps every other position to no adapter): under PreFT
until its first token. So here, on colocated engines:

* a running request whose computed tokens reach its span's end (PreFT: the prompt is
  computed and its first token was sampled from the adapted last prompt position) does not
  count:
  during ``schedule()`` its ``lora_request`` is hidden from the scheduler (restored before
  ``schedule()`` returns; nothing else in that call reads it for a running request), so
  ``max_loras`` bounds only the distinct adapters whose *prompt* tokens are scheduled in a
  step. Adapters whose span has no end (all-token LoRA, activated LoRA) keep
  their slot for life. The runner side (``prompt_lora.active_requests``) activates only the adapters the
  step's token mapping uses, so a slot held by adapters whose requests all decode is free
  for vLLM's LRU to give to the next prompt's adapter.
* once a step that computed a request's last prompt token has run
  (``update_from_output``), ``on_prompt_done(request)`` is called once per request (the
  worker ends the request's ReFT-P pin there: ``AdapterHost.prompt_done``).
* :class:`PromptSlots` counts, per step, the requests decoding and the distinct adapters
  prefilling (``AdapterStats``, ``preft status``/``top``, and the Prometheus histograms of
  ``colocated_worker/slot_metrics.py``).

No vLLM file is changed; :func:`check_vllm` refuses any vLLM whose scheduler is not the one
this was written against (0.32's, checked by version and by the lines that do the
counting).
"""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from colocated_worker.adapter_span import cache_parts, span_of

SUPPORTED_VLLM = ("0.32.",)
# What Scheduler.schedule must do for hiding a decoding request's LoRA to be exactly
# "it does not count" (whitespace-normalised source fragments of vLLM 0.32).
_SCHEDULE_FINGERPRINTS = (
    "scheduled_loras = set( req.lora_request.lora_int_id for req in scheduled_running_reqs "
    "if req.lora_request and req.lora_request.lora_int_id > 0 )",
    "len(scheduled_loras) == self.lora_config.max_loras "
    "and request.lora_request.lora_int_id not in scheduled_loras",
    "scheduled_loras.add(request.lora_request.lora_int_id)",
)
_UPDATE_PARAMS = ["scheduler_output", "model_runner_output"]


class PromptSlotsUnsupported(RuntimeError):
    """This vLLM's scheduler is not the one prompt-only adapter slots were written for."""


def check_vllm(version: str, schedule_source: str, update_params: list[str]) -> None:
    """Raise :class:`PromptSlotsUnsupported` unless ``vllm.__version__`` is a supported one
    and its ``Scheduler.schedule`` / ``update_from_output`` are the ones this was written for."""
    if not version.startswith(SUPPORTED_VLLM):
        raise PromptSlotsUnsupported(
            f"vLLM {version}: prompt-only adapter slots were written for vLLM "
            f"{'/'.join(v + 'x' for v in SUPPORTED_VLLM)}; colocated workers refuse to start "
            "(install the pinned vLLM)")
    flat = re.sub(r"\s+", " ", schedule_source)
    flat = re.sub(r"\( ", "(", re.sub(r" \)", ")", flat))
    for frag in _SCHEDULE_FINGERPRINTS:
        frag = re.sub(r"\( ", "(", re.sub(r" \)", ")", frag))
        if frag not in flat:
            raise PromptSlotsUnsupported(
                f"vLLM {version}: Scheduler.schedule no longer counts LoRAs as prompt-only "
                f"slots expect ({frag!r} not found); colocated workers refuse to start")
    if update_params[:2] != _UPDATE_PARAMS:
        raise PromptSlotsUnsupported(f"vLLM {version}: Scheduler.update_from_output takes "
                                     f"{update_params}, not {_UPDATE_PARAMS}")


def holds_slot(lora_id: int, num_computed: int, span: tuple[int, int] | None) -> bool:
    """Does a running request count against ``max_loras`` in this step: it has an adapter
    and positions of its span are still to be computed."""
    return lora_id > 0 and span is not None and num_computed < span[1]


def hide_decoding_loras(running: Iterable[Any]) -> list[tuple[Any, Any]]:
    """Set ``lora_request`` to None on the running requests that no longer hold a slot; the
    (request, LoRARequest) pairs to put back with :func:`restore_loras`."""
    hidden = []
    for r in running:
        lr = r.lora_request
        if lr is not None and not holds_slot(lr.lora_int_id, r.num_computed_tokens,
                                             span_of(r.sampling_params)):
            hidden.append((r, lr))
            r.lora_request = None
    return hidden


def restore_loras(hidden: list[tuple[Any, Any]]) -> None:
    for r, lr in hidden:
        r.lora_request = lr


class PromptSlots:
    """Per-step counters of one colocated engine (engine thread writes, anyone reads).

    ``sink(decoding, prefill_adapters)`` (optional) is called once per step and
    ``lookup_sink(parts)`` once per step with new requests (metrics)."""

    def __init__(self, max_loras: int, sink: Callable[[int, int], None] | None = None,
                 lookup_sink: Callable[[list], None] | None = None) -> None:
        self.max_loras = max_loras
        self.sink, self.lookup_sink = sink, lookup_sink
        self.steps = 0
        self.decoding = 0            # last step: requests whose scheduled tokens are generated
        self.prefill_adapters = 0    # last step: distinct adapters with prompt tokens scheduled
        self.batch_adapters = 0      # last step: distinct adapters of the step's requests
        self.max_batch_adapters = 0  # the most distinct adapters one step's requests had
        self.wide_steps = 0          # steps whose requests had more adapters than max_loras
        self.max_slot_adapters = 0   # the most adapters holding a slot in one step
        # steps where a request decoded under its adapter (a span without an end)
        self.all_token_decode_steps = 0
        self.prompts_done = 0        # requests whose slot (and ReFT-P pin) ended at token 1
        # prefix-cache lookups of new requests, in prompt tokens, by span part
        self.prefix_cache = {"base_queries": 0, "base_hits": 0, "adapter_queries": 0,
                             "adapter_hits": 0}

    def record(self, rows: Iterable[tuple[int, bool, bool]]) -> None:
        """One step: a (LoRA id or 0, prompt tokens scheduled?, adapter past the prompt?)
        row per scheduled request."""
        decoding, prefill, batch, slot, all_token_decoding = 0, set(), set(), set(), False
        for lora_id, prompt, lasting in rows:
            decoding += not prompt
            if lora_id > 0:
                batch.add(lora_id)
                if prompt or lasting:
                    slot.add(lora_id)
                if prompt:
                    prefill.add(lora_id)
                all_token_decoding |= not prompt and lasting
        self.steps += 1
        self.decoding, self.prefill_adapters, self.batch_adapters = (decoding, len(prefill),
                                                                     len(batch))
        self.max_batch_adapters = max(self.max_batch_adapters, len(batch))
        self.max_slot_adapters = max(self.max_slot_adapters, len(slot))
        self.wide_steps += len(batch) > self.max_loras
        self.all_token_decode_steps += all_token_decoding
        if self.sink is not None:
            self.sink(decoding, len(prefill))

    def record_lookups(self, new_reqs: Iterable[Any], requests: dict) -> list[tuple]:
        """The prefix-cache lookups of a step's newly scheduled requests (vLLM's
        ``NewRequestData``: its ``num_computed_tokens`` are the cached prompt tokens), split
        at each request's span start; the (base queried, base hit, adapter queried, adapter
        hit) parts, also added to :attr:`prefix_cache`."""
        parts = []
        for nr in new_reqs:
            r = requests.get(nr.req_id)
            if r is None or getattr(r, "num_preemptions", 0) > 0:
                continue
            part = cache_parts(span_of(r.sampling_params), r.num_prompt_tokens,
                               nr.num_computed_tokens)
            for key, n in zip(("base_queries", "base_hits", "adapter_queries",
                               "adapter_hits"), part):
                self.prefix_cache[key] += n
            parts.append(part)
        if parts and self.lookup_sink is not None:
            self.lookup_sink(parts)
        return parts

    def fields(self) -> dict:
        """The ``AdapterStats`` fields these counters fill."""
        return dict(decoding_requests=self.decoding, prefill_adapters=self.prefill_adapters,
                    max_loras=self.max_loras, wide_steps=self.wide_steps,
                    max_batch_adapters=self.max_batch_adapters, prompts_done=self.prompts_done,
                    prefix_cache=dict(self.prefix_cache))


def step_rows(output: Any, requests: dict) -> tuple[list[tuple[int, bool, bool]], list[Any]]:
    """After ``schedule()`` (which has advanced ``num_computed_tokens`` by the tokens it
    scheduled): a (LoRA id, prompt scheduled?, adapter past the prompt?) row per scheduled
    request, and the requests whose last prompt token this step computes."""
    rows, completing = [], []
    for rid, n in output.num_scheduled_tokens.items():
        r = requests.get(rid)
        if r is None:
            continue
        before = r.num_computed_tokens - n
        prompt = before < r.num_prompt_tokens
        span = span_of(r.sampling_params) if r.lora_request else None
        rows.append((r.lora_request.lora_int_id if r.lora_request else 0, prompt,
                     span is not None and span[1] > r.num_prompt_tokens))
        if prompt and r.num_computed_tokens >= r.num_prompt_tokens:
            completing.append(r)
    return rows, completing


def install_prompt_slots(engine: Any, slots: PromptSlots,
                         on_prompt_done: Callable[[Any], None] | None = None) -> None:
    """Wrap the scheduler of an in-process ``LLMEngine`` (engine thread, before the first
    request)."""
    import vllm
    from vllm.v1.core.sched.scheduler import Scheduler

    sched = engine.engine_core.engine_core.scheduler
    if not isinstance(sched, Scheduler):
        raise PromptSlotsUnsupported(f"the engine's scheduler is a {type(sched).__name__}, "
                                     "not vLLM's v1 Scheduler")
    check_vllm(vllm.__version__, inspect.getsource(type(sched).schedule),
               list(inspect.signature(sched.update_from_output).parameters))
    _wrap(sched, slots, on_prompt_done)


def _wrap(sched: Any, slots: PromptSlots,
          on_prompt_done: Callable[[Any], None] | None) -> None:
    orig_schedule, orig_update = sched.schedule, sched.update_from_output
    pending: list[tuple[Any, list]] = []      # (scheduler output, requests completing)
    fired: weakref.WeakSet = weakref.WeakSet()  # once per request (preemption recomputes)

    def schedule(*args, **kwargs):
        hidden = hide_decoding_loras(sched.running)
        try:
            out = orig_schedule(*args, **kwargs)
        finally:
            restore_loras(hidden)
        rows, completing = step_rows(out, sched.requests)
        slots.record(rows)
        slots.record_lookups(getattr(out, "scheduled_new_reqs", ()), sched.requests)
        if completing:
            pending.append((out, completing))
            del pending[:-8]   # an output never updated (engine error) is dropped
        return out

    def update_from_output(scheduler_output, *args, **kwargs):
        result = orig_update(scheduler_output, *args, **kwargs)
        for i, (out, completing) in enumerate(pending):
            if out is scheduler_output:
                del pending[i]
                for r in completing:
                    if not r.is_finished() and r not in fired:
                        fired.add(r)
                        slots.prompts_done += 1
                        if on_prompt_done is not None:
                            on_prompt_done(r)
                break
        return result

    sched.schedule = schedule
    sched.update_from_output = update_from_output


def worker_slots(max_loras: int, metrics) -> PromptSlots:
    """A colocated worker's counters, each step also observed as Prometheus series
    (``metrics``: the worker's :class:`~colocated_worker.slot_metrics.SlotMetrics`)."""
    if not metrics.enabled:
        return PromptSlots(max_loras)
    return PromptSlots(max_loras, metrics.observe, metrics.lookups)
