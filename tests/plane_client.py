"""Calls on a worker's plane straight from a test (no router): the real socket, the cluster's
secret, the router's own connection code (``router/plane.py``)."""

from __future__ import annotations

import asyncio


async def open_plane(cluster, handle, secret: str | None = None):
    """A plane connection to ``handle``'s worker (with another ``secret``: the handshake
    fails)."""
    import zmq.asyncio

    from router.plane import Connection

    address = await handle.actor.plane.remote()
    return await Connection.open(zmq.asyncio.Context.instance(), address,
                                 cluster.cfg.router.secret if secret is None else secret,
                                 handle.worker_id)


def plane_call(cluster, handle, op: str, arg, timeout: float = 60.0):
    """Run one call on the worker's plane: ``(items, error)``, the error it ended with or
    None."""
    async def go():
        conn = await open_plane(cluster, handle)
        items: list = []
        try:
            async for batch in conn.call(op, arg, timeout).batches():
                items += batch
        except Exception as e:
            return items, e
        finally:
            conn.close()
        return items, None
    return asyncio.run(go())
