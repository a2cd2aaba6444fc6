"""A one-worker trial trained in its Tune trial's own process (``tune.one_worker_trials:
in_trial``, the default).

A trial of one worker has nothing to all-reduce, yet as a Ray Train run it pays for a
controller, a worker group and Ray Train's helper actors: about 11 s from its start to its
first epoch on 2 cores, for an epoch that may take 2 s. Here the trial's process runs the same
train loop (``workers.engines``) itself. What Ray Train would give the loop comes through the
seam Ray's own local mode uses (``TrainFnUtils``, ``workers.compat``):

- rank 0 of 1, with a gloo process group of one, as Ray Train sets up for one worker;
- the checkpoint to continue from, as the run's snapshot in storage has it;
- each report handled as the run's controller handles it: the checkpoint written into the run
  directory and registered with Ray Train's own ``CheckpointManager`` (the same retention, and
  the same snapshot, so a resumed search continues the trial where it stands), the record
  appended to the history and the model staged for W&B by the run's ``RunRecorder``, and the
  metrics handed to Tune (with the checkpoint's path, as ``TuneReportCallback`` does);
- ``failure.max_failures``: a failure other than the user's mistake trains again from the
  last checkpoint, as Ray Train restarts its worker group.

Everything after the report (the tracker, the policy, the checkpoint's files and metadata,
exact metrics, the test split, W&B, the leaderboard) is the same code as in a Ray Train trial.
Trials of several workers (fsdp's among them), on GPUs or with Ray Dataset splits stay Ray
Train runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from orchestrator import storage
from orchestrator.errors import user_error_among
from orchestrator.training.recorder import RunRecorder
from workers.checkpoint.policy import ray_keep_settings
from workers.compat import (
    install_train_fn_utils,
    latest_checkpoint,
    one_process_checkpoint_manager,
    one_process_train_context,
    register_checkpoint,
    train_fn_utils_base,
    train_storage_context,
)
from workers.contract.config import RunConfig
from workers.contract.names import RANK_KEY
from workers.engines import train_loop_for

CHECKPOINT_PATH_KEY = "checkpoint_path"  # the key TuneReportCallback reports the path under


def trains_in_trial(cfg: RunConfig, use_gpu: bool, ray_datasets: bool) -> bool:
    """Whether a trial of ``cfg`` trains in its Tune trial's own process."""
    return (cfg.tune.one_worker_trials == "in_trial" and cfg.scaling.num_workers == 1
            and not use_gpu and not ray_datasets)  # fsdp needs 2 workers or more


class OneProcessRun(train_fn_utils_base()):  # type: ignore[misc]
    """What ``ray.train``'s functions reach in the trial's process while its loop runs: the
    run's context, its checkpoint, and each report (see the module's docstring).
    ``on_report``: Tune's end of each report (the metrics, with ``CHECKPOINT_PATH_KEY``)."""

    def __init__(self, cfg: RunConfig, run_dir: str, log_model: str,
                 on_report: Callable[[dict[str, Any]], None]) -> None:
        from ray.train import CheckpointConfig

        self.device = torch.device("cpu")
        self.storage = train_storage_context(storage.resolve(cfg.storage_path), cfg.name)
        self.storage.storage_filesystem.create_dir(self.storage.experiment_fs_path)
        self.context = one_process_train_context(cfg.name, self.storage)
        self.checkpoints = one_process_checkpoint_manager(
            CheckpointConfig(**ray_keep_settings(cfg.checkpoint.policy, RANK_KEY,
                                                 cfg.checkpoint.keep_top_k,
                                                 bool(cfg.tracker.also_monitor))),
            self.storage)
        self.start_checkpoint = latest_checkpoint(self.checkpoints)
        self.recorder = RunRecorder(run_dir, log_model)
        self.on_report = on_report

    def report(self, metrics: dict[str, Any], checkpoint: Any = None,
               checkpoint_dir_name: str | None = None, checkpoint_upload_mode: Any = None,
               delete_local_checkpoint_after_upload: bool | None = None,
               checkpoint_upload_fn: Callable[[Any, str], Any] | None = None,
               validation: Any = False) -> None:
        persisted = None
        if checkpoint is not None:
            persisted = self._persist(checkpoint, checkpoint_dir_name, checkpoint_upload_fn)
            register_checkpoint(self.checkpoints, persisted, metrics)
        self.recorder.after_report(None, [metrics], persisted)
        self.on_report({**metrics, **({CHECKPOINT_PATH_KEY: persisted.path}
                                      if persisted is not None else {})})

    def _persist(self, checkpoint: Any, name: str | None,
                 upload: Callable[[Any, str], Any] | None) -> Any:
        """The checkpoint in the run directory: written by ``upload`` (the workers' writer
        writes straight there), or copied there, as Ray Train's upload does."""
        from ray.train import Checkpoint

        name = name or f"checkpoint_{len(self.checkpoints.best_checkpoint_results)}"
        if upload is not None:
            return upload(checkpoint, name)
        path = self.storage.build_checkpoint_path_from_name(name)
        pafs.copy_files(checkpoint.path, path, source_filesystem=checkpoint.filesystem,
                        destination_filesystem=self.storage.storage_filesystem)
        return Checkpoint(path=path, filesystem=self.storage.storage_filesystem)

    def get_checkpoint(self) -> Any:
        return self.start_checkpoint

    def get_all_reported_checkpoints(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    def get_dataset_shard(self, dataset_info: Any) -> Any:
        raise RuntimeError("a trial trained in its own process has no Ray Dataset splits")

    def get_context(self) -> Any:
        return self.context

    def get_preemption_info(self) -> None:
        return None

    def is_distributed(self) -> bool:
        return False

    def barrier(self) -> None:
        pass

    def broadcast_from_rank_zero(self, data: Any) -> Any:
        return data


def train_in_trial(cfg: RunConfig, run_dir: str, loop_config: dict[str, Any], *,
                   log_model: str, on_report: Callable[[dict[str, Any]], None]) -> None:
    """Train the run of ``cfg`` in this process to its end (``loop_config``: the config and
    what the workers get beside it, as Ray Train's ``train_loop_config``). A failure other
    than the user's mistake trains again from the last checkpoint, ``failure.max_failures``
    times (-1: always), then is raised."""
    loop = train_loop_for(cfg.engine)
    failures = 0
    while True:
        install_train_fn_utils(OneProcessRun(cfg, run_dir, log_model, on_report))
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            loop(dict(loop_config))
            return
        except Exception as exc:
            failures += 1
            if user_error_among([exc]) or 0 <= cfg.failure.max_failures < failures:
                raise
            logging.getLogger(__name__).warning(
                "%s failed (%s: %s); training again from its last checkpoint (failure %d of "
                "failure.max_failures %s)", cfg.name, type(exc).__name__, exc, failures,
                cfg.failure.max_failures)
        finally:
            dist.destroy_process_group()
