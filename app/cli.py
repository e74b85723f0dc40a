"""``preft``: the operator's and developer's command line.

  preft up        start a cluster (Redis, Ray, prefill + decode pools, router) and serve
  preft generate  send one request to a running router
  preft demo      start the embedded default cluster, send a few requests, print results
  preft adapters  add | list | show | rm adapters on a running router
  preft status    workers, residency, queue depths and KV usage of a running cluster
  preft top       live view of a running cluster (KV GB/s, TTFT/TPOT, queues, workers)
  preft keys      create API keys (stored hashed in Redis)
  preft train     train a PreFT adapter (lora_p, reft_p) or an all-token LoRA from JSONL
  preft convert-pyreft  turn interventions saved by pyreft into a ReFT-P adapter (safetensors)
  preft bench     end-to-end throughput: PreFT cluster vs vLLM multi-LoRA vs base model
  preft make-tiny build the embedded default: demo model and adapters, trained here (no download)

Heavy imports (torch, vLLM, Ray) happen only inside the commands that need them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from app import assets


def _bounded(kind, lo=None, hi=None, *, lo_open: bool = False, note: str = ""):
    """An argparse ``type``: a ``kind`` (int or float) in [lo, hi] ((lo, hi] with
    ``lo_open``). argparse names the flag in front of the message, e.g. ``argument --top-k:
    must be >= 0 (0 = off), got -5``."""
    if lo is not None and hi is not None:
        rng = f"in {'(' if lo_open else '['}{lo}, {hi}]"
    else:
        rng = f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"<= {hi}"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if ((lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)
                or v != v):   # NaN
            raise argparse.ArgumentTypeError(f"must be {rng}{note}, got {text}")
        return v
    parse.__name__ = kind.__name__   # argparse's fallback messages say "invalid int value"
    return parse


PORT = _bounded(int, 0, 65535, note=" (0 = any free port)")
COUNT = _bounded(int, 0)
RANKS = _bounded(int, 1, 64)
SECONDS = _bounded(float, 0, lo_open=True)


def _parse_adapters(items: list[str]):
    """``NAME=PATH`` or ``NAME:KIND=PATH`` -> ((name, path), ...), ((name, kind), ...);
    a bad kind or a path that is not a directory is refused here, naming ``--adapter``."""
    from cluster.config import ConfigError
    from cluster.messages import ADAPTER_KINDS

    out, kinds = [], []
    for item in items:
        name, sep, path = item.partition("=")
        name, _, kind = name.partition(":")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter expects NAME=PATH or NAME:KIND=PATH, got {item!r}")
        if kind and kind not in ADAPTER_KINDS:
            raise ConfigError(f"--adapter {item}: kind {kind!r} is not one of {ADAPTER_KINDS}")
        if not Path(path).is_dir():
            raise ConfigError(f"--adapter {item}: {path} is not a directory (an adapter is a "
                              "directory: adapter_config.json + adapter_model.safetensors)")
        out.append((name, path))
        if kind:
            kinds.append((name, kind))
    return tuple(out), tuple(kinds)


def _pool_sizes(args) -> tuple[int, int, int]:
    """--colocated-workers alone: a colocated-only cluster; else one prefill/decode pair."""
    colo = args.colocated_workers
    default = 0 if colo and args.prefill_workers is None and args.decode_workers is None else 1
    pick = lambda v: default if v is None else v  # noqa: E731
    return pick(args.prefill_workers), pick(args.decode_workers), colo


def build_config(args):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig, TransferConfig)

    if args.config:
        return _config_from_yaml(args)
    adapters, kinds = _parse_adapters(args.adapter or [])
    model = args.model
    if model is None:
        model_dir, demo = assets.default_assets()
        model = str(model_dir)
        if not adapters:
            adapters = tuple((n, str(p)) for n, p in demo.items())
    eng = EngineConfig(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                       kv_cache_gib=args.kv_cache_gib)
    xfer = TransferConfig(kv_host=args.kv_host)
    n_prefill, n_decode, n_colocated = _pool_sizes(args)
    tp = args.tensor_parallel_size
    prefill = PrefillConfig(engine=replace(eng, tensor_parallel_size=args.prefill_tp or tp),
                            transfer=xfer, max_lora_rank=args.max_lora_rank)
    cfg = ClusterConfig(
        prefill=prefill,
        decode=DecodeConfig(engine=replace(eng, tensor_parallel_size=args.decode_tp or tp),
                            transfer=xfer),
        router=RouterConfig(host=args.host, port=args.port, require_auth=args.require_auth,
                            tls_cert=args.tls_cert, tls_key=args.tls_key,
                            tls_client_ca=args.tls_client_ca, metrics_port=args.metrics_port),
        ray_address=args.ray_address, prefill_workers=n_prefill, decode_workers=n_decode,
        colocated_workers=n_colocated, redis_url=args.redis_url or os.environ.get("REDIS_URL"),
        run_dir=args.run_dir, adapters=adapters, adapter_kinds=kinds, name=args.name,
        local_cores=args.local_cores)
    if args.colocated_tp is None:   # the colocated pool takes the prefill pool's engine
        return cfg
    colo = cfg.colocated_cfg
    return replace(cfg, colocated=replace(
        colo, engine=replace(colo.engine, tensor_parallel_size=args.colocated_tp)))


def _read_yaml(path: str) -> dict:
    """The YAML mapping in ``--config``'s file; ConfigError (one line) when it cannot be."""
    import yaml

    from cluster.config import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e} (looked in {Path.cwd()})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of ClusterConfig fields, "
                          f"got {type(data).__name__}")
    return data


