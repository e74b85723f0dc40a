"""Every YAML in deploy/ parses into the frozen configs (unknown fields are errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig, from_dict

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_yaml_parses(path):
    cfg = from_dict(ClusterConfig, yaml.safe_load(path.read_text()))
    assert cfg.prefill.engine.model == cfg.decode.engine.model
