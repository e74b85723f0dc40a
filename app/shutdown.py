"""How ``preft up`` stops: a graceful drain on the first signal, at once on the second.

First SIGINT/SIGTERM (:func:`stop_serving`): the router refuses new requests (gRPC
``UNAVAILABLE``, HTTP 503, health ``NOT_SERVING``) and waits up to ``--drain-timeout``
seconds for those in flight to finish; what still runs then is ended with ``UNAVAILABLE``
saying the router is shutting down (an HTTP stream gets an OpenAI-style error event, then
``data: [DONE]``); then the HTTP gateway, the router, the workers, Ray and Redis stop
(:meth:`LocalCluster.stop`). A second signal, at any point of that, exits at once
(:func:`hard_exit`): Redis is stopped, every process of the Ray cluster this launcher
started is killed (:func:`kill_tree`, the node's processes and all their descendants:
raylet, GCS, agents, workers and their engines' children), and the process exits 130
without a traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ray_node_pids() -> list[int]:
    """The processes of the Ray node ``ray.init`` started in this process (GCS, raylet,
    dashboard, monitors); their descendants are found when they are killed."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return []
    return [p.process.pid for procs in node.all_processes.values() for p in procs
            if getattr(p, "process", None) is not None]


def process_tree(pids: list[int]) -> list:
    """``pids`` (those alive) and every descendant of theirs, as ``psutil.Process``."""
    import psutil

    out: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            for q in [p, *p.children(recursive=True)]:
                out[q.pid] = q
        except psutil.Error:   # gone already
            continue
    return list(out.values())


def kill_tree(procs: list, grace: float = 0.0, wait: float = 5.0) -> list:
    """End ``procs``: SIGTERM and up to ``grace`` s to exit (0: SIGKILL at once), then
    SIGKILL; returns those still alive after ``wait`` more seconds."""
    import psutil

    alive = [p for p in procs if p.is_running()]
    if grace > 0 and alive:
        for p in alive:
            _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        _signal(p, signal.SIGKILL)
    _, alive = psutil.wait_procs(alive, timeout=wait)
    return alive


def _signal(p, sig: int) -> None:
    import psutil

    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def hard_exit(cluster, code: int = EXIT_INTERRUPTED) -> None:
    """A second signal: Redis stopped, the Ray cluster's processes killed, exit now."""
    for sig in STOP_SIGNALS:   # a third signal cannot interrupt the cleanup
        signal.signal(sig, signal.SIG_IGN)
    print("interrupted again: stopping now (Ray processes killed)", file=sys.stderr,
          flush=True)
    try:
        cluster.kill()
    finally:
        sys.stdout.flush()
        os._exit(code)


async def stop_serving(cluster, drain_timeout: float, http_servers: list, http_task,
                       say) -> None:
    """After the first signal, on the serving loop: drain the router (a second signal exits
    at once), then stop the HTTP gateway and the router."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, hard_exit, cluster)
    say(f"shutting down (drain up to {drain_timeout:g} s; interrupt again to stop now)")
    await cluster.drain(drain_timeout, say=say)
    if http_task is not None:
        for srv in http_servers:
            srv.should_exit = True
        try:
            await asyncio.wait_for(http_task, 10)
        except Exception:   # noqa: BLE001 -- a gateway that failed or hangs: stop regardless
            pass
    await cluster.stop_router()


def stop_cluster(cluster) -> None:
    """Workers, Ray and Redis, off the loop; a signal meanwhile exits at once."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: hard_exit(cluster))
    cluster.stop()
