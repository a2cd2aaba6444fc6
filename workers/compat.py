"""Every private (underscore) API of Ray and fastai that the project uses, in one place.

Each has a reason and a fallback where one exists; a Ray or fastai upgrade means checking this
file, nothing else. Imports are inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
from typing import Any


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO on each worker; the driver prints one line per
    epoch instead. That module's logger is named after its file path, not its module name,
    so it can only be reached through the module."""
    from ray.train.v2._internal.execution import context as train_context

    train_context.logger.setLevel(logging.WARNING)


def quiet_ray_token_setup() -> None:
    """Ray 2.60 turns token authentication on for a local cluster it starts and says so at
    WARNING on stderr; that is the right default, not something to alarm users with."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )


def dashboard_url() -> str:
    """The dashboard of the Ray this process is connected to ("" if none)."""
    import ray

    return ray._private.worker.get_dashboard_url() or ""


def autoscaler_node_groups() -> list[tuple[dict[str, Any], int]] | None:
    """(resources, max_count) per node group an autoscaler reported to the GCS (max_count -1:
    unbounded); None when no autoscaler reported or the API is not there."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it, other sources count
        return None
    if config is None:
        return None
    return [(dict(g.resources), g.max_count) for g in config.node_group_configs]


def fastai_fake_loader(dl: Any, like: Any) -> Any:
    """fastai's ``_FakeLoader`` (the torch DataLoader a fastai DataLoader iterates through)
    for ``dl``, with the settings of ``like`` (another loader's): fastai's public
    ``DistributedDL`` cannot be used under gloo on CPU (see engines.fastai.data)."""
    from fastai.data.load import _FakeLoader

    return _FakeLoader(dl, like.pin_memory, like.num_workers, like.timeout,
                       persistent_workers=like.persistent_workers,
                       pin_memory_device=like.pin_memory_device)


def keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SECURITY_TOKEN and
    AWS_SESSION_TOKEN from the driver's environment into every trial's runtime_env, and Ray's
    runtime-env agent logs runtime envs in full (``runtime_env_agent.log`` in the session's
    logs): the secrets end up on disk. Trials get credentials the way Ray Train's workers do,
    which Ray does not copy: inherited from the driver on a local Ray, from the node's own
    environment (an instance profile) on a cluster. The set is read when a trial starts."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {
        name for name in class_cache.ENV_VARS_TO_PROPAGATE if not name.startswith("AWS_")}


def torchmetric_reductions(metric: Any) -> dict[str, str]:
    """How torchmetrics combines each state of ``metric`` across ranks: ``sum``, ``cat``,
    ``mean``, ``max``, ``min``, ``none`` (stacked) or ``custom``. torchmetrics keeps them in
    the private ``Metric._reductions`` (state name -> its ``dim_zero_*`` function); no public
    API names them."""
    from torchmetrics.utilities import data

    known = {data.dim_zero_sum: "sum", data.dim_zero_cat: "cat", data.dim_zero_mean: "mean",
             data.dim_zero_max: "max", data.dim_zero_min: "min"}
    return {name: "none" if fn is None else known.get(fn, "custom")
            for name, fn in metric._reductions.items()}
