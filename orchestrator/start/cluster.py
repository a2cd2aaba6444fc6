"""Starting or attaching to Ray, and checking that a run can ever be scheduled."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import yaml

from orchestrator.errors import UserError
from workers.compat import (
    DATA_PARQUET_FOOTER_ACTORS_ENV,
    TRAIN_HEALTH_CHECK_INTERVAL_ENV,
    TRAIN_PREEMPTION_WATCHER_ENV,
    TRAIN_WORKER_GROUP_START_TIMEOUT_ENV,
    autoscaler_node_groups,
    dashboard_url,
    launcher_config_path,
    quiet_ray_token_setup,
    ray_daemons_in_own_process_group,
)
from workers.contract.config import RunConfig

# ray.train.report blocks until the controller polls the workers, every health-check
# interval (TRAIN_HEALTH_CHECK_INTERVAL_ENV, 2 s by default): for small epochs that is most
# of the run, and an epoch's time rounds up to the next poll. Measured (bench/results/pacing.txt,
# small model, bare Ray Train / native DDP per epoch): 2 s 8.6x, 0.1 s 1.34x, 0.05 s 1.04x,
# 0.02 s 1.00x, for 7.5% of one core in the controller. A user's own setting wins.
DEFAULT_HEALTH_CHECK_S = "0.02"


def pace_reports() -> None:
    """Give this process the poll interval unless the user set one. Ray Train copies the
    variable from the process that calls ``fit()`` into its controller actor's runtime_env,
    so this reaches the controller however the run is launched: a local Ray, a driver
    under ``ray job submit`` (whose job runtime_env did not set it), a Tune trial."""
    os.environ.setdefault(TRAIN_HEALTH_CHECK_INTERVAL_ENV, DEFAULT_HEALTH_CHECK_S)


# Ray Train gives a worker group 60 s to start (TRAIN_WORKER_GROUP_START_TIMEOUT_ENV); on a
# loaded 2-core machine starting Python workers that import torch can take longer, and each
# timed-out attempt leaves its workers starting while the next one waits for their CPUs.
# 600 s; a user's own setting wins.
DEFAULT_START_TIMEOUT_S = "600"


def ray_env_vars() -> dict[str, str]:
    env = {TRAIN_HEALTH_CHECK_INTERVAL_ENV: os.environ.get(TRAIN_HEALTH_CHECK_INTERVAL_ENV,
                                                           DEFAULT_HEALTH_CHECK_S),
           TRAIN_WORKER_GROUP_START_TIMEOUT_ENV: os.environ.get(
               TRAIN_WORKER_GROUP_START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)}
    # A workload module next to where the user runs the command must import in every worker.
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


# For a local Ray, one node: one process reads Parquet footers, with its many IO threads.
ONE_NODE_FOOTER_ACTORS = "1"


def one_node_env_vars() -> dict[str, str]:
    """For a local Ray started here, one node (the driver's), no pools of processes that only
    a cluster of many nodes needs. A user's own setting of each wins.

    - Ray Train's preemption watcher, an actor process at each worker-group start (about
      1.7 CPU-seconds each on 2 cores), off: no other node can be drained.
    - Ray Data's Parquet footer readers, a pool of actor processes at each read of a Parquet
      dataset (every epoch), one: a pool spreads footer reads over nodes. Measured, a 2-epoch
      run of ``configs/digits_parquet.yaml`` through the CLI: 136 CPU-seconds and 78 s with
      the default pool, 105 and 70 s with one reader, the same metrics.
    """
    defaults = {TRAIN_PREEMPTION_WATCHER_ENV: "0",
                DATA_PARQUET_FOOTER_ACTORS_ENV: ONE_NODE_FOOTER_ACTORS}
    return {k: v for k, v in defaults.items() if k not in os.environ}


def attaches_to_cluster() -> bool:
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


@dataclass(frozen=True)
class Capacity:
    """The most of each resource a cluster can ever have, and the shapes of its nodes (one
    worker's CPUs and GPU must fit on one node)."""

    total: dict[str, float]
    nodes: tuple[dict[str, float], ...]

    def fits_one(self, need: dict[str, float]) -> bool:
        return any(all(node.get(k, 0.0) >= v for k, v in need.items() if v) for node in self.nodes)


def local_resources() -> Capacity:
    """What a local Ray started here will have: checked before starting it."""
    import torch

    node = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return Capacity(total=node, nodes=(node,))


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_started_here: list[str] = []  # the dashboard URL of the local Ray this process started


def started_here() -> bool:
    """Whether the Ray this process is connected to is the local one it started (False when
    it is connected to none: the one it started may have been shut down since)."""
    import ray

    return (bool(_started_here) and ray.is_initialized()
            and _started_here[-1] == dashboard_url())


@contextmanager
def one_node_driver_env() -> Iterator[None]:
    """In this process, for what runs inside (a workload building its Ray Datasets on the
    driver), ``one_node_env_vars`` when its Ray is the local one it started: Ray Data reads
    some of them where a dataset is made, not where it runs. The process's own environment
    is as it was afterwards."""
    added = one_node_env_vars() if started_here() else {}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(verbose: bool = False) -> bool:
    """Attach to a running cluster (RAY_ADDRESS, or under ``ray job submit``), else start one.

    Unless ``verbose``, Ray's own output stays out of the terminal: its start-up lines, and
    what its processes print (the Train controller's and workers' logs, prefixed and
    coloured by Ray); the driver prints each epoch itself. Ray's error messages to the driver
    (a worker died, a node was lost) are shown either way. Returns True when the Ray this
    process uses is a local one it started.
    """
    import ray

    if ray.is_initialized():
        return started_here()
    level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=level, log_to_driver=verbose)
        return False
    if not verbose:
        quiet_ray_token_setup()
    # Not for show: Ray Train's PlacementGroupCleaner asks the dashboard's state API whether
    # a controller died, to free its workers' CPUs (a Tune trial stopped by its scheduler).
    # It listens on 127.0.0.1 only. Left to itself, the state API in a worker looks for "the"
    # local cluster in /tmp/ray/ray_current_cluster, the latest one started on the machine:
    # with two runs at once, another run's. So every process of this job is told its own.
    port = _free_port()
    api_server = f"http://127.0.0.1:{port}"
    with ray_daemons_in_own_process_group():  # a signal to this process's group is its alone
        ray.init(
            # "local": a new Ray of its own, even where `ray start` left one running on this
            # machine (Ray would join the latest one); a running cluster is used only when
            # RAY_ADDRESS names it.
            address="local",
            runtime_env={"env_vars": {**ray_env_vars(), **one_node_env_vars(),
                                      API_SERVER_ENV: api_server}},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            logging_level=level,
            log_to_driver=verbose,
        )
    _started_here.append(dashboard_url())
    return True


