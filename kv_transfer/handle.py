"""The transfer handle: what the router passes from the prefill worker to the decode worker.

Plain data, no torch: it is created by the prefill worker after its engine finishes a
prompt, travels through the router inside a Ray call, and ends up in the decode engine's
``kv_transfer_params``. The decode connector uses it to pull the blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KVHandle:
    """Where a prompt's KV waits and how much of it there is."""

    transfer_id: int        # unique per prefill worker; the key of the held blocks
    host: str               # prefill worker's KV rendezvous (TCPStore) address
    port: int
    engine_id: str          # prefill engine id, for logs and metrics labels
    num_tokens: int         # prompt tokens whose KV is held (the whole prompt)
    num_blocks: int         # ceil(num_tokens / block_size)
    layout: str             # KVLayout.fingerprint() of the prefill engine

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.num_blocks < 1:
            raise ValueError(f"KVHandle with no KV: num_tokens={self.num_tokens}, "
                             f"num_blocks={self.num_blocks}")

    def to_params(self) -> dict:
        """As the decode request's ``kv_transfer_params`` (vLLM wants a dict)."""
        return {"do_remote_prefill": True, **asdict(self)}

    @classmethod
    def from_params(cls, params: dict) -> "KVHandle":
        return cls(**{k: params[k] for k in cls.__dataclass_fields__})