def _with_embedded_model(data: dict) -> dict:
    """A cluster YAML that names no model gets what ``preft up`` without ``--model`` gets:
    the embedded demo model on every pool and, unless it lists ``adapters``, the demo
    adapters (built on first use, ~3-4 CPU minutes)."""
    sections = [data.get(k) for k in ("prefill", "decode", "colocated")]
    engines = [s.setdefault("engine", {}) for s in sections if isinstance(s, dict)]
    engines = [e for e in engines if isinstance(e, dict)]
    if any("model" in e for e in engines) or not isinstance(data.get("prefill"), dict):
        return data
    model_dir, demo = assets.default_assets()
    for e in engines:
        e["model"] = str(model_dir)
    data.setdefault("adapters", {n: str(p) for n, p in demo.items()})
    return data


def _config_from_yaml(args):
    from cluster.config import ClusterConfig, from_dict

    cfg = from_dict(ClusterConfig, _with_embedded_model(_read_yaml(args.config)))
    tls = {k: getattr(args, k) for k in ("tls_cert", "tls_key", "tls_client_ca", "metrics_port")
           if getattr(args, k, None) is not None}
    if tls:  # TLS flags are never silently dropped: they override the YAML's router.*
        cfg = replace(cfg, router=replace(cfg.router, **tls))
    return cfg


def _add_pool_args(p: argparse.ArgumentParser) -> None:
    """The prefill/decode pools' sizes and their engines' tensor parallelism."""
    p.add_argument("--prefill-workers", type=COUNT, default=None, help="prefill pool size "
                   "(default 1; 0 when --colocated-workers is given alone)")
    p.add_argument("--decode-workers", type=COUNT, default=None, help="decode pool size "
                   "(default 1; 0 when --colocated-workers is given alone)")
    p.add_argument("--tensor-parallel-size", "--tp", type=RANKS, default=1, metavar="N",
                   help="ranks per prefill and decode engine (vLLM's tensor parallelism: "
                   "each rank holds a shard of the KV heads, and KV moves from prefill rank i "
                   "to decode rank i, so both pools need the same N; default 1). On GPUs give "
                   "each worker N GPUs (num_gpus in the YAML)")
    p.add_argument("--prefill-tp", type=RANKS, default=None, metavar="N",
                   help="ranks per prefill engine (default --tensor-parallel-size)")
    p.add_argument("--colocated-tp", type=RANKS, default=None, metavar="N",
                   help="ranks per colocated engine (default --tensor-parallel-size)")
    p.add_argument("--decode-tp", type=RANKS, default=None, metavar="N",
                   help="ranks per decode engine (default --tensor-parallel-size); must "
                   "equal the prefill engines' (re-sharding KV between sizes is not built)")


