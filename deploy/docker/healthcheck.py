"""Container HEALTHCHECK: the router's standard gRPC health service answers SERVING.

Environment: PREFT_HEALTH_ADDRESS (default 127.0.0.1:50051); PREFT_HEALTH_TLS_CA (PEM file)
when the router serves TLS (--tls-cert), plus PREFT_HEALTH_TLS_CERT/PREFT_HEALTH_TLS_KEY for
mutual TLS; PREFT_HEALTH_TLS_NAME overrides the name checked against the certificate.
A container that only runs a Ray worker sets PREFT_HEALTH_ADDRESS=ray to check the Ray node.
Exit 0 = healthy, 1 = not.
"""

import os
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(var: str) -> bytes | None:
    path = os.environ.get(var)
    return open(path, "rb").read() if path else None


def main() -> int:
    addr = os.environ.get("PREFT_HEALTH_ADDRESS", "127.0.0.1:50051")
    if addr == "ray":
        return subprocess.call(["ray", "health-check"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    ca = _read("PREFT_HEALTH_TLS_CA")
    if ca is None:
        channel = grpc.insecure_channel(addr)
    else:
        creds = grpc.ssl_channel_credentials(ca, _read("PREFT_HEALTH_TLS_KEY"),
                                             _read("PREFT_HEALTH_TLS_CERT"))
        name = os.environ.get("PREFT_HEALTH_TLS_NAME")
        channel = grpc.secure_channel(addr, creds, options=[
            ("grpc.ssl_target_name_override", name)] if name else None)
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="preft.v1.Router"), timeout=5)
        return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1
    except grpc.RpcError:
        return 1
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
