"""``preft top``: a live terminal view of a running cluster (what the dashboard shows).

Every ``--interval`` seconds it asks the router for ``ClusterStatus`` (workers, health,
outstanding requests, decode KV blocks, residency, a colocated engine's adapter slots)
and, with ``--metrics-url``, scrapes the router's Prometheus ``/metrics``; rates and
quantiles come from the difference between two scrapes (KV GB/s overall and per pair,
requests/s, tokens/s, TTFT/TPOT p50/p99, adapter hit rate, transfer failures). No torch,
no vLLM.
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict

Snapshot = dict[tuple[str, tuple], float]


def cluster_status(client) -> dict:
    """``client.cluster_status()`` plus ``"slots"``: per colocated worker, its prompt-only
    adapter slots as (requests decoding, adapters prefilling, ``max_loras``, wide steps)
    (``WorkerStatus``' slot fields); one ``ClusterStatus`` call, its errors the SDK's."""
    st = client.cluster_status()
    st["slots"] = {w.worker_id: (w.decoding_requests, w.prefill_adapters, w.max_loras,
                                 w.wide_steps) for w in st["workers"] if w.role == "colocated"}
    return st


def slot_text(slots: dict, worker_id: str) -> str:
    """A colocated engine's last step, e.g. ``40 decoding, 2/2 prefilling, 19 wide``:
    requests decoding, adapters prefilling / ``max_loras``, steps so far whose requests had
    more adapters than ``max_loras`` ("-" off the colocated pool)."""
    if worker_id not in slots:
        return "-"
    decoding, prefill, max_loras, wide = slots[worker_id]
    return f"{decoding} decoding, {prefill}/{max_loras} prefilling, {wide} wide"


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: Snapshot = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return out


def delta(a: Snapshot, b: Snapshot, name: str, **labels) -> float:
    def tot(s):
        return sum(v for (n, lab), v in s.items()
                   if n == name and all(dict(lab).get(k) == w for k, w in labels.items()))
    return tot(b) - tot(a)


def by_label(a: Snapshot, b: Snapshot, name: str, keys: tuple[str, ...]) -> dict[tuple, float]:
    out: dict[tuple, float] = defaultdict(float)
    for (n, lab), v in b.items():
        if n == name:
            out[tuple(dict(lab).get(k, "") for k in keys)] += v - a.get((n, lab), 0.0)
    return out


def quantile(a: Snapshot, b: Snapshot, hist: str, q: float) -> float | None:
    """Histogram quantile over the interval between two scrapes (Prometheus' interpolation)."""
    buckets = defaultdict(float)
    for (n, lab), v in b.items():
        if n == f"{hist}_bucket":
            le = dict(lab)["le"]
            buckets[float("inf") if le == "+Inf" else float(le)] += v - a.get((n, lab), 0.0)
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank, prev_b, prev_c = q * total, 0.0, 0.0
    for ub in bounds:
        c = buckets[ub]
        if c >= rank:
            if ub == float("inf"):
                return prev_b
            return prev_b + (ub - prev_b) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_b, prev_c = ub, c
    return bounds[-2] if len(bounds) > 1 else None


def rates(a: Snapshot, b: Snapshot, dt: float) -> dict:
    """The figures ``preft top`` shows, from two scrapes ``dt`` seconds apart."""
    hits = delta(a, b, "preft_adapter_cache_hits_total")
    ms = lambda v: None if v is None else 1e3 * v  # noqa: E731
    return {
        "kv_gbps": delta(a, b, "preft_kv_transfer_bytes_total") / dt / 1e9,
        "kv_pairs": {f"{p} -> {d}": v / dt / 1e9 for (p, d), v in by_label(
            a, b, "preft_kv_transfer_bytes_total", ("prefill_worker", "decode_worker")).items()},
        "kv_failures": delta(a, b, "preft_kv_transfer_failures_total"),
        "kv_p99_ms": ms(quantile(a, b, "preft_kv_transfer_seconds", 0.99)),
        "req_s": delta(a, b, "preft_requests_total", status="OK") / dt,
        "errors": delta(a, b, "preft_requests_total") - delta(a, b, "preft_requests_total", status="OK"),
        "tok_s": delta(a, b, "preft_generation_tokens_total") / dt,
        "ttft_p50_ms": ms(quantile(a, b, "preft_time_to_first_token_seconds", 0.5)),
        "ttft_p99_ms": ms(quantile(a, b, "preft_time_to_first_token_seconds", 0.99)),
        "tpot_p50_ms": ms(quantile(a, b, "preft_time_per_output_token_seconds", 0.5)),
        "tpot_p99_ms": ms(quantile(a, b, "preft_time_per_output_token_seconds", 0.99)),
        "adapter_hit_rate": (delta(a, b, "preft_adapter_cache_hits_total", tier="engine") / hits
                             if hits else None),
        "paths": {k: v / dt for (k,), v in by_label(
            a, b, "preft_request_paths_total", ("path",)).items()},
    }



def _per_key(title: str, key: str, unit: str, values: dict[str, float], form: str):
    """A two-column table of one rate per key, sorted by key."""
    from rich.table import Table

    t = Table(title=title, show_edge=False)
    t.add_column(key)
    t.add_column(unit, justify="right")
    for k, v in sorted(values.items()):
        t.add_row(k, form.format(v))
    return t

def render(status: dict, r: dict | None, address: str):
    from rich.console import Group
    from rich.table import Table

    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    head = Table.grid(padding=(0, 3))
    head.add_row(f"[b]PreFT[/b] {address}", f"adapters {status['adapters']}",
                 f"in flight {status['router_inflight']}",
                 "[red]state STALE[/red]" if status["state_stale"] else "state ok")
    parts = [head]
    if r is not None:
        m = Table(title="last interval", show_edge=False)
        for c in ("KV GB/s", "KV p99 ms", "KV fail", "req/s", "errors", "tok/s", "TTFT p50/p99 ms",
                  "TPOT p50/p99 ms", "adapter hit"):
            m.add_column(c, justify="right")
        m.add_row(fmt(r["kv_gbps"], "{:.3f}"), fmt(r["kv_p99_ms"]), fmt(r["kv_failures"], "{:.0f}"),
                  fmt(r["req_s"], "{:.2f}"), fmt(r["errors"], "{:.0f}"), fmt(r["tok_s"]),
                  f"{fmt(r['ttft_p50_ms'])} / {fmt(r['ttft_p99_ms'])}",
                  f"{fmt(r['tpot_p50_ms'])} / {fmt(r['tpot_p99_ms'])}",
                  fmt(r["adapter_hit_rate"], "{:.0%}"))
        parts.append(m)
        if r["kv_pairs"]:
            parts.append(_per_key("KV transfer per pair", "prefill -> decode", "GB/s",
                                  r["kv_pairs"], "{:.3f}"))
        if r["paths"]:
            parts.append(_per_key("requests per path", "path", "req/s", r["paths"], "{:.2f}"))
    w = Table(title="workers", show_edge=False)
    for c in ("worker", "role", "TP", "healthy", "outstanding", "KV blocks used", "held",
              "resident", "adapter slots"):
        w.add_column(c)
    for ws in status["workers"]:
        used = (f"{ws.kv_blocks_total - ws.kv_blocks_free}/{ws.kv_blocks_total}"
                if ws.role in ("decode", "colocated") else "-")
        w.add_row(ws.worker_id, ws.role, str(ws.tensor_parallel_size),
                  "yes" if ws.healthy else "[red]NO[/red]",
                  str(ws.outstanding), used, str(ws.held_transfers) if ws.role == "prefill" else "-",
                  str(len(ws.resident)) if ws.role in ("prefill", "colocated") else "-",
                  slot_text(status.get("slots", {}), ws.worker_id))
    parts.append(w)
    return Group(*parts)


def frames(client, metrics_url: str | None, interval: float, iterations: int | None = None):
    """(cluster status, rates since the last scrape or None) every ``interval`` seconds,
    ``iterations`` times (None: until interrupted)."""
    prev, t_prev, n = None, 0.0, 0
    while iterations is None or n < iterations:
        status = cluster_status(client)
        r = None
        if metrics_url:
            snap, t = scrape(metrics_url), time.monotonic()
            if prev is not None:
                r = rates(prev, snap, max(t - t_prev, 1e-6))
            prev, t_prev = snap, t
        yield status, r
        n += 1
        if iterations is None or n < iterations:
            time.sleep(interval)


def run(client, address: str, metrics_url: str | None, interval: float,
        iterations: int | None = None, console=None) -> None:
    """On a terminal, one view redrawn in place; elsewhere (a pipe, a file, a log) each
    refresh printed in full, once per interval, with its time."""
    from datetime import datetime

    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    views = frames(client, metrics_url, interval, iterations)
    if not console.is_terminal:
        for status, r in views:
            console.print(f"--- {datetime.now().astimezone().isoformat(timespec='seconds')}")
            console.print(render(status, r, address))
            console.file.flush()
        return
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        for status, r in views:
            live.update(render(status, r, address))