def _add_http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=PORT, default=None, help="also serve the "
                   "OpenAI-compatible HTTP API on this port (it has /metrics too)")
    p.add_argument("--http-max-body-mib", type=_bounded(int, 1), default=None, metavar="MIB",
                   help="with --http-port: the largest request body in MiB, a larger one is "
                   "answered 413 before it is read (default: the router's own limit on a "
                   "request, 64 MiB)")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="cluster YAML (deploy/*.yaml); overrides the flags below")
    _add_pool_args(p)
    p.add_argument("--local-cores", choices=["shared", "split"], default="shared",
                   help="local clusters: shared (default) runs the prefill and the decode "
                   "engine on every core, idle OpenMP threads sleeping; split gives each "
                   "half the cores (slower under load, lower latency below it)")
    p.add_argument("--colocated-workers", type=COUNT, default=0, help="colocated pool size: "
                   "workers whose one engine applies the adapter to the prompt and decodes in "
                   "the same batch (no KV moves; best on a single device, and the only pool "
                   "that serves all-token LoRA adapters). Given alone, the cluster is "
                   "colocated-only; with --prefill-workers/--decode-workers the router picks "
                   "a path per request by load and adapter locality (default 0)")
    p.add_argument("--redis-url", default=None, help="cluster state in this Redis (redis:// or "
                   "rediss:// with password); default $REDIS_URL, else a local redis-server "
                   "on loopback with its data under --run-dir")
    p.add_argument("--name", default="preft", help="cluster name: Ray actors are named "
                   "<name>-<role>-<i>, so one Ray cluster can host several (default preft)")
    p.add_argument("--run-dir", default=".preft/run", help="Redis data, adapter store and "
                   "worker caches (default .preft/run)")
    p.add_argument("--require-auth", action="store_true", help="require API keys "
                   "(`preft keys create`); mandatory when --host is not loopback")
    _add_http_args(p)
    p.add_argument("--metrics-port", type=PORT, default=None, help="serve Prometheus "
                   "/metrics (preft_* series) on this port; 0 = any free port")
    p.add_argument("--model", help="base model directory (HF format); default: the embedded "
                   "demo model, trained locally under $PREFT_HOME/demo (~/.cache/preft)")
    p.add_argument("--adapter", action="append", metavar="NAME[:KIND]=PATH",
                   help="register an adapter directory under NAME (repeatable). KIND: lora_p "
                   "(PEFT LoRA files, adapter on the prompt only: the default for them), reft_p "
                   "(ReFT-P files), or lora (the PEFT LoRA files on every token, standard PEFT "
                   "semantics: served by colocated workers only). Default with the embedded "
                   "model: the trained demo adapters alice (LoRA-P), bob (LoReFT-P), carol "
                   "(DiReFT-P)")
    p.add_argument("--host", default="127.0.0.1", help="router bind address (default 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=50051, help="router gRPC port (0 = any free port)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="engine dtype for both pools (default float32)")
    p.add_argument("--max-model-len", type=_bounded(int, 1), default=None, help="context length in tokens "
                   "(prompt + output) of both pools' engines; default: the model's own, from "
                   "its config.json (max_position_embeddings, with RoPE scaling, as vLLM "
                   "derives it). A value above the model's own is refused before anything starts")
    p.add_argument("--kv-cache-gib", type=_bounded(float, 0, lo_open=True), default=1.0,
                   help="KV cache per engine in GiB (default 1)")
    p.add_argument("--max-lora-rank", type=_bounded(int, 1), default=16, help="largest adapter rank accepted")
    p.add_argument("--kv-host", default="127.0.0.1",
                   help="address the workers' KV transfer endpoints bind and advertise")
    p.add_argument("--ray-address", default=None,
                   help="join an existing Ray cluster (auto or ray://...) instead of starting one")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve gRPC (and "
                   "--http-port) over TLS with this certificate (chain); needs --tls-key. "
                   "Overrides router.tls_cert of --config")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="PEM", help="mutual TLS: accept "
                   "only clients presenting a certificate signed by this CA")
    p.add_argument("--verbose", action="store_true", help="forward worker logs to this terminal")


def check_ports_free(cfg, http_port: int | None = None, from_yaml: bool = False) -> None:
    """Refuse, naming the flag (or YAML field), a port something already listens on: before
    Redis, Ray or an engine starts, not when the router binds after them."""
    import socket

    from cluster.config import ConfigError

    r = cfg.router
    for flag, field, port in (("--port", "router.port", r.port),
                              ("--http-port", None, http_port),
                              ("--metrics-port", "router.metrics_port", r.metrics_port)):
        if not port:   # None or 0: nothing asked for, or any free port
            continue
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                r.host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as e:
            raise ConfigError(f"--host {r.host}: not an address to listen on ({e})") from None
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers bind
            try:
                s.bind(addr)
            except OSError as e:
                name = f"{field} in --config" if from_yaml and field else flag
                raise ConfigError(f"{name} {port}: cannot listen on {r.host}:{port} "
                                  f"({e.strerror}; another `preft up`?); pick a free port, "
                                  "or 0 for any") from None


def _start(cfg, verbose: bool, http_port: int | None = None, from_yaml: bool = False):
    check_ports_free(cfg, http_port, from_yaml)   # first: before the heavier imports below
    from rich.console import Console

    from app.launcher import LocalCluster
    from cluster.config import ConfigError
    from router.server import check_bind_is_safe

    try:
        check_bind_is_safe(cfg.router)   # before anything starts
    except PermissionError as e:
        raise ConfigError(str(e)) from None
    console = Console(stderr=True)
    cluster = LocalCluster(cfg, log_to_driver=verbose)
    with console.status("starting cluster") as status:
        cluster.start_workers(lambda msg: (status.update(msg), console.log(msg)))
    return cluster, console


def _register_with_progress(cluster, console) -> None:
    from rich.progress import Progress

    from preft_client import PreftClient

    if not cluster.cfg.adapters:
        return
    with Progress(console=console) as prog, PreftClient(cluster.local_address or cluster.address,
                                                        api_key=cluster.api_key) as client:
        upload_adapters(client, cluster.cfg, prog)


def upload_adapters(client, cfg, prog) -> list:
    """Upload ``cfg.adapters`` as ``cfg.adapter_kinds`` says (unnamed: the files' own kind),
    public, one progress task each; returns the registered records."""
    kinds, infos = dict(cfg.adapter_kinds), []
    for name, path in cfg.adapters:
        task = prog.add_task(f"upload {name}", total=None)
        info = client.register_adapter(
            name, path, public=True, kind=kinds.get(name),
            progress=lambda sent, total, t=task: prog.update(t, completed=sent, total=total))
        prog.update(task, description=f"{name} v{info.version} ({info.kind})")
        infos.append(info)
    return infos