def _numbers(resources: Any) -> dict[str, float]:
    if not isinstance(resources, dict):
        return {}
    return {k: float(v) for k, v in resources.items() if isinstance(v, int | float) and v >= 0}


def capacity(nodes_now: list[dict[str, Any]], config_groups: list[tuple[dict[str, Any], int]]
             | None = None, launcher: dict[str, Any] | None = None) -> Capacity:
    """What a cluster can ever have: its nodes now, or what its autoscaler may add, whichever
    is more. An upper bound, so a run is refused only when no number of nodes could fit it.

    ``nodes_now``: each alive node's total resources.
    ``config_groups``: (resources, max_count) per node group the autoscaler reported to the
    GCS (max_count -1: unbounded).
    ``launcher``: the cluster launcher's config (``launcher_config_path()`` on its head):
    the head node type once, each worker node type ``max_workers`` times (at most the
    cluster's ``max_workers``).
    """
    now = [_numbers(node) for node in nodes_now]
    groups: list[tuple[dict[str, float], float]] = []
    for resources, count in config_groups or []:
        groups.append((_numbers(resources), float("inf") if count < 0 else float(count)))
    if launcher and isinstance(launcher.get("available_node_types"), dict):
        cap = launcher.get("max_workers")
        head = launcher.get("head_node_type")
        for name, node in launcher["available_node_types"].items():
            if not isinstance(node, dict):
                continue
            count = node.get("max_workers", cap if isinstance(cap, int) else 0)
            count = 1 if name == head else int(count) if isinstance(count, int) else 0
            if name != head and isinstance(cap, int):
                count = min(count, cap)
            groups.append((_numbers(node.get("resources")), float(count)))
    growable = [(resources, count) for resources, count in groups if count > 0]

    total = _summed((node, 1.0) for node in now)
    for key, value in _summed(growable).items():
        total[key] = max(total.get(key, 0.0), value)
    return Capacity(total=total, nodes=tuple(now + [resources for resources, _ in growable]))


