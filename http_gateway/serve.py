"""Serving the gateway: uvicorn on a bound socket, HTTPS, the bind check, a background thread.

Like the router, the gateway serves an open API only on loopback: on any other address
:func:`check_bind_is_safe` requires a router that refuses callers without an API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import threading
from typing import Callable

from fastapi import FastAPI

from preft_client import PreftClientError, Unauthenticated

from http_gateway.app import create_app
from http_gateway.gateway import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT_S, Gateway
from http_gateway.limits import DEFAULT_MAX_BODY_BYTES


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"http gateway could not bind {host}:{port}: {e}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def check_bind_is_safe(gw: Gateway, host: str, timeout: float = 10.0) -> None:
    """An open API only on loopback, as the router's own check (``router.server``): on any
    other address the gateway needs a router that refuses callers without an API key. The
    router says so itself: a ``ListAdapters`` without a key must answer UNAUTHENTICATED."""
    if _is_loopback(host):
        return
    async with gw.probe_client(timeout) as probe:
        try:
            await probe.list_adapters()
        except Unauthenticated:
            return
        except PreftClientError as e:
            raise PermissionError(
                f"refusing to serve HTTP on {host}: cannot confirm that the router at "
                f"{gw.router_address} requires API keys ({e.code.name}: {e.message}); start "
                "the router first, or bind 127.0.0.1") from None
    raise PermissionError(
        f"refusing to serve an open API on {host}: the router at {gw.router_address} answers "
        "without an API key; either bind 127.0.0.1, or run the router with API keys "
        "(--require-auth) after creating one with `preft keys create --tenant NAME`")


def _uvicorn_server(app: FastAPI, log_level: str, ssl_certfile: str | None = None,
                    ssl_keyfile: str | None = None, ssl_client_ca: str | None = None,
                    handle_signals: bool = True):
    import uvicorn

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("http gateway TLS: ssl_certfile and ssl_keyfile must be given together")
    if ssl_client_ca is not None and ssl_certfile is None:
        raise ValueError("http gateway TLS: ssl_client_ca (mutual TLS) needs ssl_certfile/keyfile")
    tls = {}
    if ssl_certfile is not None:
        tls = dict(ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        if ssl_client_ca is not None:
            tls.update(ssl_ca_certs=ssl_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                            timeout_graceful_shutdown=5, **tls)
    if tls:
        config.load()   # reads the certificate and key now: errors surface before serving
    server = uvicorn.Server(config)
    if not handle_signals:
        # inside another program's loop (`preft up --http-port`): SIGINT/SIGTERM are that
        # program's (it drains the router, then sets should_exit); uvicorn's own handlers
        # would close every open stream mid-answer
        server.capture_signals = contextlib.nullcontext
    return server


async def serve_http(router_address: str, host: str = "127.0.0.1", port: int = 8000, *,
                     base_model_name: str = "base", timeout: float | None = DEFAULT_TIMEOUT_S,
                     default_max_tokens: int = DEFAULT_MAX_TOKENS, log_level: str = "warning",
                     ready: Callable[[int], None] | None = None,
                     server_out: list | None = None, ssl_certfile: str | None = None,
                     ssl_keyfile: str | None = None, ssl_client_ca: str | None = None,
                     router_tls: dict | None = None, client=None,
                     handle_signals: bool = True, chat_template=None,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve the gateway on ``host:port`` (0 = any free port) until the server exits.

    A ``host`` other than loopback is refused (``PermissionError``) unless the router
    requires API keys (:func:`check_bind_is_safe`).

    ``ready(port)`` is called once it accepts connections; ``server_out``, if given, receives
    the ``uvicorn.Server`` (set its ``should_exit = True`` to stop). ``ssl_certfile`` and
    ``ssl_keyfile`` serve HTTPS; ``ssl_client_ca`` also requires client certificates signed
    by that CA (mutual TLS). ``router_tls`` and ``client`` (the router's in-process client
    when it runs in the router's process), ``chat_template``: see
    :func:`~http_gateway.app.create_app`; ``max_body_bytes``: a request body over it is
    answered 413 unread (``http_gateway.limits``).
    ``handle_signals=False``: SIGINT/SIGTERM are left to the embedding program (uvicorn
    would otherwise take them and close every open stream).
    """
    app = create_app(router_address, base_model_name, timeout=timeout,
                     default_max_tokens=default_max_tokens, router_tls=router_tls,
                     client=client, max_body_bytes=max_body_bytes,
                     **({"chat_template": chat_template} if chat_template
                                      else {}))
    await check_bind_is_safe(app.state.gateway, host)
    server = _uvicorn_server(app, log_level, ssl_certfile, ssl_keyfile, ssl_client_ca,
                             handle_signals)
    sock = _bind(host, port)
    if server_out is not None:
        server_out.append(server)
    try:
        await _run(server, sock, ready)
    finally:
        sock.close()


async def _run(server, sock: socket.socket, ready: Callable[[int], None] | None) -> None:
    """Serve on ``sock``; ``ready(port)`` once started; stop the server if we are stopped."""
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.02)
        if server.started and ready is not None:
            ready(sock.getsockname()[1])
        await task
    finally:
        if not task.done():
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await task


class HttpGatewayThread:
    """Runs the gateway on its own thread and event loop: ``HttpGatewayThread(addr).start()``
    returns the bound port; ``stop()`` shuts it down. Used by tests and embedders."""

    def __init__(self, router_address: str, host: str = "127.0.0.1", port: int = 0,
                 **kwargs) -> None:
        self.router_address = router_address
        self.host = host
        self.port = port
        self.kwargs = kwargs
        self._servers: list = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> int:
        ready = threading.Event()

        def on_ready(port: int) -> None:
            self.port = port
            ready.set()

        def run() -> None:
            try:
                asyncio.run(serve_http(self.router_address, self.host, self.port,
                                       ready=on_ready, server_out=self._servers, **self.kwargs))
            except BaseException as e:  # surfaced by start()
                self._error = e
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="http-gateway", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"http gateway did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        if not self._servers or not self._servers[0].started:
            raise RuntimeError("http gateway exited during startup")
        return self.port

    @property
    def base_url(self) -> str:
        scheme = "https" if self.kwargs.get("ssl_certfile") else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        for s in self._servers:
            s.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