def _print_ready(cluster, port: int) -> None:
    """``preft up``'s ready lines (stdout): the router's address, and where the metrics,
    the cluster's Redis and (with --require-auth) the admin key are."""
    r = cluster.cfg.router
    tls = (" (TLS, client certificates required)" if r.tls_client_ca else
           " (TLS)" if r.tls_cert else "")
    print(f"router listening on {r.host}:{port}{tls}", flush=True)
    if cluster.metrics_port is not None:
        print(f"metrics on http://{r.host}:{cluster.metrics_port}/metrics", flush=True)
    if cluster.redis is not None:   # ours: on loopback, no password
        print(f"cluster state in {cluster.redis_url} (`preft keys create` finds it through "
              f"{cluster.run_dir / 'cluster.json'})", flush=True)
    if cluster.api_key_file is not None:
        print(f"admin API key (tenant admin) in {cluster.api_key_file} (mode 0600): "
              f"export PREFT_API_KEY=$(cat {cluster.api_key_file})", flush=True)


def _body_limit(args) -> dict:
    """``serve_http``'s ``max_body_bytes`` from ``--http-max-body-mib`` (unset: its default)."""
    mib = args.http_max_body_mib
    return {} if mib is None else {"max_body_bytes": mib << 20}


def cmd_up(args) -> int:
    cfg = build_config(args)
    if args.revalidate_adapters:
        cfg = replace(cfg, on_model_change="revalidate")
    cluster, console = _start(cfg, args.verbose, args.http_port, bool(args.config))

    async def run() -> None:
        port = await cluster.start_router()
        await asyncio.to_thread(_register_with_progress, cluster, console)
        http_server: list = []
        http_task = None
        if args.http_port is not None:   # in this process: Generate called directly
            r = cfg.router   # with TLS: HTTPS with the router's certificate (and client CA)
            http_task = asyncio.get_running_loop().create_task(cluster.serve_http(
                r.host, args.http_port, server_out=http_server, ssl_certfile=r.tls_cert,
                ssl_keyfile=r.tls_key, ssl_client_ca=r.tls_client_ca,
                **_body_limit(args)))
            console.log(f"OpenAI-compatible {'HTTPS' if r.tls_cert else 'HTTP'} on "
                        f"{r.host}:{args.http_port}")
        _print_ready(cluster, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await shutdown.stop_serving(cluster, args.drain_timeout, http_server, http_task,
                                    console.log)

    from app import shutdown
    try:
        asyncio.run(run())
    finally:
        shutdown.stop_cluster(cluster)   # a signal meanwhile: at once, no Ray left
    return 0


def _generate_knobs(args) -> dict:
    """The SDK's sampling keywords from ``preft generate``'s flags (None: unset)."""
    schema = args.json_schema
    if schema is not None and Path(schema).is_file():
        schema = Path(schema).read_text()
    return dict(n=args.n, logprobs=args.logprobs, top_k=args.top_k, min_p=args.min_p,
                presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens,
                json_schema=schema, regex=args.regex, choice=args.choice)


def client_error(e: Exception) -> int:
    """A client command's failure as one line on stderr (exit status 1); a missing or
    unknown key says how the CLI sends one."""
    code = getattr(e, "code", None)
    msg = f"{code.name}: {e.message}" if code is not None else str(e)
    if code is not None and code.name == "UNAUTHENTICATED":
        msg += ("; the CLI sends --api-key or $PREFT_API_KEY (`preft up --require-auth` keeps "
                "an admin key in <run-dir>/admin.key)")
    print(f"error: {msg}", file=sys.stderr)
    return 1


def cmd_generate(args) -> int:
    from preft_client import PreftClientError

    kw = dict(prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
              top_p=args.top_p, seed=args.seed, stop=args.stop, **_generate_knobs(args))
    with _client(args) as client:
        try:
            if args.stream:
                for d in client.stream(args.adapter, **kw):
                    print(d.text, end="", flush=True)
                print()
                return 0
            c = client.generate(args.adapter, **kw)
        except (PreftClientError, ValueError) as e:
            return client_error(e)
    _print_completion(c)
    return 0


def _print_completion(c) -> None:
    for s in c.samples:
        if len(c.samples) > 1:
            print(f"--- sample {s.index} [{s.finish_reason}]")
        print(s.text)
        for t in s.logprobs:
            alts = ", ".join(f"{tok!r} {lp:.3f}" for tok, (_, lp) in zip(t.top_tokens, t.top))
            print(f"  {t.token!r}\t{t.logprob:.4f}\t(rank {t.rank}){'  ' + alts if alts else ''}")
    t = c.timings
    print(f"[{c.finish_reason}] {c.usage.prompt_tokens} prompt + {c.usage.completion_tokens} "
          f"completion tokens; ttft {t.ttft_s * 1e3:.1f} ms, KV {c.kv_bytes / 1024:.0f} KiB in "
          f"{t.kv_transfer_s * 1e3:.2f} ms", file=sys.stderr)


def cmd_demo(args) -> int:
    from rich.table import Table

    from preft_client import PreftClient
    from trainer.demo import DEMO, DEMO_PROMPTS, expected

    args.port = 0
    rec = assets.demo_assets()[2] if args.model is None else {"adapters": {}}
    cfg = build_config(args)
    cluster, console = _start(cfg, args.verbose)
    demo = args.model is None   # the ✓ column checks the embedded demo's answers only
    tasks = {a.name: a.task for a in DEMO} if demo else {}
    try:
        cluster.start_router_in_thread()
        _register_with_progress(cluster, console)
        console.log(f"router listening on {cluster.address}")
        if rec["adapters"]:
            legend = Table(title="The demo adapters (trained here with `preft train`)")
            for col in ("adapter", "kind", "trained to", "held-out exact match"):
                legend.add_column(col)
            for name, a in rec["adapters"].items():
                legend.add_row(name, a["label"], a["trained_to"], f"{a['eval_exact_match']:.0%}")
            console.print(legend)
        table = Table(title="Same prompts, base model vs. each adapter (applied at prefill only; "
                      "every later token comes from the base model)")
        for col in ("prompt", "adapter", "output", "✓", "TTFT ms", "KV KiB", "KV GB/s"):
            table.add_column(col, overflow="fold")
        with PreftClient(cluster.local_address or cluster.address,
                         api_key=cluster.api_key) as client:
            for prompt in DEMO_PROMPTS:
                for adapter in [None, *(n for n, _ in cfg.adapters)]:
                    c = client.generate(adapter, prompt=prompt, max_tokens=args.max_tokens,
                                        temperature=0.0)
                    t = c.timings
                    gbps = c.kv_bytes / t.kv_transfer_s / 1e9 if t.kv_transfer_s else 0.0
                    ok = (c.text == expected(tasks.get(adapter or ""), prompt)
                          if demo and (adapter is None or adapter in tasks) else None)
                    table.add_row(prompt, adapter or "(base)", repr(c.text),
                                  {True: "[green]✓", False: "[red]✗", None: ""}[ok],
                                  f"{t.ttft_s * 1e3:.1f}", f"{c.kv_bytes / 1024:.0f}",
                                  f"{gbps:.2f}")
                table.add_section()
        console.print(table)
        if demo:
            console.print("✓: exactly what the base model (copy) or the adapter was trained to say. "
                          "Try `preft up` and `preft generate --adapter carol 'bad cafe>'`: "
                          "2-4 words of the letters a-h, ending in '>'.")
    finally:
        cluster.stop()
    return 0


def _tls_kwargs(args) -> dict:
    return {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
            "tls_server_name": args.tls_server_name}


def _add_client_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="connect over TLS, verifying "
                   "the router's certificate with this CA (a router started with --tls-cert)")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate for "
                   "mutual TLS (router started with --tls-client-ca); needs --tls-key")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-server-name", default=None, metavar="NAME", help="name to verify "
                   "the router's certificate against, when it differs from --address's host")


