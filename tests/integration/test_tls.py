"""TLS on the router's gRPC port and the HTTP gateway, mutual TLS, and Redis with a password.

Certificates are made here (``cryptography``). The router runs over a real Redis and an
empty worker pool: TLS is about the transport, so ListAdapters and the health service are
enough to show who gets through. No vLLM engine is started.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import grpc
import pytest

from preft_client import PreftClient, PreftClientError, Unavailable

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- certificates


def _name(cn: str):
    from cryptography.x509.oid import NameOID
    from cryptography import x509

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert=None, key=None) -> str:
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(path)


def _ca(cn: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca, cn: str, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert, ca_key = ca
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.DNSName("router.preft.test"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, rogue_ca = _ca("preft test server CA"), _ca("preft test client CA"), \
        _ca("rogue CA")
    srv, cli, rogue = (_leaf(server_ca, "router", True), _leaf(client_ca, "alice", False),
                       _leaf(rogue_ca, "mallory", False))
    return {
        "server_ca": _write(d / "server-ca.pem", server_ca[0]),
        "client_ca": _write(d / "client-ca.pem", client_ca[0]),
        "rogue_ca": _write(d / "rogue-ca.pem", rogue_ca[0]),
        "cert": _write(d / "router.pem", srv[0]), "key": _write(d / "router-key.pem", key=srv[1]),
        "client_cert": _write(d / "alice.pem", cli[0]),
        "client_key": _write(d / "alice-key.pem", key=cli[1]),
        "rogue_cert": _write(d / "mallory.pem", rogue[0]),
        "rogue_key": _write(d / "mallory-key.pem", key=rogue[1]),
    }


# ----------------------------------------------------------------------------- a router


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from app.redis_proc import RedisServer

    # A password with URL metacharacters: RedisServer.url must percent-encode it.
    r = RedisServer(tmp_path_factory.mktemp("redis-tls"), password="s3cr@t/p:w#d %").start()
    yield r
    r.stop()


class _Router:
    """create_server + start over a real Redis and an empty pool (no engines)."""

    def __init__(self, cfg, redis_url: str, store_dir: Path) -> None:
        from cluster.adapter_store import LocalDirStore
        from cluster.state import ClusterState
        from router.pool import WorkerPool
        from router.server import create_server
        from router.state_view import StateView

        self.view = StateView(ClusterState.from_url(redis_url), 1.0)
        self.server, self.port = create_server(cfg, WorkerPool(), self.view,
                                               LocalDirStore(store_dir))

    async def __aenter__(self):
        from router.server import start

        await start(self.server)
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(grace=0)
        await self.view.stop()
        self.server.service.close()   # its gauges leave the process's /metrics
        import shutil
        if self.server.local_dir:
            shutil.rmtree(self.server.local_dir, ignore_errors=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _router_cfg(pki, mtls: bool = False):
    from cluster.config import RouterConfig

    return RouterConfig(port=0, tls_cert=pki["cert"], tls_key=pki["key"],
                        tls_client_ca=pki["client_ca"] if mtls else None)


def _list(address: str, **kw):
    """A blocking SDK call, off the event loop the router runs on."""
    def call():
        with PreftClient(address, timeout=5, retries=0, **kw) as c:
            return c.list_adapters()
    return asyncio.to_thread(call)


async def test_tls_client_succeeds_and_plaintext_fails(pki, redis_server, tmp_path):
    async with _Router(_router_cfg(pki), redis_server.url, tmp_path / "store") as r:
        assert await _list(r.address, tls_ca=pki["server_ca"]) == {}
        # The name in the certificate, when the address is an IP the cert does not name.
        assert await _list(f"localhost:{r.port}", tls_ca=pki["server_ca"],
                           tls_server_name="router.preft.test") == {}
        with pytest.raises(Unavailable):                       # plaintext to a TLS port
            await _list(r.address)
        with pytest.raises(Unavailable):                       # a CA that did not sign it
            await _list(r.address, tls_ca=pki["rogue_ca"])
        with pytest.raises(Unavailable):                       # wrong name
            await _list(r.address, tls_ca=pki["server_ca"], tls_server_name="evil.test")
        # Async SDK, and the standard health service over TLS.
        from preft_client import AsyncPreftClient

        async with AsyncPreftClient(r.address, tls_ca=pki["server_ca"], timeout=5) as ac:
            assert await ac.list_adapters() == {}


async def test_mutual_tls_refuses_clients_without_a_trusted_certificate(pki, redis_server,
                                                                        tmp_path):
    async with _Router(_router_cfg(pki, mtls=True), redis_server.url, tmp_path / "s") as r:
        ok = dict(tls_ca=pki["server_ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
        assert await _list(r.address, **ok) == {}
        with pytest.raises(Unavailable):                       # no client certificate
            await _list(r.address, tls_ca=pki["server_ca"])
        with pytest.raises(Unavailable):                       # certificate from another CA
            await _list(r.address, tls_ca=pki["server_ca"], tls_cert=pki["rogue_cert"],
                        tls_key=pki["rogue_key"])
        with pytest.raises(Unavailable):
            await _list(r.address)                             # plaintext


async def test_local_socket_for_same_account_clients(pki, redis_server, tmp_path):
    async with _Router(_router_cfg(pki, mtls=True), redis_server.url, tmp_path / "s") as r:
        local = r.server.local_address
        assert local and local.startswith("unix:")
        sock_dir = Path(local.removeprefix("unix:")).parent
        assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
        assert await _list(local) == {}
        with pytest.raises(ValueError, match="plaintext"):
            PreftClient(local, tls_ca=pki["server_ca"])
    from cluster.config import RouterConfig
    async with _Router(RouterConfig(port=0), redis_server.url, tmp_path / "s2") as r:
        assert r.server.local_address is None                  # no TLS: no extra listener


def _https_get(url: str, ca: str, cert: tuple[str, str] | None = None):
    import httpx

    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(*cert)
    return httpx.get(url, verify=ctx, timeout=10)


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
async def test_http_gateway_serves_https(pki, redis_server, tmp_path, mtls):
    import httpx

    from http_gateway import HttpGatewayThread

    async with _Router(_router_cfg(pki, mtls), redis_server.url, tmp_path / "s") as r:
        gw = HttpGatewayThread(r.server.local_address, ssl_certfile=pki["cert"],
                               ssl_keyfile=pki["key"],
                               ssl_client_ca=pki["client_ca"] if mtls else None)
        port = await asyncio.to_thread(gw.start)
        try:
            url = f"https://127.0.0.1:{port}"
            assert gw.base_url.startswith("https://")
            cert = (pki["client_cert"], pki["client_key"])
            resp = await asyncio.to_thread(_https_get, f"{url}/health", pki["server_ca"],
                                           cert if mtls else None)
            assert resp.status_code == 200 and resp.json()["status"] == "ok"
            resp = await asyncio.to_thread(_https_get, f"{url}/v1/models", pki["server_ca"],
                                           cert if mtls else None)
            assert resp.status_code == 200 and resp.json()["data"][0]["id"] == "base"
            with pytest.raises(httpx.HTTPError):               # plaintext HTTP to HTTPS
                await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/health", timeout=5)
            with pytest.raises(httpx.HTTPError):               # untrusted server cert
                await asyncio.to_thread(_https_get, f"{url}/health", pki["rogue_ca"])
            if mtls:
                with pytest.raises(httpx.HTTPError):           # no client certificate
                    await asyncio.to_thread(_https_get, f"{url}/health", pki["server_ca"])
        finally:
            await asyncio.to_thread(gw.stop)


async def test_http_gateway_reaches_a_tls_router(pki, redis_server, tmp_path):
    """Standalone gateway (`--router-tls-*`) in front of a mutual-TLS router."""
    import httpx

    from http_gateway import HttpGatewayThread

    async with _Router(_router_cfg(pki, mtls=True), redis_server.url, tmp_path / "s") as r:
        tls = {"tls_ca": pki["server_ca"], "tls_cert": pki["client_cert"],
               "tls_key": pki["client_key"]}
        gw = HttpGatewayThread(r.address, router_tls=tls)
        port = await asyncio.to_thread(gw.start)
        try:
            resp = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/health",
                                           timeout=10)
            assert resp.status_code == 200, resp.text
        finally:
            await asyncio.to_thread(gw.stop)
        gw = HttpGatewayThread(r.address, router_tls={"tls_ca": pki["server_ca"]})
        port = await asyncio.to_thread(gw.start)
        try:   # without the client certificate the router refuses it: 503, not a hang
            resp = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/health",
                                           timeout=20)
            assert resp.status_code == 503
        finally:
            await asyncio.to_thread(gw.stop)


# ----------------------------------------------------------------------------- config and CLI


def test_router_tls_config_is_validated(pki, tmp_path):
    from cluster.config import ConfigError, RouterConfig

    RouterConfig(tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["client_ca"])
    with pytest.raises(ConfigError, match="tls_cert=.*does not exist"):
        RouterConfig(tls_cert=str(tmp_path / "missing.pem"), tls_key=pki["key"])
    with pytest.raises(ConfigError, match="tls_key.*together"):
        RouterConfig(tls_cert=pki["cert"])
    with pytest.raises(ConfigError, match="tls_cert.*together"):
        RouterConfig(tls_key=pki["key"])
    with pytest.raises(ConfigError, match="tls_client_ca.*needs"):
        RouterConfig(tls_client_ca=pki["client_ca"])


async def test_a_key_that_is_not_pem_fails_at_start(pki, redis_server, tmp_path):
    from cluster.config import RouterConfig

    bad = tmp_path / "junk.pem"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match="matching PEM certificate and private key"):
        r = _Router(RouterConfig(port=0, tls_cert=pki["cert"], tls_key=str(bad)),
                    redis_server.url, tmp_path / "s")
        async with r:
            pass


def test_cli_tls_flags(pki, tmp_path):
    import yaml

    from app.cli import build_config, make_parser

    root = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((root / "deploy" / "local-cpu.yaml").read_text())
    for sec in ("prefill", "decode"):   # a model of its own: no embedded demo to build
        data[sec]["engine"]["model"] = str(tmp_path)
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(data))
    args = make_parser().parse_args(
        ["up", "--config", str(tmp_path / "local.yaml"), "--tls-cert", pki["cert"],
         "--tls-key", pki["key"], "--tls-client-ca", pki["client_ca"]])
    cfg = build_config(args)   # flags override the YAML's router section, never dropped
    assert (cfg.router.tls_cert, cfg.router.tls_key, cfg.router.tls_client_ca) == (
        pki["cert"], pki["key"], pki["client_ca"])
    data["router"].update(tls_cert=pki["cert"], tls_key=pki["key"])
    p = tmp_path / "tls.yaml"
    p.write_text(yaml.safe_dump(data))
    cfg = build_config(make_parser().parse_args(["up", "--config", str(p)]))
    assert cfg.router.tls_cert == pki["cert"] and cfg.router.tls_client_ca is None
    gen = make_parser().parse_args(["generate", "hi", "--tls-ca", pki["server_ca"],
                                    "--tls-cert", pki["client_cert"], "--tls-key",
                                    pki["client_key"]])
    assert gen.tls_ca == pki["server_ca"]


def test_sdk_tls_argument_errors(pki):
    with pytest.raises(ValueError, match="together"):
        PreftClient("127.0.0.1:1", tls_ca=pki["server_ca"], tls_cert=pki["client_cert"])
    with pytest.raises(ValueError, match="tls_ca: cannot read"):
        PreftClient("127.0.0.1:1", tls_ca="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="need TLS"):
        PreftClient("127.0.0.1:1", tls_server_name="x")


# ----------------------------------------------------------------------------- Redis password


def test_redis_with_password(redis_server):
    import redis

    from cluster.state import AdapterRecord, ClusterState

    assert redis_server.url.startswith("redis://:s3cr%40t%2Fp%3Aw%23d%20%25@127.0.0.1:")
    st = ClusterState.from_url(redis_server.url)
    rec = AdapterRecord("pw-test", "lora_p", 1, "0" * 64, 8, ("q_proj",), 10, "", True, "file:///x")
    st.put_adapter(rec)
    assert ClusterState.from_url(redis_server.url).get_adapter("pw-test") == rec
    no_pw = f"redis://127.0.0.1:{redis_server.port}/0"
    with pytest.raises(redis.AuthenticationError, match="(?i)auth"):
        ClusterState.from_url(no_pw).list_adapters()
    wrong = f"redis://:wrong@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(redis.AuthenticationError, match="(?i)password|auth"):
        ClusterState.from_url(wrong).list_adapters()


def test_rediss_urls_are_passed_through():
    """rediss:// (TLS) reaches redis-py as an SSL connection; no server needed to see that."""
    from cluster.state import ClusterState

    st = ClusterState.from_url("rediss://:pw@redis.example.test:6380/2")
    kw = st.r.connection_pool.connection_kwargs
    assert st.r.connection_pool.connection_class.__name__ == "SSLConnection"
    assert (kw["password"], kw["host"], kw["port"], kw["db"]) == ("pw", "redis.example.test",
                                                                  6380, 2)


def test_redis_auth_errors_are_clear_before_anything_starts(redis_server, tmp_path):
    from cluster.config import ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig
    from app.launcher import LocalCluster
    from cluster.state import ClusterState

    ClusterState.from_url(redis_server.url).check()
    with pytest.raises(RuntimeError, match="refused authentication.*no password given.*"
                                           "redis://:PASSWORD@host"):
        ClusterState.from_url(f"redis://127.0.0.1:{redis_server.port}/0").check()
    with pytest.raises(RuntimeError, match="wrong password"):
        ClusterState.from_url(f"redis://:nope@127.0.0.1:{redis_server.port}/0").check()
    eng = EngineConfig(model="/nonexistent-model")
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        redis_url=f"redis://:nope@127.0.0.1:{redis_server.port}/0",
                        run_dir=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="wrong password"):   # before Ray or any engine
        LocalCluster(cfg).start_state(lambda msg: None)
