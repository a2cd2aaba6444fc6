"""Starting or attaching to Ray, and checking that a run can ever be scheduled."""

from __future__ import annotations

import logging
import os
from typing import Any

from orchestrator.config import UserError
from workers.config import RunConfig

# ray.train.report blocks until the controller polls the workers, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): for small epochs that is most of the
# run. 0.1 s keeps per-epoch reports cheap; a user's own setting wins.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_HEALTH_CHECK_S = "0.1"


def pace_reports() -> None:
    """Give this process the poll interval unless the user set one. Ray Train copies the
    variable from the process that calls ``fit()`` into its controller actor's runtime_env,
    so this reaches the controller however the run is launched: a local Ray, a driver
    under ``ray job submit`` (whose job runtime_env did not set it), a Tune trial."""
    os.environ.setdefault(HEALTH_CHECK_ENV, DEFAULT_HEALTH_CHECK_S)


# Ray Train gives a worker group 60 s to start; on a loaded 2-core machine starting Python
# workers that import torch can take longer, and each timed-out attempt leaves its workers
# starting while the next one waits for their CPUs. 600 s; a user's own setting wins.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = "600"


def ray_env_vars() -> dict[str, str]:
    env = {HEALTH_CHECK_ENV: os.environ.get(HEALTH_CHECK_ENV, DEFAULT_HEALTH_CHECK_S),
           START_TIMEOUT_ENV: os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)}
    # A workload module next to where the user runs the command must import in every worker.
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def attaches_to_cluster() -> bool:
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def local_resources() -> dict[str, Any]:
    """What a local Ray started here will have: checked before starting it."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def init_ray() -> bool:
    """Attach to a running cluster (RAY_ADDRESS, or under ``ray job submit``), else start one.

    Returns True when a local Ray was started in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return False
    # Ray 2.60 turns token authentication on for the local cluster it starts and says so
    # on stderr at WARNING; that is the right default, not something to alarm users with.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    ray.init(
        runtime_env={"env_vars": ray_env_vars()},
        # Not for show: Ray Train's PlacementGroupCleaner asks the dashboard's state API whether
        # a controller died, to free its workers' CPUs (a Tune trial stopped by its scheduler).
        # It listens on 127.0.0.1 only.
        include_dashboard=True,
        logging_level=logging.WARNING,
    )
    return True


def resolve_use_gpu(cfg: RunConfig, resources: dict[str, Any]) -> bool:
    gpus = resources.get("GPU", 0)
    if cfg.scaling.use_gpu == "auto":
        return gpus > 0
    return bool(cfg.scaling.use_gpu)


def check_resources(cfg: RunConfig, resources: dict[str, Any]) -> bool:
    """Fail fast, instead of waiting forever, when the cluster can never fit the run."""
    use_gpu = resolve_use_gpu(cfg, resources)
    n = cfg.scaling.num_workers
    cpus_needed = n * cfg.scaling.cpus_per_worker
    cpus = resources.get("CPU", 0)
    if cpus_needed > cpus:
        raise UserError(
            f"scaling.num_workers: {n} workers x {cfg.scaling.cpus_per_worker:g} CPU need "
            f"{cpus_needed:g} CPUs but the cluster has {cpus:g}; use at most "
            f"{int(cpus // cfg.scaling.cpus_per_worker)} workers or fewer scaling.cpus_per_worker"
        )
    gpus = resources.get("GPU", 0)
    if use_gpu and n > gpus:
        raise UserError(
            f"scaling.num_workers: {n} workers need one GPU each but the cluster has "
            f"{gpus:g} GPUs; use at most {int(gpus)} workers or scaling.use_gpu: false"
        )
    return use_gpu