def _client(args):
    from preft_client import PreftClient

    return PreftClient(args.address, api_key=args.api_key or os.environ.get("PREFT_API_KEY"),
                       timeout=args.timeout, **_tls_kwargs(args))


def iso_time(ts: float) -> str:
    """A Unix time as local ISO 8601 with its offset, e.g. 2026-12-07T14:05:10+01:00."""
    from datetime import datetime

    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def out_console():
    """A rich console on stdout: a terminal's width, else wide enough that every table row
    comes out whole (a pipe or file never gets rows cut at 80 columns)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=10_000)


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj, indent=2, sort_keys=True))


def adapter_dict(a) -> dict:
    """One ``AdapterInfo`` as plain data, ``created`` as ISO 8601."""
    from dataclasses import asdict

    return {**asdict(a), "target_modules": list(a.target_modules), "created": iso_time(a.created)}


def _adapters_list(c, args, console) -> None:
    from rich.table import Table

    rows = [adapter_dict(a) for a in c.list_adapters().values()]
    if args.output == "json":
        return _print_json(rows)
    table = Table("name", "version", "kind", "rank", "size", "owner", "public", "created")
    for a in rows:
        table.add_row(a["name"], str(a["version"]), a["kind"], str(a["rank"]),
                      f"{a['size_bytes'] / 1024:.0f} KiB", a["owner"] or "-", str(a["public"]),
                      a["created"])
    console.print(table)


def _adapters_show(c, args, console) -> None:
    a = adapter_dict(c.get_adapter(args.name))
    if args.output == "json":
        return _print_json(a)
    for k, v in a.items():
        console.print(f"{k:>15}: {', '.join(v) if isinstance(v, list) else v}", markup=False)


def _adapters_add(c, args, console) -> None:
    from rich.progress import Progress

    with Progress(console=console) as prog:
        task = prog.add_task(f"upload {args.name}", total=None)
        info = c.register_adapter(args.name, args.path, public=args.public, kind=args.kind,
                                  progress=lambda s, t: prog.update(task, completed=s, total=t))
    console.print(f"registered {info.name} v{info.version} ({info.kind}, rank "
                  f"{info.rank}, sha256 {info.sha256[:12]}...)")


def _adapters_rm(c, args, console) -> None:
    c.delete_adapter(args.name)
    console.print(f"deleted {args.name}")


def cmd_adapters(args) -> int:
    from preft_client import PreftClientError

    action = {"add": _adapters_add, "list": _adapters_list, "show": _adapters_show,
              "rm": _adapters_rm}[args.action]
    try:
        with _client(args) as c:
            action(c, args, out_console())
    except PreftClientError as e:
        return client_error(e)
    return 0


def _status_table(st: dict):
    from rich.table import Table

    from app.top import slot_text

    table = Table(title=f"PreFT cluster: {st['adapters']} adapters, {st['router_inflight']} "
                  f"requests in flight{' (state STALE: Redis unreachable)' if st['state_stale'] else ''}")
    for col in ("worker", "role", "TP", "healthy", "outstanding", "KV blocks used",
                "held transfers", "KV sent", "resident adapters", "adapter slots"):
        table.add_column(col)
    for w in st["workers"]:
        used = (f"{w.kv_blocks_total - w.kv_blocks_free}/{w.kv_blocks_total}"
                if w.role in ("decode", "colocated") else "-")
        table.add_row(w.worker_id, w.role, str(w.tensor_parallel_size),
                      "yes" if w.healthy else "NO", str(w.outstanding), used,
                      str(w.held_transfers) if w.role == "prefill" else "-",
                      f"{w.kv_bytes_sent / 2**20:.1f} MiB" if w.role == "prefill" else "-",
                      ", ".join(f"{k}:{v}" for k, v in sorted(w.resident.items())) or "-",
                      slot_text(st["slots"], w.worker_id))
    return table


def cmd_status(args) -> int:
    from dataclasses import asdict

    from app.top import cluster_status
    from preft_client import PreftClientError

    try:
        with _client(args) as c:
            st = cluster_status(c)
    except PreftClientError as e:
        return client_error(e)
    if args.output == "json":
        _print_json({**st, "workers": [asdict(w) for w in st["workers"]],
                     "slots": {k: list(v) for k, v in st["slots"].items()}})
    else:
        out_console().print(_status_table(st))
    return 0


def cmd_top(args) -> int:
    from app.top import run

    url = args.metrics_url
    if url and not url.startswith("http"):
        url = f"http://{url}/metrics"
    from preft_client import PreftClientError

    try:
        with _client(args) as c:
            run(c, args.address, url, args.interval, args.iterations, console=out_console())
    except KeyboardInterrupt:
        pass
    except PreftClientError as e:
        return client_error(e)
    return 0


def _cluster_redis(args) -> tuple[str, str]:
    """(Redis URL, where it came from): --redis-url, $REDIS_URL, else the running cluster's
    ``<run-dir>/cluster.json`` (written by ``preft up``)."""
    import json

    from cluster.config import ConfigError

    if args.redis_url:
        return args.redis_url, "--redis-url"
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"], "$REDIS_URL"
    info = Path(args.run_dir) / "cluster.json"
    try:
        return json.loads(info.read_text())["redis_url"], str(info)
    except FileNotFoundError:
        raise ConfigError(f"no cluster found: {info.resolve()} does not exist; start one with "
                          "`preft up` (in this directory, or pass its --run-dir), or give "
                          "--redis-url") from None
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--run-dir {args.run_dir}: cannot read {info}: {e}") from None


def cmd_keys(args) -> int:
    import redis

    from cluster.config import ConfigError
    from cluster.s3_store import shown
    from cluster.state import ClusterState, new_api_key

    url, source = _cluster_redis(args)
    key = new_api_key()
    try:
        ClusterState.from_url(url).add_api_key(key, args.tenant)
    except redis.RedisError as e:
        raise ConfigError(f"cannot reach the cluster's Redis at {shown(url)} (from {source}): "
                          f"{e}; is its `preft up` still running?") from None
    print(key)
    print(f"tenant {args.tenant}: key created (only its sha256 is stored; keep it safe)",
          file=sys.stderr)
    return 0


def cmd_make_tiny(args) -> int:
    model, adapters, rec = assets.demo_assets(Path(args.home))
    print(f"demo model: {model}")
    for n, p in adapters.items():
        a = rec["adapters"][n]
        print(f"adapter {n}: {p}  ({a['label']}: {a['trained_to']}; held-out exact match "
              f"{a['eval_exact_match']:.0%})")
    print(f"tiny model (benchmarks): {assets.tiny_assets(Path(args.home))[0]}")
    return 0


def cmd_bench(args) -> int:
    from bench.e2e import run_from_args

    return run_from_args(args, assets.DEFAULT_HOME / "bench")


def make_parser() -> argparse.ArgumentParser:
    """``preft``'s parser: one sub-command per ``_parser_*`` below, in ``--help`` order."""
    p = argparse.ArgumentParser(
        prog="preft", description="PreFT Serve: per-user adapters applied at prefill only, "
        "decoded by adapter-free engines over the adapter-conditioned KV cache.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_parser_up, _parser_generate, _parser_demo, _parser_adapters, _parser_status,
                _parser_top, _parser_keys, _parser_bench, _parser_trainer, _parser_make_tiny):
        add(sub)
    return p


