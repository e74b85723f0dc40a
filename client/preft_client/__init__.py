"""PreFT Serve client SDK: step 1 of a request's path, on the application's side.

``PreftClient(address).generate(adapter, prompt=...)`` returns a :class:`Completion`;
``stream(...)`` yields :class:`Delta` items, ``events(...)`` the deltas and then the
:class:`Completion`; ``list_adapters()``, ``health()`` and the rest take ``api_key=`` per call
(a gateway forwarding its callers' keys). ``AsyncPreftClient`` has the same methods as
coroutines / async iterators. gRPC errors surface as :class:`PreftClientError` subclasses
carrying the status code and the server's message. :func:`chat_template_of` renders chat
messages as the gateway and ``preft train`` do. ``MAX_REQUEST_BYTES`` and
``MAX_REPLY_BYTES``: the largest gRPC request the router accepts and the largest reply
message it sends (the channel is set to both). Imports neither torch nor vLLM.
"""

from preft_client.chat import (DEFAULT_CHAT, DEFAULT_CHAT_TEMPLATE, ChatTemplate,
                               ChatTemplateError, chat_template_of)
from preft_client.client import MAX_REPLY_BYTES, MAX_REQUEST_BYTES, AsyncPreftClient, PreftClient
from preft_client.errors import (DeadlineExceeded, FailedPrecondition, IncompleteStream,
                                 InvalidArgument, NotFound,
                                 PermissionDenied, PreftClientError, ResourceExhausted,
                                 Unauthenticated, Unavailable)
from preft_client.types import (AdapterInfo, Completion, Delta, Sample, Timings, TokenLogprob,
                                Usage, WorkerStatus)

__all__ = ["PreftClient", "AsyncPreftClient", "Completion", "Delta", "Sample", "TokenLogprob",
           "Timings", "Usage",
           "AdapterInfo", "WorkerStatus", "PreftClientError", "InvalidArgument", "NotFound",
           "Unavailable", "ResourceExhausted", "DeadlineExceeded", "Unauthenticated",
           "PermissionDenied", "IncompleteStream", "FailedPrecondition",
           "ChatTemplate", "ChatTemplateError", "chat_template_of", "DEFAULT_CHAT",
           "DEFAULT_CHAT_TEMPLATE", "MAX_REQUEST_BYTES", "MAX_REPLY_BYTES"]
