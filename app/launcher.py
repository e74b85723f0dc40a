"""Brings a cluster up: Ray, the prefill and decode worker actors, and the router.

Used by ``preft up``/``preft demo`` and by the integration tests. The router runs on an
asyncio loop (the caller's, or a background thread's for tests); the workers are Ray actors
that each own one in-process vLLM engine pinned to its own cores.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from app.shutdown import kill_tree, process_tree, ray_node_pids
from cluster.config import ClusterConfig, ConfigError
from cluster.messages import WorkerInfo

log = logging.getLogger(__name__)


def split_cores(n: int) -> tuple[str, str]:
    """Disjoint OpenMP core sets for the prefill and decode engines on one machine."""
    if n <= 1:
        return "0", "0"
    half = n // 2
    fmt = lambda a, b: str(a) if a == b else f"{a}-{b}"  # noqa: E731
    return fmt(0, half - 1), fmt(half, n - 1)


def with_kv_secret(cfg: ClusterConfig) -> ClusterConfig:
    """One cluster secret: both pools' KV endpoints pair under it, and the router and every
    worker authenticate each other with it on the worker plane. The configured one, else a
    random one."""
    given = {s for s in (cfg.prefill.transfer.secret, cfg.decode.transfer.secret,
                         cfg.router.secret, cfg.colocated.secret if cfg.colocated else "") if s}
    if len(given) > 1:
        raise ConfigError("prefill.transfer.secret, decode.transfer.secret, router.secret and "
                          "colocated.secret differ: the pools could never pair or talk; set "
                          "the same one on all, or none")
    secret = given.pop() if given else secrets.token_hex(16)
    colocated = cfg.colocated and replace(cfg.colocated, secret=secret)
    return replace(
        cfg, prefill=replace(cfg.prefill, transfer=replace(cfg.prefill.transfer, secret=secret)),
        decode=replace(cfg.decode, transfer=replace(cfg.decode.transfer, secret=secret)),
        router=replace(cfg.router, secret=secret), colocated=colocated)


def omp_env(cpu_cores: str, shared: bool = False) -> dict[str, str]:
    """The worker process's OpenMP settings for its engine's cores, as vLLM's own CPU
    executor gives its worker processes: one thread per core, each bound to its core.
    ``shared``: other engines run on the same cores, so a thread that waits sleeps
    (``OMP_WAIT_POLICY=PASSIVE``) rather than spin on a core another engine needs."""
    from worker_runtime.env import parse_cores

    cores = parse_cores(cpu_cores)
    env = {"OMP_NUM_THREADS": str(len(cores)), "OMP_PROC_BIND": "true",
           "OMP_PLACES": "{" + ",".join(map(str, cores)) + "}"}
    return {**env, "OMP_WAIT_POLICY": "PASSIVE"} if shared else env


RUN_INFO = "cluster.json"   # in the run directory: where `preft keys create` finds Redis
ADMIN_KEY = "admin.key"     # in the run directory: `preft up --require-auth`'s own key


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by this account only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)   # O_CREAT's mode applies only to a new file


def admin_key(run_dir: Path, state) -> tuple[str, Path]:
    """The API key (tenant ``admin``) a cluster that requires keys uses for its own start-up
    work (adapter uploads): the one in ``<run_dir>/admin.key`` (mode 0600), else a new one
    written there; registered (by its hash) in ``state`` either way."""
    from cluster.state import new_api_key

    path = run_dir / ADMIN_KEY
    key = path.read_text().strip() if path.is_file() else ""
    if not key:
        key = new_api_key()
    write_private(path, key + "\n")
    state.add_api_key(key, "admin")
    return key, path


def _worker_class(role: str):
    if role == "prefill":
        from prefill_worker.worker import PrefillWorker
        return PrefillWorker
    if role == "decode":
        from decode_worker.worker import DecodeWorker
        return DecodeWorker
    from colocated_worker.worker import ColocatedWorker
    return ColocatedWorker


class RouterHttp:
    """The HTTP gateway running in a background router's loop (:meth:`LocalCluster.start_http`)."""

    def __init__(self, host: str) -> None:
        self.host, self.port, self.servers, self.future = host, None, [], None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        for s in self.servers:
            s.should_exit = True
        try:
            self.future.result(timeout)
        except Exception:
            pass