def _add_client_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--address", default="127.0.0.1:50051", help="router HOST:PORT")
    sp.add_argument("--api-key", default=None, help="API key (default $PREFT_API_KEY)")
    sp.add_argument("--timeout", type=SECONDS, default=300.0, help="call deadline, seconds")
    _add_client_tls_args(sp)


def _add_output_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--output", "-o", choices=["table", "json"], default="table",
                    help="table (default; piped, as wide as its content) or json")


def _parser_up(sub) -> None:
    up = sub.add_parser("up", help="start a local cluster and serve until interrupted",
                        description="Start Ray, the worker pools and the gRPC router. By "
                        "default one prefill worker (vLLM + adapters) and one decode worker "
                        "(vLLM, no adapters); --colocated-workers N alone starts N colocated "
                        "workers instead (one engine each: the adapter on the prompt, decoding "
                        "in the same batch, all-token LoRA adapters too). Prints 'router "
                        "listening on HOST:PORT' when ready; Ctrl-C shuts down.")
    _add_cluster_args(up)
    _add_stop_args(up)
    up.set_defaults(fn=cmd_up)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return v


def _add_stop_args(p: argparse.ArgumentParser) -> None:
    """How ``preft up`` meets another base model, and how it stops."""
    p.add_argument("--revalidate-adapters", action="store_true", help="the run directory's "
                   "adapters were validated against another base model: check each against "
                   "this one and remove those that do not fit (default: refuse to start)")
    p.add_argument("--drain-timeout", type=_seconds, default=10.0, metavar="S",
                   help="on SIGINT/SIGTERM, refuse new requests and let those in flight "
                   "finish for up to S seconds, then end them with an error (default 10); "
                   "a second signal stops at once")


