"""The OpenAI-compatible HTTP gateway as a Ray Serve application (deploy/kuberay/rayservice.yaml).

Serve replicas run ``http_gateway.create_app`` (a FastAPI app: a pure translator, no
model or KV) and forward every request over gRPC to the PreFT router, whose address comes
from ``PREFT_ROUTER_ADDRESS`` (default ``preft-router:50051``, the Service in the manifest).
The router itself and the prefill/decode pools are started by ``preft up`` in the head pod;
this application only scales the HTTP front door.

Import path for ``serveConfigV2``: ``deploy.kuberay.serve_gateway:app`` (with ``/app`` on
``PYTHONPATH``, as in deploy/docker/Dockerfile.gpu).
"""

from __future__ import annotations

import os

from ray import serve

from http_gateway import create_app

ROUTER_ADDRESS = os.environ.get("PREFT_ROUTER_ADDRESS", "preft-router:50051")

fastapi_app = create_app(ROUTER_ADDRESS,
                         base_model_name=os.environ.get("PREFT_BASE_MODEL_NAME", "base"))


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(fastapi_app)
class OpenAIGateway:
    """Stateless: one gRPC channel per replica, opened by the app's lifespan."""


app = OpenAIGateway.bind()