class LocalCluster:
    def __init__(self, cfg: ClusterConfig, *, log_to_driver: bool = False,
                 api_key: str | None = None) -> None:
        self.cfg = with_kv_secret(cfg)   # restarted and added workers get the same secret
        self.log_to_driver = log_to_driver
        self.api_key = api_key           # used for start-up adapter uploads when auth is on
        self.api_key_file: Path | None = None   # where start_state kept the admin key it made
        self.pool = None
        self.port: int | None = None
        self.redis = None                # our RedisServer when we started one
        self.redis_url = cfg.redis_url
        self.run_dir = Path(cfg.run_dir).resolve()
        self.store = None
        self.view = None
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._owns_ray = False
        self._ray_pids: list[int] = []   # the Ray node's processes, when we started it
        self._ray_tree: list = []        # those and their descendants, as stop began
        self._next_index = {"prefill": 0, "decode": 0, "colocated": 0}
        self._actors: dict = {}
        self._metrics_http = None        # Prometheus /metrics server (router.metrics_port)
        self.metrics_port: int | None = None

    # -------------------------------------------------------------- state
    def start_state(self, say) -> None:
        from cluster.adapter_store import store_for
        from app.redis_proc import RedisServer

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.redis_url is None:
            say("starting redis-server on loopback")
            self.redis = RedisServer(self.run_dir / "redis").start()
            self.redis_url = self.redis.url
        else:  # an external Redis: a wrong password fails here, before Ray and the engines
            from cluster.state import ClusterState
            ClusterState.from_url(self.redis_url).check()
        self.store = store_for(self.cfg.store_uri or str(self.run_dir / "store"))
        if self.cfg.router.require_auth and self.api_key is None:
            self.api_key, self.api_key_file = admin_key(self.run_dir, self.state())
        write_private(self.run_dir / RUN_INFO, json.dumps({"redis_url": self.redis_url,
                                                           "name": self.cfg.name}) + "\n")

    def check_registry_model(self):
        """The registry's base model against this cluster's (``app/model_binding.py``),
        before Ray starts: None when they agree; the binding to record after
        :meth:`revalidate_registry` (``on_model_change: revalidate``); else ConfigError."""
        from app.model_binding import check_binding
        from cluster.state import ClusterState

        model = self.cfg.prefill.engine.model
        if not Path(model, "config.json").is_file():   # on the worker nodes only (KubeRay)
            log.warning("model %s is not on this machine: the registry's base model is not "
                        "checked here; workers check each adapter when they load it", model)
            return None
        state = ClusterState.from_url(self.redis_url)
        where = (f"run directory {self.run_dir}" if self.redis is not None else
                 "Redis registry at " + self.redis_url.rpartition("@")[2])
        try:
            return check_binding(state, model, where, self.cfg.on_model_change)
        except ConfigError:   # refused: the Redis we started goes too
            self.stop()
            raise

    def revalidate_registry(self, binding, say) -> list[str]:
        """Every registered adapter validated again by a worker of this model; those that
        do not fit removed, the registry bound to ``binding``; the names removed."""
        import ray

        from app.model_binding import revalidate
        from router.service_base import unwrap

        host = next(a for wid, a in self._actors.items() if not wid.startswith("decode"))

        def validate(uri: str, kind: str):
            try:
                return ray.get(host.validate_adapter.remote(uri, kind), timeout=120)
            except Exception as e:   # Ray wraps the worker's InvalidAdapter
                raise unwrap(e) from None
        return revalidate(self.state(), validate, binding, say)

    # -------------------------------------------------------------- workers
    def _cores(self, role: str, index: int) -> str | None:
        """Locally: disjoint cores for a prefill/decode pair (``local_cores: split``); a
        colocated engine, which prefills and decodes, and every engine under
        ``local_cores: shared`` get them all."""
        if self.cfg.ray_address:
            return None
        n = os.cpu_count() or 2
        if role == "colocated" or self.cfg.local_cores == "shared":
            return "0" if n <= 1 else f"0-{n - 1}"
        p_cores, d_cores = split_cores(n)
        return p_cores if role == "prefill" else d_cores

    def add_worker(self, role: str):
        """Start one more worker actor of ``role``; it joins the router's pool by heartbeat."""
        import ray

        i = self._next_index[role]
        self._next_index[role] += 1
        wid, name = f"{role}-{i}", f"{self.cfg.name}-{role}-{i}"
        wcfg = {"prefill": self.cfg.prefill, "decode": self.cfg.decode,
                "colocated": self.cfg.colocated_cfg}[role]
        # GPU clusters: one GPU (or a fraction) per worker via Ray resources; custom
        # resources pin pools to node groups (e.g. prefill nodes vs decode nodes).
        # A crashed worker is restarted by Ray (its __init__ runs again: new engine, new KV
        # endpoint, fresh heartbeat); calls in flight on the dead instance fail, never retry.
        # A tensor-parallel engine's ranks are the actor's child processes: one CPU slot
        # each (and num_gpus counts the worker's GPUs: one per rank on GPU nodes).
        opts = dict(name=name, num_cpus=wcfg.engine.tensor_parallel_size, max_concurrency=1000,
                    max_restarts=self.cfg.max_restarts, max_task_retries=0,
                    num_gpus=wcfg.num_gpus or None, resources=dict(wcfg.resources) or None)
        cfg = replace(wcfg, cpu_cores=wcfg.cpu_cores or self._cores(role, i))
        if cfg.cpu_cores:  # OpenMP reads these once, when the worker process loads torch
            opts["runtime_env"] = {"env_vars": omp_env(
                cfg.cpu_cores, shared=self.cfg.local_cores == "shared" and role != "colocated")}
        cls = _worker_class(role)
        if role == "decode":
            actor = ray.remote(cls).options(**opts).remote(cfg, wid, self.redis_url, name)
        else:  # adapter hosts: a disk cache of their own
            actor = ray.remote(cls).options(**opts).remote(
                cfg, wid, self.redis_url, str(self.run_dir / "cache" / wid), name)
        # Ray ends an actor when its creator's last handle goes; the cluster owns them all.
        self._actors[wid] = actor
        return actor

    def resolve_model(self) -> None:
        """Check the engines' settings against the model's config.json and fill in the unset
        max_model_len with the model's own, before Redis, Ray or any engine starts."""
        from cluster.model_info import resolve_cluster, structured_output_problem

        model = self.cfg.prefill.engine.model
        if self.cfg.ray_address and not Path(model).is_dir():
            # e.g. KubeRay: the model is mounted on the worker nodes only; vLLM checks it there.
            log.warning("model %s is not on this machine: its config.json is checked by the "
                        "workers' engines, not up front", model)
            return
        self.cfg = resolve_cluster(self.cfg)
        problem = structured_output_problem(model)
        if problem:   # said once here, not discovered per request
            log.warning("%s", problem)
            print(f"warning: {problem}", file=sys.stderr, flush=True)

    def start_workers(self, progress: Callable[[str], None] | None = None) -> None:
        import ray

        from cluster.state import ClusterState
        from router.pool import POLICIES, WorkerHandle, WorkerPool
        from router.state_view import StateView

        say = progress or (lambda msg: log.info(msg))
        self.resolve_model()
        cfg = self.cfg
        self.start_state(say)
        rebind = self.check_registry_model()
        if not ray.is_initialized():
            say("starting Ray")
            # Locally, CPU "slots" are logical: engines bind their own cores (cpu_cores), and
            # a pool may grow past the core count (add_worker).
            num_cpus = cfg.num_cpus or (None if cfg.ray_address else max(os.cpu_count() or 2, 16))
            ray.init(address=cfg.ray_address, num_cpus=num_cpus, namespace="preft",
                     include_dashboard=False,
                     object_store_memory=None if cfg.ray_address else 256 << 20,
                     log_to_driver=self.log_to_driver, logging_level=logging.WARNING)
            self._owns_ray = True
            self._ray_pids = ray_node_pids()   # killed with their descendants at stop
        say(f"starting {cfg.prefill_workers} prefill, {cfg.decode_workers} decode and "
            f"{cfg.colocated_workers} colocated workers (vLLM engines)")
        actors = [(role, self.add_worker(role)) for role, n in (
            ("prefill", cfg.prefill_workers), ("decode", cfg.decode_workers),
            ("colocated", cfg.colocated_workers)) for _ in range(n)]
        infos: list[WorkerInfo] = []
        for role, actor in actors:
            info = ray.get(actor.info.remote())
            say(f"{info.worker_id} ready ({info.engine_start_s:.1f} s engine start)")
            infos.append(info)
        layouts = {i.kv_layout for i in infos if i.role in ("prefill", "decode")}
        if len(layouts) > 1:
            raise ConfigError(f"refusing to pair workers with different KV layouts {sorted(layouts)}: "
                              "all need the same model, block size and KV cache dtype")
        if any(i.lora_enabled for i in infos if i.role == "decode"):
            raise ConfigError("a decode engine was built with LoRA; decode must never load adapters")
        self.pool = WorkerPool(prefill_policy=POLICIES[cfg.router.prefill_policy].from_config(
                                   cfg.router, cfg.prefill),
                               decode_policy=POLICIES[cfg.router.decode_policy]())
        for (role, actor), info in zip(actors, infos):
            self.pool.add(WorkerHandle(info, actor))
        if rebind is not None:
            self.revalidate_registry(rebind, say)
        self.view = StateView(ClusterState.from_url(self.redis_url), cfg.router.state_refresh_s)

    def state(self):
        from cluster.state import ClusterState

        return ClusterState.from_url(self.redis_url)

    def register_adapter(self, name: str, path: str, public: bool = True,
                         kind: str | None = None) -> int:
        """Upload an adapter through the router's RegisterAdapter; returns its version."""
        from preft_client import PreftClient

        with PreftClient(self.local_address or self.address, api_key=self.api_key) as c:
            return c.register_adapter(name, path, public=public, kind=kind).version

    def register_startup_adapters(self, progress=None) -> None:
        kinds = dict(self.cfg.adapter_kinds)
        for name, path in self.cfg.adapters:
            v = self.register_adapter(name, path, kind=kinds.get(name))
            if progress:
                progress(f"adapter {name} registered (v{v})")

    # -------------------------------------------------------------- router
    async def start_router(self) -> int:
        from router.server import create_server, start

        self._server, self.port = create_server(self.cfg.router, self.pool, self.view, self.store)
        await start(self._server)
        if self.cfg.router.metrics_port is not None and self._metrics_http is None:
            from router.metrics import start_metrics_server

            self._metrics_http, self.metrics_port = start_metrics_server(
                self.cfg.router.host, self.cfg.router.metrics_port)
        return self.port

    def start_in_thread(self, progress: Callable[[str], None] | None = None) -> "LocalCluster":
        """Workers, the router on a background loop, then the start-up adapters (tests,
        benchmarks): a serving cluster when it returns."""
        self.start_workers(progress)
        self.start_router_in_thread()
        self.register_startup_adapters(progress)
        return self

    def start_router_in_thread(self) -> int:
        """Run the router on a background event loop (tests, demo)."""
        ready = threading.Event()
        err: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self.start_router())
            except BaseException as e:
                err.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="router", daemon=True)
        self._thread.start()
        ready.wait(60)
        if err:
            raise err[0]
        return self.port

    async def serve_http(self, host: str = "127.0.0.1", port: int = 0, **kwargs) -> None:
        """The OpenAI-compatible gateway in this router's process, on its event loop: each
        HTTP request calls the router's ``Generate`` in-process (the SDK's
        ``InProcessClient``), no gRPC hop. ``kwargs``: ``http_gateway.serve_http``'s."""
        from http_gateway import serve_http
        from http_gateway.gateway import DEFAULT_TIMEOUT_S
        from preft_client import chat_template_of
        from preft_client.local import InProcessClient

        client = InProcessClient(self._server.service,
                                 timeout=kwargs.pop("timeout", DEFAULT_TIMEOUT_S))
        kwargs.setdefault("handle_signals", False)   # the program's: it drains first
        # chat: the served model's own template, the one `preft train` renders (preft_client.chat)
        kwargs.setdefault("chat_template", chat_template_of(self.cfg.prefill.engine.model))
        await serve_http(self.local_address or self.address, host, port, client=client,
                         **kwargs)

    def start_http(self, host: str = "127.0.0.1", port: int = 0, **kwargs) -> "RouterHttp":
        """:meth:`serve_http` on the background router's loop (tests, benchmarks); the
        returned handle has ``base_url``, ``port`` and ``stop()``."""
        ready, servers = threading.Event(), []
        http = RouterHttp(host)

        def on_ready(p: int) -> None:
            http.port = p
            ready.set()
        http.future = asyncio.run_coroutine_threadsafe(
            self.serve_http(host, port, ready=on_ready, server_out=servers, **kwargs),
            self._loop)
        http.future.add_done_callback(lambda _: ready.set())
        ready.wait(30)
        if http.port is None:
            raise RuntimeError(f"the router's HTTP gateway did not start: "
                               f"{http.future.exception() if http.future.done() else 'timeout'}")
        http.servers = servers
        return http

    @property
    def address(self) -> str:
        host = self.cfg.router.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"

    @property
    def local_address(self) -> str | None:
        """With router TLS: its plaintext Unix socket (this account only), for our own clients."""
        return getattr(self._server, "local_address", None)

    async def stop_router(self) -> None:
        if self._server is not None:
            await self._server.health_servicer.enter_graceful_shutdown()
            await self._server.service.view.stop()
            await self._server.service.pin_sync.stop()
            await self._server.stop(grace=2)
            self._server.service.close()
            if getattr(self._server, "local_dir", None):   # the TLS router's Unix socket
                import shutil
                shutil.rmtree(self._server.local_dir, ignore_errors=True)
            self._server = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http = None

    def stop(self) -> None:
        import ray

        if self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self.stop_router(), self._loop)
            try:
                fut.result(10)
            except Exception:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
        for actor in self._actors.values():
            try:
                ray.get(actor.shutdown.remote(), timeout=15)
            except Exception:
                pass
            ray.kill(actor)
        self._actors.clear()
        self.pool = None
        if self._owns_ray and ray.is_initialized():
            self._ray_tree = process_tree(self._ray_pids)
            ray.shutdown()
            # what ray.shutdown leaves (agents, workers whose raylet went first) goes too
            kill_tree(self._ray_tree, grace=2.0)
            self._owns_ray = False
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def kill(self) -> None:
        """At once, nothing waited on (``preft up``'s second signal): Redis stopped, every
        process of the Ray cluster this launcher started killed (the node's processes and
        all their descendants: raylet, GCS, agents, workers, their engines' processes)."""
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._owns_ray:
            kill_tree([*self._ray_tree, *process_tree(self._ray_pids)])

    async def drain(self, timeout: float, say=log.info) -> int:
        """The router's graceful drain (``app/shutdown.py``): health NOT_SERVING, new
        requests refused, those in flight given ``timeout`` s, the rest ended with
        UNAVAILABLE; how many were ended unfinished."""
        if self._server is None:
            return 0
        await self._server.health_servicer.enter_graceful_shutdown()
        return await self._server.service.drain(timeout, say=say)

    def wait_until(self, cond: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        return cond()