def _parser_generate(sub) -> None:
    gen = sub.add_parser("generate", help="send one request to a running router",
                         description="Generate a completion through the router.")
    gen.add_argument("prompt", help="prompt text")
    gen.add_argument("--adapter", default=None, help="adapter name (default: the base model)")
    gen.add_argument("--max-tokens", type=_bounded(int, 1), default=32, help="tokens to generate (>= 1)")
    gen.add_argument("--temperature", type=_bounded(float, 0), default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=_bounded(float, 0, 1, lo_open=True), default=1.0, help="nucleus sampling mass (0, 1]")
    gen.add_argument("--seed", type=_bounded(int, 0, 2**64 - 1), default=None, help="sampling seed")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--n", type=_bounded(int, 1, 16), default=None,
                     help="samples of the prompt, 1..16 (one prefill; each printed)")
    gen.add_argument("--logprobs", type=_bounded(int, 0, 20), default=None, metavar="K",
                     help="print each token's logprob and the top K alternatives (0..20)")
    gen.add_argument("--top-k", type=_bounded(int, 0, note=" (0 = off)"), default=None, help="sample from the K most likely")
    gen.add_argument("--min-p", type=_bounded(float, 0, 1), default=None, help="minimum relative probability")
    gen.add_argument("--presence-penalty", type=_bounded(float, -2, 2), default=None, help="[-2, 2]")
    gen.add_argument("--frequency-penalty", type=_bounded(float, -2, 2), default=None, help="[-2, 2]")
    gen.add_argument("--repetition-penalty", type=_bounded(float, 0, 10, lo_open=True), default=None, help="(0, 10]; 1 = off")
    gen.add_argument("--min-tokens", type=_bounded(int, 0), default=None, help="no EOS before this many")
    guide = gen.add_mutually_exclusive_group()
    guide.add_argument("--json-schema", default=None, metavar="FILE|JSON",
                       help="structured output: the completion is JSON valid under this schema")
    guide.add_argument("--regex", default=None, help="structured output: matches this regex")
    guide.add_argument("--choice", action="append", default=None,
                       help="structured output: exactly one of these (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print text as it arrives")
    _add_client_args(gen)
    gen.set_defaults(fn=cmd_generate)


def _parser_demo(sub) -> None:
    demo = sub.add_parser("demo", help="run the embedded default cluster and a few requests",
                          description="Train the demo model and its adapters locally (first "
                          "run only, ~3-4 min; then reused from $PREFT_HOME/demo), start a "
                          "cluster, send the same prompts to the base model and to each adapter "
                          "(alice: LoRA-P, bob: LoReFT-P, carol: DiReFT-P), print what each "
                          "says next to what it was trained to say, with TTFT and KV bytes "
                          "moved, then shut down.")
    _add_cluster_args(demo)
    demo.add_argument("--max-tokens", type=_bounded(int, 1), default=40, help="tokens per request (the "
                      "demo model is character-level; answers end at EOS)")
    demo.set_defaults(fn=cmd_demo)


