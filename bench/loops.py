"""The baselines' per-worker loops on Ray Train: the project's training steps, their saving.

Both reuse the project's ``start_worker``, ``setup`` and ``epoch_metrics`` (so the training,
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
from workers.compat import train_run_storage
from workers.engines.torch_engine import epoch_metrics, setup
from workers.loop.runtime import start_worker


def _epochs(config: dict[str, Any]):
    """Yield (epoch, parts, rank, metrics) after each epoch's training and global metrics."""
    worker = start_worker(config)
    parts = setup(worker)
    for epoch in worker.epochs():
        yield epoch, parts, worker.rank, {"epoch": epoch, **epoch_metrics(worker, parts, epoch)}


def naive_loop(config: dict[str, Any]) -> None:
    import ray.train

    run_dir = Path(train_run_storage().run_path)
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
