"""Render the Grafana dashboard's queries from a live cluster, with a real Prometheus.

``python -m bench.dashboard`` starts the embedded tiny cluster with its ``/metrics`` port,
a local ``prometheus`` (Debian's package) scraping it every second, sends mixed-adapter
traffic for ``--seconds``, then evaluates every panel query of
``deploy/grafana/preft-dashboard.json`` through Prometheus' HTTP API (``query_range``) and
draws them in the dashboard's own grid into one PNG: the same PromQL Grafana would run,
plotted. It reports panels that came back empty, and exits non-zero if any did.

:class:`LocalPrometheus` is also what ``tests/integration/test_dashboard_live.py`` uses.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "preft-dashboard.json"


def panels(path: Path = DASHBOARD) -> list[dict]:
    return json.loads(path.read_text())["panels"]


class LocalPrometheus:
    """A throwaway ``prometheus`` process scraping ``targets`` every ``interval_s``."""

    def __init__(self, targets: list[str], interval_s: float = 1.0) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus is not installed (scripts/setup.sh installs Debian's "
                               "prometheus package)")
        self.dir = Path(tempfile.mkdtemp(prefix="preft-prom-"))
        every = f"{int(interval_s * 1000)}ms"   # Prometheus durations: no "1.0s"
        cfg = {"global": {"scrape_interval": every, "evaluation_interval": every},
               "scrape_configs": [{"job_name": "preft-router",
                                   "static_configs": [{"targets": targets}]}]}
        (self.dir / "prometheus.yml").write_text(json.dumps(cfg))   # JSON is YAML
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        log = (self.dir / "prometheus.log").read_text()[-2000:]
        self.stop()
        raise RuntimeError(f"prometheus did not become ready:\n{log}")

    def api(self, path: str, **params) -> dict:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def targets_up(self) -> bool:
        act = self.api("targets")["activeTargets"]
        return bool(act) and all(t["health"] == "up" for t in act)

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def has_data(result: list[dict]) -> bool:
    """At least one sample that is a finite number."""
    for series in result:
        vals = series.get("values") or [series.get("value")]
        if any(v and math.isfinite(float(v[1])) for v in vals):
            return True
    return False


def render(prom: LocalPrometheus, start: float, end: float, out: Path,
           path: Path = DASHBOARD) -> dict[str, bool]:
    """Plot every panel's queries over [start, end] in the dashboard grid; {title: has data}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = panels(path)
    rows = max(p["gridPos"]["y"] // 8 for p in ps) + 1
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
    step = max(1.0, (end - start) / 200)
    status = {}
    for p in ps:
        ax = axes[p["gridPos"]["y"] // 8][p["gridPos"]["x"] // 12]
        ok = False
        for t in p["targets"]:
            for series in prom.query_range(t["expr"], start, end, step):
                xs = [float(v[0]) - start for v in series["values"]]
                ys = [float(v[1]) for v in series["values"]]
                label = t.get("legendFormat", "")
                for k, v in series["metric"].items():
                    label = label.replace("{{" + k + "}}", v)
                ax.plot(xs, ys, label=label or t["refId"])
                ok = ok or any(math.isfinite(y) for y in ys)
        status[p["title"]] = ok
        ax.set_title(p["title"] + ("" if ok else "  [no data]"), fontsize=10)
        ax.set_xlabel("s", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("PreFT Serve dashboard (deploy/grafana/preft-dashboard.json), queried from "
                 "Prometheus scraping a live cluster")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=90, help="traffic duration (default 90)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--out", default="docs/img/dashboard.png", help="PNG to write")
    a = p.parse_args(argv)

    import asyncio
    import random

    from app.assets import tiny_assets
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)
    from app.launcher import LocalCluster
    from preft_client import AsyncPreftClient

    model, adapters = tiny_assets()
    eng = EngineConfig(model=str(model), max_model_len=1024)
    run_dir = tempfile.mkdtemp(prefix="preft-dash-")
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng, max_cpu_loras=8),
                        decode=DecodeConfig(engine=eng), router=RouterConfig(port=0, metrics_port=0),
                        adapters=tuple((n, str(p)) for n, p in adapters.items()), run_dir=run_dir)
    cluster = LocalCluster(cfg)
    prom = None
    try:
        cluster.start_in_thread(print)
        prom = LocalPrometheus([f"127.0.0.1:{cluster.metrics_port}"])
        names = [None, *adapters]

        async def traffic() -> int:
            n = 0
            async with AsyncPreftClient(cluster.address) as c:
                stop = time.monotonic() + a.seconds

                async def worker(i: int) -> None:
                    nonlocal n
                    rng = random.Random(i)
                    while time.monotonic() < stop:
                        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"])
                                         for _ in range(rng.randint(4, 200)))
                        await c.generate(rng.choice(names), prompt=words,
                                         max_tokens=rng.randint(4, 32), ignore_eos=True)
                        n += 1
                await asyncio.gather(*(worker(i) for i in range(a.concurrency)))
            return n

        t0 = time.time()
        n = asyncio.run(traffic())
        time.sleep(3)  # one more scrape after the last request
        status = render(prom, t0, time.time(), REPO / a.out)
        print(f"{n} requests in {a.seconds:.0f}s; wrote {a.out}")
        for title, ok in status.items():
            print(f"  {'ok     ' if ok else 'NO DATA'}  {title}")
        return 0 if all(status.values()) else 1
    finally:
        if prom is not None:
            prom.stop()
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
