"""Plain result types of the SDK."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    first_decode_step_s: float = 0.0
    route_s: float = 0.0          # the time before the first token, by hop (prefill/decode
    to_worker_s: float = 0.0      # path): router admission to prefill call, the Ray hop in,
    worker_s: float = 0.0         # the prefill worker's own time, the Ray hop back
    from_worker_s: float = 0.0
    kv_exposed_s: float = 0.0     # of kv_transfer_s, what the request waited for


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probability (the engine's raw logits, before penalties and
    temperature, as vLLM reports them), its rank (1 = most likely), and the top-k
    alternatives as ``(token id, logprob)`` pairs, most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()
    token: str = ""                  # the token's text (vLLM's per-token decoding)
    top_tokens: tuple[str, ...] = ()  # the text of each ``top`` item


@dataclass(frozen=True)
class Delta:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()   # one per token id, when logprobs=k was asked
    index: int = 0                            # the sample (n > 1)


@dataclass(frozen=True)
class Sample:
    """One of the ``n`` samples of a request (``Completion.samples``)."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    kv_bytes: int = 0
    kv_blocks: int = 0
    kv_transport: str = ""     # how the prompt's KV moved: shm (same host) | gloo | nccl
    kv_pipelined: bool = False  # staged layer by layer while the prompt ran (no gather)
    workers: tuple[str, str] = field(default=("", ""))
    logprobs: tuple[TokenLogprob, ...] = ()   # logprobs=k: one per generated token
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt_logprobs=k: one per prompt token
                                              # (the first has rank 0: no logprob)
    prompt_text: str = ""                     # echo=True: the prompt's decoding
    samples: tuple[Sample, ...] = ()          # every sample, in index order (n >= 1); the
                                              # fields above are sample 0's (usage: all)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: int
    kind: str
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    sha256: str
    owner: str
    public: bool
    created: float


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    role: str
    healthy: bool
    outstanding: int
    kv_blocks_total: int
    kv_blocks_free: int
    resident: dict
    kv_bytes_sent: int
    held_transfers: int
    tensor_parallel_size: int = 1
    # a colocated engine's adapter slots in its last step: requests decoding (holding none)
    # and distinct adapters prefilling (of max_loras), and its steps so far whose requests
    # had more adapters than max_loras (0 on other pools)
    decoding_requests: int = 0
    prefill_adapters: int = 0
    max_loras: int = 0
    wide_steps: int = 0
