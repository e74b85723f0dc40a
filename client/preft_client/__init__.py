"""PreFT Serve client SDK: step 1 of a request's path, on the application's side.

``PreftClient(address).generate(adapter, prompt=...)`` returns a :class:`Completion`;
``stream(...)`` yields :class:`Delta` items. ``AsyncPreftClient`` has the same methods as
coroutines / async iterators. gRPC errors surface as :class:`PreftClientError` subclasses
carrying the status code and the server's message. Imports neither torch nor vLLM.
"""

from preft_client.client import AsyncPreftClient, PreftClient
from preft_client.errors import (DeadlineExceeded, InvalidArgument, NotFound, PreftClientError,
                                 ResourceExhausted, Unavailable)
from preft_client.types import Completion, Delta, Timings, Usage

__all__ = ["PreftClient", "AsyncPreftClient", "Completion", "Delta", "Timings", "Usage",
           "PreftClientError", "InvalidArgument", "NotFound", "Unavailable",
           "ResourceExhausted", "DeadlineExceeded"]
