"""Cluster state in Redis: the adapter registry, residency, membership and API keys.

Every key lives under one versioned prefix (``preft:v1:``) and every value goes through the
one codec in this module (JSON of frozen dataclasses), so the router, the workers and the
CLI read and write the same shapes. No torch here.

Keys:
  {p}adapter:{name}          AdapterRecord (the newest version of an adapter)
  {p}adapters                set of adapter names
  {p}adapter_version:{name}  INCR counter: versions only grow, also across delete + re-add
  {p}residency:{worker}      hash adapter name -> "tier@version" (engine, host, disk)
  {p}worker:{id}             MemberRecord, with a TTL (10 s) refreshed every second
  {p}workers                 set of worker ids ever seen
  {p}apikey:{sha256(key)}    tenant name
  {p}base_model              ModelBinding: the base model the registry's adapters were
                             validated against (its fingerprint, cluster/model_info.py)
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PREFIX = "preft:v1:"


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    kind: str
    version: int
    sha256: str
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    owner: str                 # tenant that registered it ("" = operator, open mode)
    public: bool
    uri: str                   # where the validated files live (file://... by default)
    created: float = field(default_factory=time.time)

    def visible_to(self, tenant: str | None) -> bool:
        return tenant is None or tenant == "admin" or self.public or self.owner == tenant


@dataclass(frozen=True)
class MemberRecord:
    worker_id: str
    role: str                  # "prefill" | "decode"
    actor_name: str            # Ray actor name, to get a handle
    kv_layout: str
    node: str = ""
    kv_address: str = ""       # prefill: "host:port" of its KV endpoint
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ModelBinding:
    """The base model every adapter in the registry was validated against."""

    fingerprint: str           # cluster.model_info.model_fingerprint
    model: str                 # where it was read from when bound (for messages)
    bound: float = field(default_factory=time.time)


def encode(obj) -> str:
    return json.dumps(asdict(obj), sort_keys=True)


def decode(cls, raw: str | bytes | None):
    if raw is None:
        return None
    data = json.loads(raw)
    known = {f.name for f in fields(cls)}
    kw: dict[str, Any] = {k: v for k, v in data.items() if k in known}
    for f in fields(cls):
        if f.name in kw and isinstance(kw[f.name], list):
            kw[f.name] = tuple(kw[f.name])
    return cls(**kw)


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return "pk-" + secrets.token_urlsafe(24)


class ClusterState:
    """Synchronous access (CLI, launcher, workers). ``r`` is a ``redis.Redis``."""

    def __init__(self, r, prefix: str = PREFIX) -> None:
        self.r = r
        self.p = prefix

    @classmethod
    def from_url(cls, url: str) -> "ClusterState":
        import redis

        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                        socket_connect_timeout=5))

    def check(self) -> None:
        """Fail early with an operator-readable error when Redis refuses us or is unreachable."""
        import redis

        kw = self.r.connection_pool.connection_kwargs
        where = f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
        try:
            self.r.ping()
        except redis.AuthenticationError as e:
            has_pw = kw.get("password") is not None
            raise RuntimeError(
                f"Redis at {where} refused authentication "
                f"({'wrong password' if has_pw else 'no password given'}: {e}); put the "
                "password in the URL, percent-encoded: redis://:PASSWORD@host:port/db "
                "(rediss:// for TLS)") from None
        except redis.RedisError as e:
            raise RuntimeError(f"Redis at {where} is unreachable: {e}") from None

    # adapters
    def next_version(self, name: str) -> int:
        return int(self.r.incr(f"{self.p}adapter_version:{name}"))

    def put_adapter(self, rec: AdapterRecord) -> None:
        pipe = self.r.pipeline()
        pipe.set(f"{self.p}adapter:{rec.name}", encode(rec))
        pipe.sadd(f"{self.p}adapters", rec.name)
        pipe.execute()

    def get_adapter(self, name: str) -> AdapterRecord | None:
        return decode(AdapterRecord, self.r.get(f"{self.p}adapter:{name}"))

    def list_adapters(self) -> dict[str, AdapterRecord]:
        names = sorted(self.r.smembers(f"{self.p}adapters"))
        if not names:
            return {}
        raws = self.r.mget([f"{self.p}adapter:{n}" for n in names])
        return {n: decode(AdapterRecord, raw) for n, raw in zip(names, raws) if raw}

    def delete_adapter(self, name: str) -> bool:
        pipe = self.r.pipeline()
        pipe.delete(f"{self.p}adapter:{name}")
        pipe.srem(f"{self.p}adapters", name)
        return bool(pipe.execute()[0])

    # the base model the registry is bound to
    def base_model(self) -> ModelBinding | None:
        return decode(ModelBinding, self.r.get(f"{self.p}base_model"))

    def bind_base_model(self, binding: ModelBinding) -> None:
        self.r.set(f"{self.p}base_model", encode(binding))

    # residency
    def set_residency(self, worker_id: str, resident: dict[str, str]) -> None:
        key = f"{self.p}residency:{worker_id}"
        pipe = self.r.pipeline()
        pipe.delete(key)
        if resident:
            pipe.hset(key, mapping=resident)
        pipe.expire(key, 60)
        pipe.execute()

    def residency(self, worker_ids) -> dict[str, dict[str, str]]:
        return {w: self.r.hgetall(f"{self.p}residency:{w}") for w in worker_ids}

    # membership
    def heartbeat(self, rec: MemberRecord, ttl_s: float) -> None:
        pipe = self.r.pipeline()
        pipe.set(f"{self.p}worker:{rec.worker_id}", encode(rec), px=int(ttl_s * 1000))
        pipe.sadd(f"{self.p}workers", rec.worker_id)
        pipe.execute()

    def leave(self, worker_id: str) -> None:
        self.r.delete(f"{self.p}worker:{worker_id}")

    def members(self) -> dict[str, MemberRecord]:
        ids = sorted(self.r.smembers(f"{self.p}workers"))
        if not ids:
            return {}
        raws = self.r.mget([f"{self.p}worker:{w}" for w in ids])
        return {w: decode(MemberRecord, raw) for w, raw in zip(ids, raws) if raw}

    # API keys
    def add_api_key(self, api_key: str, tenant: str) -> None:
        self.r.set(f"{self.p}apikey:{hash_key(api_key)}", tenant)

    def tenant_for(self, api_key: str) -> str | None:
        return self.r.get(f"{self.p}apikey:{hash_key(api_key)}")

    def api_keys(self) -> dict[str, str]:
        """Key hash -> tenant (what the router caches; raw keys are never stored)."""
        keys = list(self.r.scan_iter(f"{self.p}apikey:*", count=100))
        vals = self.r.mget(keys) if keys else []
        return {k.rsplit(":", 1)[1]: v for k, v in zip(keys, vals) if v}