def _parser_adapters(sub) -> None:
    ad = sub.add_parser("adapters", help="manage adapters on a running router",
                        description="Upload, list, show or delete adapters (PEFT LoRA "
                        "directories: adapter_config.json + adapter_model.safetensors).")
    ad_sub = ad.add_subparsers(dest="action", required=True)
    a_add = ad_sub.add_parser("add", help="upload an adapter directory (new name or new version)")
    a_add.add_argument("name")
    a_add.add_argument("path")
    a_add.add_argument("--public", action="store_true", help="usable by every tenant")
    a_add.add_argument("--kind", choices=["lora_p", "reft_p", "lora", "alora"], default=None,
                       help="lora_p: PEFT LoRA on the prompt only (default for LoRA files); "
                       "reft_p: ReFT-P files; lora: the LoRA on every token (all-token); "
                       "alora: activated LoRA, from its invocation tokens on (default for "
                       "PEFT files with alora_invocation_tokens). lora and alora are served "
                       "by colocated workers only")
    a_list = ad_sub.add_parser("list", help="adapters you can use")
    a_show = ad_sub.add_parser("show", help="one adapter's registry record")
    a_show.add_argument("name")
    for sp in (a_list, a_show):
        _add_output_arg(sp)
    a_rm = ad_sub.add_parser("rm", help="delete an adapter from every tier")
    a_rm.add_argument("name")
    for sp in (a_add, a_list, a_show, a_rm):
        _add_client_args(sp)
    ad.set_defaults(fn=cmd_adapters)


def _parser_status(sub) -> None:
    st = sub.add_parser("status", help="workers, residency, queues and KV usage (a table)")
    _add_client_args(st)
    _add_output_arg(st)
    st.set_defaults(fn=cmd_status)


def _parser_top(sub) -> None:
    top = sub.add_parser("top", help="live view: KV GB/s, TTFT/TPOT, queues, workers",
                         description="A live terminal view of a running cluster: workers, "
                         "health, queues and KV blocks from the router; with --metrics-url "
                         "also KV transfer GB/s (overall and per pair), request and token "
                         "rates, TTFT/TPOT p50/p99 and adapter hit rate per interval.")
    _add_client_args(top)
    top.add_argument("--metrics-url", default=None, help="router /metrics (HOST:PORT or URL), "
                     "as served by `preft up --metrics-port` or --http-port")
    top.add_argument("--interval", type=SECONDS, default=2.0, help="seconds between refreshes")
    top.add_argument("--iterations", type=_bounded(int, 1), default=None, help="stop after N refreshes")
    top.set_defaults(fn=cmd_top)


def _parser_keys(sub) -> None:
    keys = sub.add_parser("keys", help="manage API keys", description="API keys map to "
                          "tenants; a tenant uses its own adapters and public ones.")
    k_sub = keys.add_subparsers(dest="action", required=True)
    k_new = k_sub.add_parser("create", help="create a key for a tenant and print it once")
    k_new.add_argument("--tenant", required=True, help="tenant name ('admin' manages all)")
    k_new.add_argument("--redis-url", default=None, help="the cluster's Redis (default "
                       "$REDIS_URL, else the one `preft up` started, from --run-dir)")
    k_new.add_argument("--run-dir", default=".preft/run", help="the running cluster's --run-dir "
                       "(its cluster.json says where its Redis is; default .preft/run)")
    keys.set_defaults(fn=cmd_keys)


def _parser_bench(sub) -> None:
    from bench.e2e import __doc__ as bench_doc, add_args as bench_args

    bn = sub.add_parser("bench", help="throughput: PreFT cluster vs vLLM multi-LoRA vs base",
                        description=bench_doc,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_args(bn)
    bn.set_defaults(fn=cmd_bench)


def _parser_trainer(sub) -> None:
    from trainer.cli import add_train_parser
    from trainer.pyreft_convert import add_parser as add_convert_parser

    add_train_parser(sub)     # preft train: SFT of lora_p / reft_p / lora adapters
    add_convert_parser(sub)   # preft convert-pyreft: pyreft save -> ReFT-P safetensors


def _parser_make_tiny(sub) -> None:
    mk = sub.add_parser("make-tiny", help="build the embedded default model and adapters",
                        description="Train the embedded demo model and adapters alice, bob, "
                        "carol (trainer/demo.py; no download, ~3-4 CPU minutes) and write the "
                        "random-weight tiny model the benchmarks use.")
    mk.add_argument("--home", default=str(assets.DEFAULT_HOME), help="where to write them")
    mk.set_defaults(fn=cmd_make_tiny)


def main(argv: list[str] | None = None) -> int:
    from cluster.config import ConfigError

    args = make_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:   # a setting that cannot work: one line, no traceback
        print(f"preft {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