def _summed(groups: Any) -> dict[str, float]:
    """Per resource, the sum over (resources, count) pairs of count x amount."""
    out: dict[str, float] = {}
    for resources, count in groups:
        for key, value in resources.items():
            if value:  # 0 of a resource on unboundedly many nodes is still 0
                out[key] = out.get(key, 0.0) + count * value
    return out


LAUNCHER_CONFIG = launcher_config_path()


def cluster_capacity(local: bool) -> Capacity:
    """``capacity`` of the cluster this process is attached to (``local``: a Ray it started,
    which no autoscaler or launcher config can grow)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if local:
        return capacity(nodes)
    groups = autoscaler_node_groups()
    launcher = None
    if LAUNCHER_CONFIG.is_file():  # under `ray job submit`, the driver runs on the head node
        try:
            launcher = yaml.safe_load(LAUNCHER_CONFIG.read_text())
        except (OSError, yaml.YAMLError):
            launcher = None
    return capacity(nodes, groups, launcher if isinstance(launcher, dict) else None)


def resolve_use_gpu(cfg: RunConfig, resources: Capacity) -> bool:
    if cfg.scaling.use_gpu == "auto":
        return resources.total.get("GPU", 0.0) > 0
    return bool(cfg.scaling.use_gpu)


def check_resources(cfg: RunConfig, resources: Capacity) -> bool:
    """Fail fast, instead of waiting forever, when the cluster can never fit the run.

    ``resources``: ``cluster_capacity()``, or ``local_resources()`` before a local start.
    Returns whether the run uses GPUs.
    """
    use_gpu = resolve_use_gpu(cfg, resources)
    n, per_worker = cfg.scaling.min_workers, cfg.scaling.cpus_per_worker  # elastic: its min
    cpus = resources.total.get("CPU", 0.0)
    if n * per_worker > cpus:
        raise UserError(
            f"scaling.num_workers: {n} workers x {per_worker:g} CPU need {n * per_worker:g} "
            f"CPUs but the cluster can have at most {cpus:g}; use at most "
            f"{int(cpus // per_worker)} workers or fewer scaling.cpus_per_worker"
        )
    gpus = resources.total.get("GPU", 0.0)
    if use_gpu and n > gpus:
        raise UserError(
            f"scaling.num_workers: {n} workers need one GPU each but the cluster can have at "
            f"most {gpus:g} GPUs; use at most {int(gpus)} workers or scaling.use_gpu: false"
        )
    need = {"CPU": per_worker, "GPU": 1.0 if use_gpu else 0.0}
    if not resources.fits_one(need):
        largest = max((node.get("CPU", 0.0) for node in resources.nodes
                       if not use_gpu or node.get("GPU", 0.0) >= 1), default=0.0)
        where = "GPU node" if use_gpu else "node"
        raise UserError(
            f"scaling.cpus_per_worker: one worker needs {per_worker:g} CPUs"
            f"{' and a GPU' if use_gpu else ''} on one node, but no {where} of the cluster has "
            f"more than {largest:g} CPUs; use scaling.cpus_per_worker <= {largest:g}"
        )
    return use_gpu


def check_data_room(cfg: RunConfig, resources: Capacity | None) -> None:
    """A run that streams Ray Datasets needs a CPU its workers do not hold: Ray Data's read
    and transform tasks run beside them, and without one the first batch never comes."""
    if resources is None:
        return
    cpus = resources.total.get("CPU", 0.0)
    taken = cfg.scaling.max_workers * cfg.scaling.cpus_per_worker
    if cpus - taken < 1:
        raise UserError(
            f"scaling.cpus_per_worker: {cfg.scaling.max_workers} workers x "
            f"{cfg.scaling.cpus_per_worker:g} CPU take {taken:g} of the cluster's {cpus:g} "
            "CPUs, and the workload's Ray Datasets need one more for Ray Data's read tasks; "
            f"use scaling.cpus_per_worker <= {max(cpus - 1, 0) / cfg.scaling.max_workers:g} "
            "or fewer workers")
