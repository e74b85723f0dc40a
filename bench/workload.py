"""Seeded request workloads for ``preft bench``: arrivals, adapter popularity, lengths.

A :class:`Workload` turns into the same list of :class:`BenchRequest` for every system of a
run, so systems are compared on identical prompts, adapters, lengths and arrival times.
No torch, no vLLM: numpy's seeded generator only.
"""

from __future__ import annotations

from dataclasses import dataclass

POPULARITY = ("round_robin", "uniform", "zipf")


@dataclass(frozen=True)
class Workload:
    num_requests: int = 64
    prompt_len: tuple[int, int] = (128, 128)    # inclusive range, drawn uniformly
    output_len: tuple[int, int] = (64, 64)
    rate: float | None = None                   # Poisson arrivals (req/s); None: all at t=0
    concurrency: int | None = None              # closed loop: at most this many in flight
    popularity: str = "round_robin"             # request i -> adapter i mod N | uniform | zipf
    zipf_s: float = 1.1
    seed: int = 0
    vocab: int = 512                            # prompt ids drawn from [8, vocab)

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"Workload.{field}={getattr(self, field)!r}: {why}")

        need(self.num_requests >= 1, "num_requests", "must be >= 1")
        for f in ("prompt_len", "output_len"):
            lo, hi = getattr(self, f)
            need(1 <= lo <= hi, f, "needs 1 <= min <= max")
        need(self.rate is None or self.rate > 0, "rate", "must be > 0 (or unset)")
        need(self.concurrency is None or self.concurrency >= 1, "concurrency", "must be >= 1")
        need(self.popularity in POPULARITY, "popularity", f"one of {POPULARITY}")
        need(self.zipf_s > 0, "zipf_s", "must be > 0")
        need(self.vocab > 8, "vocab", "must be > 8")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival_s: float                 # offset from the start of the run
    adapter: int | None              # index into the system's adapter names; None: base
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


def adapter_weights(n: int, popularity: str, zipf_s: float):
    import numpy as np

    if popularity == "zipf":
        w = 1.0 / np.arange(1, n + 1) ** zipf_s
        return w / w.sum()
    return np.full(n, 1.0 / n)


def build(w: Workload, n_adapters: int) -> list[BenchRequest]:
    """The run's requests; ``n_adapters == 0`` means every request uses the base model."""
    import numpy as np

    rng = np.random.default_rng(w.seed)
    n = w.num_requests
    plens = rng.integers(w.prompt_len[0], w.prompt_len[1] + 1, n)
    olens = rng.integers(w.output_len[0], w.output_len[1] + 1, n)
    arrivals = np.cumsum(rng.exponential(1.0 / w.rate, n)) if w.rate else np.zeros(n)
    prompts = [tuple(int(t) for t in rng.integers(8, w.vocab, int(p))) for p in plens]
    # Adapters are drawn from their own stream so N does not change prompts or arrivals.
    arng = np.random.default_rng(w.seed + 1)
    if n_adapters == 0:
        ads = [None] * n
    elif w.popularity == "round_robin":
        ads = [i % n_adapters for i in range(n)]
    else:
        p = adapter_weights(n_adapters, w.popularity, w.zipf_s)
        ads = [int(a) for a in arng.choice(n_adapters, n, p=p)]
    return [BenchRequest(i, float(arrivals[i]), ads[i], prompts[i], int(olens[i]))
            for i in range(n)]
