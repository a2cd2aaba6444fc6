"""The baselines' per-worker loops on Ray Train: the project's training steps, their saving.

Both reuse the project's ``setup``, ``train_epoch`` and ``evaluate_epoch`` (so the training,
the data, the seeds and the one all-reduce of metric statistics are the project's), and
differ only in how they save. They report what they wrote (``WRITTEN_KEY``) and how long
the save itself took (``SAVE_KEY``) for the benchmark's accounting.

- ``naive_loop``: rank 0 ``torch.save``s the state dict every epoch into the run
  directory, one file per epoch, synchronously; the report carries no checkpoint.
- ``ray_default_loop``: Ray Train's documented pattern: every epoch, every rank saves the
  state dict into a temporary directory and reports it as a checkpoint (synchronous upload);
  Ray keeps one checkpoint by score (``CheckpointConfig(num_to_keep=1, ...)``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.probes import SAVE_KEY, WRITTEN_KEY
from workers.config import RunConfig
from workers.evaluation import train_epoch
from workers.loop import epoch_seed, evaluate_epoch, quiet_ray_train_logs, setup


def _epochs(config: dict[str, Any]):
    """Yield (epoch, setup, metrics) after each epoch's training and global metrics."""
    import ray.train

    cfg = RunConfig.model_validate(config)
    quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    s = setup(cfg, rank, world_size)
    for epoch in range(s.start_epoch, cfg.train.epochs + 1):
        torch.manual_seed(epoch_seed(cfg.seed, rank, epoch))
        s.train_loader.sampler.set_epoch(epoch)
        train_loss = train_epoch(s.model, s.train_loader, s.loss_fn, s.optimizer, s.device)
        yield epoch, s, rank, {"epoch": epoch, **evaluate_epoch(s, train_loss)}


def naive_loop(config: dict[str, Any]) -> None:
    import ray.train

    run_dir = Path(ray.train.get_context().get_storage().experiment_fs_path)
    for epoch, s, rank, metrics in _epochs(config):
        if rank == 0:
            started = time.perf_counter()
            path = run_dir / f"model_epoch{epoch:04d}.pt"
            torch.save(s.plain.state_dict(), path)
            metrics[SAVE_KEY] = time.perf_counter() - started
            metrics[WRITTEN_KEY] = path.stat().st_size
        ray.train.report(metrics)


def ray_default_loop(config: dict[str, Any]) -> None:
    import ray.train

    for _, s, _, metrics in _epochs(config):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            path = os.path.join(tmp, "model.pt")
            torch.save(s.plain.state_dict(), path)
            metrics[SAVE_KEY] = time.perf_counter() - started
            metrics[WRITTEN_KEY] = os.path.getsize(path)  # Ray copies it into storage
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
