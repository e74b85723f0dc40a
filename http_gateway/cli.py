"""``python -m http_gateway``: the gateway as a standalone process in front of a router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from preft_client import chat_template_of

from http_gateway.gateway import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT_S
from http_gateway.limits import DEFAULT_MAX_BODY_BYTES
from http_gateway.serve import serve_http


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m http_gateway",
        description="OpenAI-compatible HTTP gateway for PreFT Serve. Accepts OpenAI API "
                    "requests (/v1/completions, /v1/chat/completions, /v1/models, /health) "
                    "and forwards them to the gRPC router; the OpenAI 'model' field names "
                    "the adapter. Holds no model or KV cache itself.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--router", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="address of the gRPC router to forward to (as printed by 'preft up')")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on for HTTP (0.0.0.0 for all interfaces: only "
                        "when the router requires API keys)")
    p.add_argument("--port", type=int, default=8000,
                   help="HTTP port to listen on (0 = any free port, printed at start)")
    p.add_argument("--base-model-name", default="base", metavar="NAME",
                   help="the OpenAI 'model' name that means the base model without an adapter; "
                        "every other name is looked up as an adapter")
    p.add_argument("--default-max-tokens", type=_positive_int, default=DEFAULT_MAX_TOKENS,
                   metavar="N", help="max_tokens used when a request gives neither max_tokens "
                                     "nor max_completion_tokens")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="deadline of each gRPC call to the router; past it the HTTP answer is "
                        "504 (0 = no deadline)")
    p.add_argument("--max-body-mib", type=_positive_int,
                   default=DEFAULT_MAX_BODY_BYTES >> 20, metavar="MIB",
                   help="largest request body, in MiB; a larger one is answered 413 before "
                        "it is read (the default is the router's own limit on a request)")
    p.add_argument("--chat-template", default=None, metavar="MODEL_DIR",
                   help="render chat messages with this model directory's chat template (its "
                        "tokenizer's, as `preft train` does; `preft up --http-port` uses the "
                        "served model's); without one: <|role|>\\n{content}\\n per message, "
                        "then <|assistant|>\\n (docs/http.md)")
    _add_tls_options(p)
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn log level")
    return p


def _add_tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve HTTPS with this certificate (chain); needs --tls-key")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="mutual TLS: require client certificates signed by this CA")
    p.add_argument("--router-tls-ca", default=None, metavar="PEM",
                   help="reach the router over TLS, verifying its certificate with this CA")
    p.add_argument("--router-tls-cert", default=None, metavar="PEM",
                   help="the gateway's client certificate for a mutual-TLS router")
    p.add_argument("--router-tls-key", default=None, metavar="PEM",
                   help="private key of --router-tls-cert")
    p.add_argument("--router-tls-server-name", default=None, metavar="NAME",
                   help="name to verify the router's certificate against")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO)
                        if args.log_level != "trace" else logging.DEBUG)

    router_tls = None
    if args.router_tls_ca or args.router_tls_cert:
        router_tls = {"tls_ca": args.router_tls_ca, "tls_cert": args.router_tls_cert,
                      "tls_key": args.router_tls_key,
                      "tls_server_name": args.router_tls_server_name}

    def ready(port: int) -> None:
        scheme = "https" if args.tls_cert else "http"
        print(f"http gateway listening on {scheme}://{args.host}:{port} "
              f"(router {args.router})", flush=True)

    try:
        asyncio.run(serve_http(args.router, args.host, args.port,
                               base_model_name=args.base_model_name,
                               timeout=args.timeout or None,
                               default_max_tokens=args.default_max_tokens,
                               log_level=args.log_level, ready=ready,
                               max_body_bytes=args.max_body_mib << 20,
                               ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                               ssl_client_ca=args.tls_client_ca, router_tls=router_tls,
                               chat_template=chat_template_of(args.chat_template)
                               if args.chat_template else None))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
