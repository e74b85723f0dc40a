"""Typed messages of the Ray calls router → prefill worker → router → decode worker.

Frozen dataclasses, no torch. "Adapters only at prefill" holds by type: a
:class:`DecodeRequest` has no adapter field, only the opaque ``kv_namespace`` (the cache
salt that keeps KV made under one adapter version apart from every other).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from cluster.errors import InvalidRequest


# Adapter kinds the prefill pool can apply (prefill_worker.adapters.KINDS; a unit test
# keeps the two equal). The router checks names only; the files are validated by a worker.
ADAPTER_KINDS = ("lora_p", "reft_p", "lora", "alora")
# Kinds that only colocated workers may serve: the adapter runs on generated tokens too
# (all-token LoRA on every token, activated LoRA from its invocation on), so it can never
# reach the adapter-free decode pool.
ALL_TOKEN_KINDS = ("lora", "alora")


@dataclass(frozen=True)
class KVHandle:
    """Where a prompt's KV waits and how much of it there is: what the router passes from
    the prefill worker to the decode worker (plain data, no torch). Created by the prefill
    worker after its engine finishes a prompt, it travels through the router inside a Ray
    call and ends up in the decode engine's ``kv_transfer_params``, from which the decode
    connector (:mod:`kv_transfer.connector`) pulls the blocks."""

    transfer_id: int        # unique per prefill worker; the key of the held blocks
    host: str               # prefill worker's KV rendezvous (TCPStore) address
    port: int
    engine_id: str          # prefill engine id, for logs and metrics labels
    num_tokens: int         # prompt tokens whose KV is held (the whole prompt)
    num_blocks: int         # ceil(num_tokens / block_size)
    layout: str             # KVLayout.fingerprint() of the prefill engine
    staged: bool = False    # copied out layer by layer during prefill (its blocks freed)
    # A tensor-parallel prefill engine: each rank's endpoint port on ``host`` (rank i's KV
    # shard goes to decode rank i); empty for a single-process engine (``port``).
    rank_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.num_blocks < 1:
            raise ValueError(f"KVHandle with no KV: num_tokens={self.num_tokens}, "
                             f"num_blocks={self.num_blocks}")
        object.__setattr__(self, "rank_ports", tuple(int(p) for p in self.rank_ports))

    def to_params(self) -> dict:
        """As the decode request's ``kv_transfer_params`` (vLLM wants a dict)."""
        return {"do_remote_prefill": True, **asdict(self)}

    @classmethod
    def from_params(cls, params: dict) -> "KVHandle":
        return cls(**{k: params[k] for k in cls.__dataclass_fields__ if k in params})


MAX_LOGPROBS = 20            # top-k per token (vLLM's default max_logprobs)
MAX_N = 16                   # samples per request
# vLLM's own limits (vllm/sampling_params.py, SamplingParams._verify_args, vLLM 0.32): a value
# the engine would refuse is refused here, naming the field, never inside a worker
# (tests/unit/test_sampling_surface.py checks each against the installed vLLM).
MAX_TEMPERATURE = 2   # (an int: the message reads "[0, 2]", as vLLM's)
# Limits at every front door (docs/http.md, "Limits"): vLLM has none on these, but each item
# costs work on every engine step (stop strings are searched in each step's new text) or
# memory per request, so a request may not carry an unbounded number. OpenAI allows 4 stop
# strings and 300 logit_bias entries; these are generous above both.
MAX_STOP_STRINGS = 128       # stop strings per request
MAX_STOP_CHARS = 1024        # characters of one stop string
MAX_LOGIT_BIAS = 4096        # logit_bias entries (each a distinct token id of the vocabulary)
MAX_STOP_TOKEN_IDS = 4096    # stop_token_ids per request
# gRPC messages, in bytes: a Generate request the router accepts (a prompt of token ids or
# text), and the largest reply message it sends (and the SDK accepts: preft_client.client
# keeps the same numbers, tests/unit/test_front_door_limits.py keeps them equal). A reply's
# largest message is the Final with top-20 prompt logprobs of a long prompt (about 400 bytes
# per prompt token, so ~50 MiB at 128k tokens); it comes from one worker answer item, at most
# RouterConfig.plane_max_bytes (<= 128 MiB), so twice that is never the hop that refuses.
MAX_REQUEST_BYTES = 64 << 20
MAX_REPLY_BYTES = 256 << 20


