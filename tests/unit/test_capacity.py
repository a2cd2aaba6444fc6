"""What a cluster can ever provide, the fail-fast check built on it, and what a local one-node
Ray is started with (pure logic)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.start.cluster import Capacity, capacity, check_resources, one_node_env_vars
from workers.compat import DATA_PARQUET_FOOTER_ACTORS_ENV, TRAIN_PREEMPTION_WATCHER_ENV
from workers.contract.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD_ONLY = [{"CPU": 0.0, "memory": 3e10, "node:__internal_head__": 1.0}]


def config(**scaling) -> RunConfig:
    return RunConfig.model_validate({
        "name": "cap", "workload": {"entrypoint": "workers.workloads.digits:build"},
        "scaling": scaling,
    })


def launcher() -> dict:
    return yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())


def test_the_projects_cluster_yaml_counts_its_autoscaling_gpu_workers() -> None:
    # The head has no CPUs for work and no GPU worker is up yet: what a job submitted right
    # after `ray up` sees. It can still grow to 4 nodes of 48 CPUs and 4 GPUs.
    cap = capacity(HEAD_ONLY, None, launcher())
    assert cap.total["CPU"] == 4 * 48 and cap.total["GPU"] == 4 * 4
    assert check_resources(config(num_workers=16, use_gpu="auto"), cap) is True
    with pytest.raises(UserError, match=r"17 workers need one GPU each .* at most 16 GPUs"):
        check_resources(config(num_workers=17, use_gpu="auto"), cap)
    with pytest.raises(UserError, match=r"cpus_per_worker: .* no GPU node .* more than 48 CPUs"):
        check_resources(config(num_workers=2, use_gpu=True, cpus_per_worker=64), cap)


def test_without_an_autoscaler_only_the_nodes_count() -> None:
    cap = capacity([{"CPU": 2.0}, {"CPU": 2.0}])
    assert cap.total == {"CPU": 4.0}
    assert check_resources(config(num_workers=4, use_gpu="auto"), cap) is False
    with pytest.raises(UserError, match=r"^scaling.num_workers: 5 workers x 1 CPU need 5 CPUs "
                                        r"but the cluster can have at most 4; use at most 4"):
        check_resources(config(num_workers=5), cap)
    # 4 CPUs in all, but one worker of 3 fits on no node.
    with pytest.raises(UserError, match=r"^scaling.cpus_per_worker: one worker needs 3 CPUs on "
                                        r"one node, but no node .* more than 2 CPUs"):
        check_resources(config(num_workers=1, cpus_per_worker=3), cap)
    with pytest.raises(UserError, match=r"need one GPU each but the cluster can have at most 0"):
        check_resources(config(num_workers=1, use_gpu=True), cap)


def test_groups_reported_by_the_autoscaler() -> None:
    cap = capacity(HEAD_ONLY, [({"CPU": 8, "GPU": 2}, 3), ({"CPU": 4}, 0)])
    assert (cap.total["CPU"], cap.total["GPU"]) == (24.0, 6.0)
    assert check_resources(config(num_workers=6, cpus_per_worker=4), cap) is True
    unbounded = capacity(HEAD_ONLY, [({"CPU": 8}, -1)])
    assert math.isinf(unbounded.total["CPU"])
    assert check_resources(config(num_workers=1000), unbounded) is False


def test_nodes_up_now_count_when_the_bound_is_lower() -> None:
    # A node started by hand beside the autoscaler's: the larger figure wins.
    cap = capacity([{"CPU": 16.0, "GPU": 8.0}], [({"CPU": 4, "GPU": 1}, 2)])
    assert (cap.total["CPU"], cap.total["GPU"]) == (16.0, 8.0)
    assert cap.fits_one({"CPU": 12.0, "GPU": 1.0})


def test_a_launcher_config_without_per_type_max_uses_the_clusters() -> None:
    cfg = {"max_workers": 3, "head_node_type": "head",
           "available_node_types": {"head": {"resources": {"CPU": 2}},
                                    "cpu": {"resources": {"CPU": 8}}}}
    assert capacity([{"CPU": 2.0}], None, cfg).total["CPU"] == 2 + 3 * 8
    cfg["available_node_types"]["cpu"]["max_workers"] = 10  # capped by the cluster's 3
    assert capacity([{"CPU": 2.0}], None, cfg).total["CPU"] == 2 + 3 * 8


def test_local_machine_shape() -> None:
    cap = Capacity(total={"CPU": 2.0, "GPU": 0.0}, nodes=({"CPU": 2.0, "GPU": 0.0},))
    assert check_resources(config(num_workers=2), cap) is False
    with pytest.raises(UserError, match="use at most 2 workers"):
        check_resources(config(num_workers=3), cap)


def test_a_local_one_node_ray_starts_no_pools_for_many_nodes_unless_the_user_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (TRAIN_PREEMPTION_WATCHER_ENV, DATA_PARQUET_FOOTER_ACTORS_ENV):
        monkeypatch.delenv(name, raising=False)
    assert one_node_env_vars() == {TRAIN_PREEMPTION_WATCHER_ENV: "0",
                                   DATA_PARQUET_FOOTER_ACTORS_ENV: "1"}
    monkeypatch.setenv(DATA_PARQUET_FOOTER_ACTORS_ENV, "8")  # the user's own: Ray reads it
    assert one_node_env_vars() == {TRAIN_PREEMPTION_WATCHER_ENV: "0"}
