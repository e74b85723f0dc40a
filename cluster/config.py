"""Frozen, validated configs: one per component. YAML in ``deploy/`` parses into these.

Stdlib frozen dataclasses, each checking its values in ``__post_init__``. :func:`from_dict`
turns plain data (parsed YAML) into them through pydantic: it checks every field's type,
refuses unknown fields (``extra="forbid"``), builds the nested configs and accepts a YAML
mapping where a tuple of pairs is meant (``adapters``, ``adapter_kinds``, ``resources``).
Every error names the field and the value so an operator knows what to fix.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError

_DTYPES = ("float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_KV_TRANSPORTS = ("torch_dist",)   # kv_transfer.transport.TorchDistTransport.name
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ConfigError(ValueError):
    pass


def _need(cond: bool, cls: str, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{name}={value!r}: {why}")


def _pairs(value: Any) -> Any:
    """A YAML mapping ``{name: value}`` where a tuple of pairs is meant: its sorted items."""
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


Pairs = Annotated[tuple[tuple[str, str], ...], BeforeValidator(_pairs)]
Resources = Annotated[tuple[tuple[str, float], ...], BeforeValidator(_pairs)]
_FORBID_EXTRA = ConfigDict(extra="forbid")   # pydantic: an unknown field is an error


def valid_adapter_name(name: str) -> bool:
    # fullmatch: with match(), "$" also matches before a trailing newline ("abc\n" passed)
    return bool(_NAME_RE.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class EngineConfig:
    """What both pools' vLLM engines share: they must agree on model, dtype and blocks."""

    __pydantic_config__ = _FORBID_EXTRA
    model: str
    dtype: str = "float32"
    # Context length; None = the model's own (config.json, as vLLM derives it). The launcher
    # fills it in and checks it against the model before anything starts (cluster.model_info).
    max_model_len: int | None = None
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    seed: int = 0
    load_format: str = "auto"      # "dummy": random weights from the config (benchmarks)
    # Tokens per engine step (vLLM's max_num_batched_tokens; None = vLLM's default). On the
    # prefill pool, smaller steps hand KV to decode sooner (a shorter pipeline bubble).
    max_num_batched_tokens: int | None = None
    # Tensor parallelism: the engine's ranks are processes of its worker (vLLM's "mp"
    # executor), all on the worker's node; each holds a shard of the KV heads, and KV moves
    # rank i -> rank i, so the prefill and decode pools need the same size.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        c = "EngineConfig"
        _need(isinstance(self.tensor_parallel_size, int) and 1 <= self.tensor_parallel_size
              <= 64, c, "tensor_parallel_size", self.tensor_parallel_size,
              "must be an integer from 1 to 64")
        _need(bool(self.model), c, "model", self.model, "a model directory is required")
        if self.model.startswith("~"):
            object.__setattr__(self, "model", str(Path(self.model).expanduser()))
        _need(self.dtype in _DTYPES, c, "dtype", self.dtype, f"one of {_DTYPES}")
        _need(self.max_model_len is None or (isinstance(self.max_model_len, int)
                                             and self.max_model_len >= 16), c, "max_model_len",
              self.max_model_len, "must be an integer >= 16 (or unset: the model's own length)")
        _need(self.kv_cache_gib > 0, c, "kv_cache_gib", self.kv_cache_gib, "must be > 0")
        _need(self.max_num_seqs >= 1, c, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        _need(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 16, c,
              "max_num_batched_tokens", self.max_num_batched_tokens, "must be >= 16 (or unset)")
        _need(self.load_format in _LOAD_FORMATS, c, "load_format", self.load_format,
              f"one of {_LOAD_FORMATS}")


@dataclass(frozen=True)
class TransferConfig:
    __pydantic_config__ = _FORBID_EXTRA

    transport: str = "torch_dist"
    kv_host: str = "127.0.0.1"     # address this worker's KV endpoint binds/advertises;
                                   # "auto": the worker's Ray node IP (multi-node, KubeRay)
    timeout_s: float = 30.0
    hold_ttl_s: float = 120.0      # prefill frees unpulled blocks after this
    # Same-host pairs (proven at pairing: a shared /dev/shm and network namespace) move KV
    # through a shared-memory segment; False: always the torch.distributed group.
    shared_memory: bool = True
    # Prefill stages each prompt's KV layer by layer as its forward runs (the pull then
    # gathers nothing, and the engine frees the prompt's blocks when it finishes), in up to
    # staging_mib of buffers; False: blocks held until decode pulls, gathered then.
    layerwise: bool = True
    staging_mib: int = 1024
    # Per-cluster secret: a decode engine pairs with (and pulls from) a prefill engine only
    # when both hold the same one. Empty: LocalCluster draws a random one for both pools.
    secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        c = "TransferConfig"
        _need(self.transport in _KV_TRANSPORTS, c, "transport", self.transport,
              f"one of {_KV_TRANSPORTS}")
        _need(isinstance(self.secret, str), c, "secret", f"<{type(self.secret).__name__}>",
              "must be a string (the value is not shown)")
        _need(self.timeout_s > 0, c, "timeout_s", self.timeout_s, "must be > 0")
        _need(type(self.staging_mib) is int and self.staging_mib >= 0, c, "staging_mib",
              self.staging_mib, "must be an integer >= 0 (MiB of staging buffers)")
        _need(self.hold_ttl_s > self.timeout_s, c, "hold_ttl_s", self.hold_ttl_s,
              "must exceed timeout_s, or blocks could be freed while a pull is running")


@dataclass(frozen=True)
class PrefillConfig:
    __pydantic_config__ = _FORBID_EXTRA

    engine: EngineConfig
    transfer: TransferConfig = field(default_factory=TransferConfig)
    max_lora_rank: int = 16
    max_loras: int = 8                             # engine slots
    max_cpu_loras: int = 32                        # host-memory tier
    cpu_cores: str | None = None                   # e.g. "0" or "0-3": OpenMP binding
    max_adapter_bytes: int = 512 << 20
    lora_kernel: str = "grouped"                   # only "grouped": see __post_init__
    num_gpus: float = 0.0                          # Ray GPU resource per worker (GPU clusters)
    resources: Resources = ()                      # extra Ray resources, e.g. {prefill_node: 1}

    def __post_init__(self) -> None:
        _check_adapter_engine(self, "PrefillConfig")

    @property
    def pinnable_loras(self) -> int:
        """Adapters the router may pin in a worker's host tier (``max_cpu_loras``): one
        batch's adapters (up to ``max_loras``, all unpinned in the worst case) must fit in
        what is left, or loading one would evict another of the same batch; and at least
        one slot always churns for cold adapters. 0: no pinning."""
        return max(0, min(self.max_cpu_loras - self.max_loras, self.max_cpu_loras - 1))


def _check_adapter_engine(cfg, c: str) -> None:
    """The fields of a pool whose engine applies adapters (prefill, colocated)."""
    _need(cfg.lora_kernel == "grouped", c, "lora_kernel", cfg.lora_kernel,
          "must be 'grouped': vLLM's stock CPU LoRA ops apply the last slot's adapter to "
          "adapter-less requests in a mixed batch (docs/grouped_lora.md)")
    _need(cfg.max_lora_rank in (1, 8, 16, 32, 64, 128, 256, 320, 512), c,
          "max_lora_rank", cfg.max_lora_rank, "vLLM supports 1, 8, 16, 32, 64, 128, 256, 320, 512")
    _need(cfg.max_loras >= 1, c, "max_loras", cfg.max_loras, "must be >= 1")
    _need(cfg.max_cpu_loras >= cfg.max_loras, c, "max_cpu_loras", cfg.max_cpu_loras,
          f"must be >= max_loras={cfg.max_loras}")


@dataclass(frozen=True)
class ColocatedConfig:
    """A colocated worker: one engine applies the adapter to prompt positions and decodes
    (no KV transfer, so no TransferConfig). The only pool that serves kind ``lora``."""

    __pydantic_config__ = _FORBID_EXTRA
    engine: EngineConfig
    max_lora_rank: int = 16
    max_loras: int = 8
    max_cpu_loras: int = 32
    cpu_cores: str | None = None
    max_adapter_bytes: int = 512 << 20
    lora_kernel: str = "grouped"
    num_gpus: float = 0.0
    resources: Resources = ()
    # The worker plane (router <-> worker calls, cluster/plane.py): the address it binds
    # ("auto": the Ray node's IP) and the cluster's secret that authenticates both ends
    # (empty: LocalCluster sets the cluster's one). Prefill and decode workers take both
    # from their TransferConfig (kv_host, secret).
    host: str = "127.0.0.1"
    secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        _check_adapter_engine(self, "ColocatedConfig")


@dataclass(frozen=True)
class DecodeConfig:
    __pydantic_config__ = _FORBID_EXTRA

    engine: EngineConfig
    transfer: TransferConfig = field(default_factory=TransferConfig)
    cpu_cores: str | None = None
    num_gpus: float = 0.0
    resources: Resources = ()


PREFILL_POLICIES = ("locality", "round_robin", "least_loaded", "hot_set")


@dataclass(frozen=True)
class RouterConfig:
    __pydantic_config__ = _FORBID_EXTRA

    host: str = "127.0.0.1"
    port: int = 50051              # 0 = any free port
    request_timeout_s: float = 300.0
    max_queue_depth: int = 256
    require_auth: bool = False     # API keys; refused off: binding non-loopback needs keys
    prefill_policy: str = "locality"
    decode_policy: str = "least_loaded"
    max_spread: int = 2             # hot_set: the most prefill workers one hot adapter goes to
    pin_sync_s: float = 0.25        # hot_set: how often the workers' pins are brought in step
    max_adapter_bytes: int = 512 << 20
    state_refresh_s: float = 1.0
    tls_cert: str | None = None      # PEM server certificate (chain): gRPC (and HTTP) over TLS
    tls_key: str | None = None       # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle: mutual TLS, clients must present a cert
    metrics_port: int | None = None  # Prometheus /metrics (0 = any free port; None = off)
    # The worker plane (cluster/plane.py): the cluster's secret (empty: LocalCluster sets the
    # cluster's one) and the largest call body or answer item, in bytes, either way.
    secret: str = field(default="", repr=False)
    plane_max_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        c = "RouterConfig"
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None:
                _need(isinstance(value, str) and Path(value).expanduser().is_file(), c, name,
                      value, "file does not exist (expected a PEM file)")
                object.__setattr__(self, name, str(Path(value).expanduser()))
        _need((self.tls_cert is None) == (self.tls_key is None), c,
              "tls_key" if self.tls_cert else "tls_cert", self.tls_key or self.tls_cert,
              "tls_cert and tls_key must be given together")
        _need(self.tls_client_ca is None or self.tls_cert is not None, c, "tls_client_ca",
              self.tls_client_ca, "mutual TLS needs the server's own tls_cert and tls_key too")
        _need(self.prefill_policy in PREFILL_POLICIES, c, "prefill_policy",
              self.prefill_policy, f"one of {', '.join(PREFILL_POLICIES)}")
        _need(self.max_spread >= 1, c, "max_spread", self.max_spread, "must be >= 1")
        _need(self.pin_sync_s > 0, c, "pin_sync_s", self.pin_sync_s, "must be > 0")
        _need(self.decode_policy in ("locality", "round_robin", "least_loaded"), c,
              "decode_policy", self.decode_policy, "one of locality, round_robin, least_loaded")
        _need(0 <= self.port < 65536, c, "port", self.port, "must be in [0, 65535]")
        _need(self.metrics_port is None or 0 <= self.metrics_port < 65536, c, "metrics_port",
              self.metrics_port, "must be in [0, 65535] (or unset)")
        _need(self.request_timeout_s > 0, c, "request_timeout_s", self.request_timeout_s, "must be > 0")
        _need(self.max_queue_depth >= 1, c, "max_queue_depth", self.max_queue_depth, "must be >= 1")
        _need(isinstance(self.plane_max_bytes, int) and 1024 <= self.plane_max_bytes <= 128 << 20,
              c, "plane_max_bytes", self.plane_max_bytes, "must be an integer from 1024 to "
              f"{128 << 20} (128 MiB)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class ClusterConfig:
    __pydantic_config__ = _FORBID_EXTRA

    prefill: PrefillConfig
    decode: DecodeConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    ray_address: str | None = None   # None: start a local Ray
    num_cpus: int | None = None
    prefill_workers: int = 1
    decode_workers: int = 1
    colocated_workers: int = 0       # one engine each: prompt with the adapter, then decode
    colocated: ColocatedConfig | None = None  # None: the prefill pool's engine and adapter fields
    redis_url: str | None = None     # None: start a local redis-server under run_dir
    run_dir: str = ".preft/run"      # redis data, adapter store (when local), caches
    # adapter store: a directory (file://, shared by router and workers) or s3://bucket/prefix
    # (any S3-compatible service; credentials and endpoint from the AWS environment/config
    # chain, never here); default <run_dir>/store
    store_uri: str | None = None
    adapters: Pairs = ()             # (name, path) registered at start-up
    adapter_kinds: Pairs = ()        # (name, kind) for those; default: the files'
    max_restarts: int = 5            # Ray restarts a dead worker actor this often (-1: always)
    name: str = "preft"              # Ray actor names are <name>-<role>-<i>: one Ray, many clusters
    # Local clusters (no ray_address), engines without cpu_cores: "shared" gives every engine
    # all of the machine's cores, with passive OpenMP waits so an idle engine's threads sleep
    # instead of spin; "split" gives a prefill and a decode engine disjoint halves (0.88x
    # shared's throughput under a burst, lower latency below saturation: docs/benchmarks.md).
    local_cores: str = "shared"
    # The registry is bound to the base model it was validated against (its fingerprint,
    # cluster/model_info.py). Started on another model: "refuse" (default) stops before
    # anything starts; "revalidate" checks every adapter against the new model, removes
    # those that do not fit from the registry, and binds it to the new model.
    on_model_change: str = "refuse"

    def __post_init__(self) -> None:
        c = "ClusterConfig"
        _need(self.on_model_change in ("refuse", "revalidate"), c, "on_model_change",
              self.on_model_change, "one of 'refuse' or 'revalidate' (preft up "
              "--revalidate-adapters)")
        for f in ("prefill_workers", "decode_workers", "colocated_workers"):
            _need(getattr(self, f) >= 0, c, f, getattr(self, f), "must be >= 0")
        _need((self.prefill_workers == 0) == (self.decode_workers == 0), c,
              "decode_workers" if self.prefill_workers else "prefill_workers",
              self.decode_workers if self.prefill_workers else self.prefill_workers,
              "prefill and decode pools come together: both >= 1, or both 0 (colocated only)")
        _need(self.prefill_workers + self.colocated_workers >= 1, c, "colocated_workers",
              self.colocated_workers, "the cluster needs workers: colocated_workers >= 1, or "
              "prefill_workers and decode_workers >= 1")
        _need(valid_adapter_name(self.name), c, "name", self.name,
              "1-128 of [A-Za-z0-9._-], starting alphanumeric")
        _need(self.max_restarts >= -1, c, "max_restarts", self.max_restarts,
              "must be >= -1 (-1 = restart forever)")
        _need(self.local_cores in ("split", "shared"), c, "local_cores", self.local_cores,
              "one of 'split' (disjoint cores per prefill/decode engine) or 'shared'")
        self._check_adapters()
        self._check_store_uri()
        a, b = self.prefill.engine, self.decode.engine
        for f in ("model", "dtype", "max_model_len", "load_format"):
            _need(getattr(a, f) == getattr(b, f), c, f"decode.engine.{f}",
                  getattr(b, f), f"must equal prefill.engine.{f}={getattr(a, f)!r}: "
                  "both pools exchange KV blocks of the same model")
        if self.prefill_workers:
            _need(a.tensor_parallel_size == b.tensor_parallel_size, c,
                  "decode.engine.tensor_parallel_size", b.tensor_parallel_size,
                  f"must equal prefill.engine.tensor_parallel_size={a.tensor_parallel_size}: "
                  "KV moves from prefill rank i to decode rank i, so both engines need the "
                  "same number of ranks (re-sharding between sizes is not built)")
        _need(self.colocated_cfg.engine.model == a.model, c, "colocated.engine.model",
              self.colocated_cfg.engine.model, f"must equal prefill.engine.model={a.model!r}: "
              "every pool serves the same base model and its adapters")

    def _check_adapters(self) -> None:
        from cluster.messages import ADAPTER_KINDS, ALL_TOKEN_KINDS

        for name, path in self.adapters:
            _need(valid_adapter_name(name), "ClusterConfig", "adapters", name,
                  "adapter names are 1-128 of [A-Za-z0-9._-], starting alphanumeric, no '..'")
            _need(Path(path).is_dir(), "ClusterConfig", "adapters", path,
                  "adapter directory does not exist")
        names = {n for n, _ in self.adapters}
        for name, kind in self.adapter_kinds:
            _need(name in names, "ClusterConfig", "adapter_kinds", name,
                  "names an adapter that is not in adapters")
            _need(kind in ADAPTER_KINDS, "ClusterConfig", "adapter_kinds", kind,
                  f"one of {ADAPTER_KINDS}")
            _need(kind not in ALL_TOKEN_KINDS or self.colocated_workers > 0, "ClusterConfig",
                  "adapter_kinds", f"{name}:{kind}", f"kind {kind!r} runs the adapter on "
                  "generated tokens, which only colocated workers serve, and this cluster has "
                  "none: add some (colocated_workers: N; preft up --colocated-workers N)")

    def _check_store_uri(self) -> None:
        if self.store_uri is None:
            return
        from cluster.s3_store import parse_s3_uri, shown

        uri = shown(self.store_uri)   # never echo a secret someone put in the URL
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        _need(scheme in ("file", "s3"), "ClusterConfig", "store_uri", uri,
              f"unknown store scheme {scheme!r}; use a directory, file:///dir or "
              "s3://bucket/prefix")
        if scheme == "s3":
            try:
                parse_s3_uri(self.store_uri)
            except ValueError as e:
                _need(False, "ClusterConfig", "store_uri", uri, str(e))

    @property
    def colocated_cfg(self) -> ColocatedConfig:
        """The colocated pool's config: given, or the prefill pool's engine and adapter
        fields."""
        if self.colocated is not None:
            return self.colocated
        p = self.prefill
        return ColocatedConfig(
            engine=p.engine, max_lora_rank=p.max_lora_rank, max_loras=p.max_loras,
            max_cpu_loras=p.max_cpu_loras, max_adapter_bytes=p.max_adapter_bytes,
            lora_kernel=p.lora_kernel, num_gpus=p.num_gpus, host=p.transfer.kv_host,
            secret=p.transfer.secret)


def from_dict(cls, data: Any):
    """Build a (nested) config dataclass from plain data, e.g. parsed YAML (pydantic);
    raises :class:`ConfigError` naming each bad field and its value."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as e:
        raise ConfigError("; ".join(_describe(cls, err) for err in e.errors(include_url=False))
                          ) from None


@cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def _describe(cls, err: dict) -> str:
    """One pydantic error as ``Config.path.field=value: what is wrong``."""
    loc = tuple(str(p) for p in err["loc"])
    own = (err.get("ctx") or {}).get("error")
    if isinstance(own, ConfigError):   # a dataclass's own __post_init__ check
        return f"{'.'.join(loc)}: {own}" if loc else str(own)
    where = ".".join((cls.__name__, *loc))
    owner = _owner(cls, loc[:-1]) if loc else None
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        known = f"; known: {sorted(f.name for f in fields(owner))}" if owner else ""
        return f"{where}: unknown field{known}"
    hidden = bool(loc) and owner is not None and any(f.name == loc[-1] and not f.repr
                                                     for f in fields(owner))
    return f"{where}={'<not shown>' if hidden else repr(err['input'])}: {err['msg']}"


def _owner(cls, path: tuple[str, ...]):
    """The config dataclass at ``path`` below ``cls`` (None if the path leaves them)."""
    for name in path:
        hint = typing.get_type_hints(cls).get(name) if is_dataclass(cls) else None
        cls = next((t for t in (hint, *typing.get_args(hint)) if is_dataclass(t)), None)
    return cls if is_dataclass(cls) else None