@dataclass(frozen=True)
class Sampling:
    """How a request samples, identical on every engine that produces one of its tokens:
    the prefill engine (the first token, under the adapter) and the decode engine (the rest)
    apply the same knobs, with the split corrected where a knob counts generated tokens
    (``min_tokens``; presence and frequency penalties, see ``decode_worker``)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0                           # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0          # > 0; 1 = off (prompt and generated tokens)
    presence_penalty: float = 0.0            # [-2, 2]; generated tokens only
    frequency_penalty: float = 0.0           # [-2, 2]; generated tokens only
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias in [-100, 100])
    min_tokens: int = 0                      # no EOS / stop token before this many tokens
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None              # top-k logprobs of each generated token
    prompt_logprobs: int | None = None       # top-k logprobs of each prompt token (adapter on)
    echo: bool = False                       # also return the prompt's text (its decoding)
    guide: str = ""                          # structured output: one of GUIDES, "" = none
    guide_spec: str = ""                     # its JSON schema / regex / choices / grammar
    n: int = 1                               # samples of one prompt: one prefill, KV moved once

    def sample(self, i: int) -> "Sampling":
        """Sample ``i`` of ``n``: one sequence, seeded ``seed + i`` (vLLM's parallel
        sampling); only sample 0 reports the prompt (its logprobs and text)."""
        if self.n == 1:
            return self
        seed = None if self.seed is None else (self.seed + i) % 2**63
        return replace(self, n=1, seed=seed, prompt_logprobs=self.prompt_logprobs if i == 0
                       else None, echo=self.echo and i == 0)

    def validate(self) -> "Sampling":
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check_range("temperature", self.temperature, 0, MAX_TEMPERATURE, "(0 = greedy)")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest("seed", f"must be in [0, 2^63), got {self.seed!r}")
        self._validate_stop()
        self._validate_knobs()
        _validate_guide(self.guide, self.guide_spec)
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise InvalidRequest("n", f"must be in [1, {MAX_N}], got {self.n!r}")
        return self

    def _validate_stop(self) -> None:
        _check_count("stop", len(self.stop), MAX_STOP_STRINGS, "stop strings")
        for s in self.stop:
            if not s:
                raise InvalidRequest("stop", "stop strings must be non-empty")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidRequest("stop", f"a stop string may have at most {MAX_STOP_CHARS} "
                                     f"characters, got one of {len(s)}")

    def _validate_knobs(self) -> None:
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _check_range("min_p", self.min_p, 0, 1)
        if not math.isfinite(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise InvalidRequest("repetition_penalty", f"must be in (0, 10] (1 = off), got "
                                 f"{self.repetition_penalty!r}")
        _check_range("presence_penalty", self.presence_penalty, -2, 2)
        _check_range("frequency_penalty", self.frequency_penalty, -2, 2)
        _check_count("logit_bias", len(self.logit_bias), MAX_LOGIT_BIAS, "entries")
        _check_count("stop_token_ids", len(self.stop_token_ids), MAX_STOP_TOKEN_IDS, "token ids")
        for tok, bias in self.logit_bias:
            if tok < 0:
                raise InvalidRequest("logit_bias", f"token id {tok} is negative")
            _check_range("logit_bias", bias, -100, 100, f"(token {tok})")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], "
                                 f"got {self.min_tokens}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids", "token ids must be >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise InvalidRequest(name, f"must be in [0, {MAX_LOGPROBS}], got {k}")

    def token_ids_used(self) -> tuple[int, ...]:
        """Token ids the request names (``logit_bias``, ``stop_token_ids``): each must be in
        the model's vocabulary (checked by the worker that knows it)."""
        return (*(t for t, _ in self.logit_bias), *self.stop_token_ids)


