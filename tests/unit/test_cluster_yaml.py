"""cluster.yaml passes Ray's own cluster-config checks, offline: the launcher's own steps
before it talks to a cloud (defaults merged, node types filled in, then the JSON schema)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> None:
    validate_config(prepare_config(config))  # what `ray up` does first


def test_cluster_yaml_is_valid(config):
    check(config)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] > 1 and workers["max_workers"] >= 1
    assert config["available_node_types"]["head"]["resources"].get("GPU", 0) == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert any("pip install -e /home/ubuntu/orchestrator" in c for c in config["setup_commands"])


@pytest.mark.parametrize(
    "breakage",
    ["no head node type", "head type not defined", "unknown key", "worker count not a number"],
)
def test_broken_copies_are_rejected(config, breakage):
    broken = copy.deepcopy(config)
    if breakage == "no head node type":
        del broken["head_node_type"]
    elif breakage == "head type not defined":
        broken["head_node_type"] = "missing"
    elif breakage == "unknown key":
        broken["worker_nodes_typo"] = {}
    else:
        broken["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    with pytest.raises(Exception):  # noqa: B017 - jsonschema or Ray's ValueError, both reject
        check(broken)