# Structured output kinds (vLLM's structured outputs): guide_spec is a JSON schema (JSON
# text), a regex, a JSON list of choices, nothing (json_object: any JSON object) or an EBNF
# grammar.
GUIDES = ("json", "regex", "choice", "json_object", "grammar")
MAX_GUIDE_BYTES = 64 << 10


def _validate_guide(guide: str, spec: str) -> None:
    if not guide:
        if spec:
            raise InvalidRequest("guide_spec", "is set without a guide kind")
        return
    if guide not in GUIDES:
        raise InvalidRequest("guide", f"must be one of {', '.join(GUIDES)}, got {guide!r:.40}")
    if len(spec.encode()) > MAX_GUIDE_BYTES:
        raise InvalidRequest(guide, f"is longer than {MAX_GUIDE_BYTES} bytes")
    if guide == "json_object":
        return
    if not spec:
        raise InvalidRequest(guide, "is empty")
    if guide in ("json", "choice"):
        _check_json_guide(guide, spec)


def _check_json_guide(guide: str, spec: str) -> None:
    import json

    try:
        value = json.loads(spec)
    except ValueError as e:
        raise InvalidRequest(guide, f"is not valid JSON: {e}") from None
    if guide == "json" and not isinstance(value, dict):
        raise InvalidRequest("json", "a JSON schema must be a JSON object")
    if guide == "choice" and (not isinstance(value, list) or not value or not all(
            isinstance(c, str) and c for c in value)):
        raise InvalidRequest("choice", "must be a non-empty list of non-empty strings")


def _check_count(field: str, given: int, limit: int, what: str) -> None:
    if given > limit:
        raise InvalidRequest(field, f"at most {limit} {what} per request, got {given}")


def _check_range(field: str, v: float, lo: float, hi: float, note: str = "") -> None:
    if not math.isfinite(v) or not lo <= v <= hi:
        bounds = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
        raise InvalidRequest(field, f"must be {bounds}{' ' + note if note else ''}, got {v!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """One position's logprob: the token there, its log-probability and rank under the
    engine's raw logits (before penalties and temperature, as vLLM reports them), and the
    top-k alternatives as ``(token id, logprob)`` pairs, most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()
    token: str = ""                          # the token's text (vLLM's per-token decoding)
    top_tokens: tuple[str, ...] = ()         # the text of each ``top`` item


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter version, resolved by the router from the Redis registry."""

    name: str
    version: int
    kind: str
    sha256: str
    uri: str                                 # the store's copy; workers cache it on disk

    @property
    def namespace(self) -> str:
        """KV cache salt: this adapter version's KV is never reused by anything else."""
        return f"{self.name}@v{self.version}"


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    adapter: AdapterRef | None               # None: the base model
    sampling: Sampling
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None
    enqueued_at: float = 0.0                 # router's time.time() when admitted

    def __post_init__(self) -> None:
        if (self.prompt_token_ids is None) == (self.prompt_text is None):
            raise InvalidRequest("prompt", "give exactly one of prompt text or prompt token ids")
        self.sampling.validate()   # also when it arrives over a channel, not from the router


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    first_token: int
    first_text: str
    finish_reason: str | None                # set when the request already ended
    kv: KVHandle | None                      # None when the request ended at prefill
    kv_namespace: str
    queue_s: float
    prefill_s: float
    adapter_tier: str = ""                   # engine | disk | store ("" for the base model)
    adapter_load_s: float = 0.0              # fetch + load time when not engine-resident
    t_start: float = 0.0                     # wall clock: the worker took the call ...
    t_done: float = 0.0                      # ... and returned (the router's hop breakdown)
    first_logprob: TokenLogprob | None = None   # sampling.logprobs set: the first token's
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # sampling.prompt_logprobs set: one per
                                             # prompt position (the first: rank 0, none)
    prompt_text: str = ""                    # sampling.echo set: the prompt's decoding
    cached_tokens: int = 0                   # prompt tokens the engine found in its cache
    siblings: tuple[PrefillResult, ...] = () # sampling.n > 1: samples 1.. (this is sample 0)
    sampler_state: bytes = b""               # seeded sampling: the request's generator state
                                             # after the first token (decode goes on from it)


@dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    first_token: int
    kv: KVHandle
    kv_namespace: str
    sampling: Sampling                       # max_tokens counts the first token too
    sampler_state: bytes = b""               # PrefillResult.sampler_state (seeded sampling)


@dataclass(frozen=True)
class DecodeDelta:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    kv_transfer_s: float | None = None       # set on the first delta
    kv_bytes: int | None = None
    first_step_s: float | None = None        # from KV loaded to the first decode token
    kv_transport: str = ""                   # how it moved: shm | gloo | nccl
    kv_pipelined: bool = False               # staged layer by layer during prefill
    kv_exposed_s: float | None = None        # what of the transfer the request waited for
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token_ids item (sampling.logprobs set)
    index: int = 0                           # which sample (sampling.n > 1)


@dataclass(frozen=True)
class ColocatedDelta:
    """One item of a colocated worker's stream; the first carries the prefill figures."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None         # set on the first delta
    queue_s: float = 0.0
    prefill_s: float = 0.0                   # from engine submit to the first token
    adapter_tier: str = ""
    adapter_load_s: float = 0.0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token_ids item (sampling.logprobs set)
    index: int = 0                           # which sample (sampling.n > 1)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # on the first delta, as PrefillResult's
    prompt_text: str = ""                    # on the first delta, as PrefillResult's


@dataclass(frozen=True)
class KVUsage:
    """A worker's engine KV blocks right now (0 in use when idle: nothing leaked)."""

    blocks_total: int
    blocks_free: int
    requests: int                            # requests the worker is serving

    @property
    def blocks_in_use(self) -> int:
        return self.blocks_total - self.blocks_free


@dataclass(frozen=True)
class AdapterStats:
    """An adapter-applying worker's counters (prefill and colocated pools)."""

    requests: int
    tier_hits: dict                          # engine | disk | store -> count
    resident: dict                           # adapter -> "tier@vN"
    transfers: int = 0                       # prefill: KV transfers served, their bytes,
    bytes: int = 0                           # failures, blocks held for a pull and
    failed: int = 0                          # offers expired unpulled
    held: int = 0
    expired: int = 0
    mixed_steps: int = 0                     # colocated: steps holding a prompt chunk and
    by_kind: dict = field(default_factory=dict)  # another request's decode token; requests
                                             # per adapter kind (lora_p | reft_p | lora | alora | base)
    pinned: tuple = ()                       # adapters pinned in the host tier (hot_set)
    pin_loads: int = 0                       # adapters loaded by pinning, not by a request
    prompt_tokens: int = 0                   # prompt tokens of the engine requests run, and
    prompt_tokens_cached: int = 0            # of those, the ones found in the prefix cache
    decoding_requests: int = 0               # colocated, last engine step: requests decoding
    prefill_adapters: int = 0                # (no adapter slot), distinct LoRA adapters whose
    max_loras: int = 0                       # prompt tokens it computed (bounded by max_loras)
    wide_steps: int = 0                      # steps whose requests had > max_loras adapters,
    max_batch_adapters: int = 0              # the most adapters one step's requests had, and
    prompts_done: int = 0                    # requests whose slot/ReFT pin ended at token 1
    # colocated: prefix-cache lookups of new requests in prompt tokens, split at each
    # request's adapter span start: base_queries, base_hits, adapter_queries, adapter_hits
    prefix_cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str                                # "prefill" | "decode" | "colocated"
    kv_layout: str
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None
    lora_enabled: bool
    engine_start_s: float
    pid: int
    adapters: dict = field(default_factory=dict)   # name -> version (prefill only)
    engine_threads: int = 1                  # the engine thread's OpenMP (torch) threads
    tensor_parallel_size: int = 1            # ranks of the engine (processes of the worker)
    block_size: int = 0                      # tokens per KV block (prefix-cache granularity)
