"""``checkpoint.average_top_k`` at a run's end, in one process (a Ray task beside the data):
the K best checkpoints' weights averaged (``decisions.averaging``), BatchNorm's running
statistics recomputed on the training split where the model has BatchNorm (the averaged
weights never saw the statistics the K models kept), the whole validation split scored, and
the average written as a checkpoint directory of its own when it beats the single best.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from workers.checkpoint.load import load_metadata, load_weights
from workers.checkpoint.snapshot import Snapshot
from workers.checkpoint.writer import write_checkpoint
from workers.contract.config import RunConfig
from workers.decisions.averaging import average_weights, average_wins
from workers.loop.batches import Batches
from workers.loop.devices import to_device
from workers.loop.learner import build_workload
from workers.loop.loaders import split_collate
from workers.loop.precision import autocast
from workers.loop.ray_data import StreamedEval, is_ray_dataset, only_named_columns
from workers.loop.scoring import evaluate_workload


class _Forward(torch.nn.Module):
    """The workload's model called as training calls it (``Batches.forward``), for
    ``update_bn``, which calls ``model(input)`` and finds the BatchNorm layers in
    ``model.modules()`` (the wrapped model's are among them)."""

    def __init__(self, model: torch.nn.Module, batches: Batches, device: torch.device,
                 precision: str) -> None:
        super().__init__()
        self.model, self.batches = model, batches
        self.device, self.precision = device, precision

    def forward(self, inputs: Any) -> Any:
        with autocast(self.device, self.precision):
            return self.batches.forward(self.model, inputs)


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def recompute_batch_norm(cfg: RunConfig, workload: Any, device: torch.device) -> bool:
    """BatchNorm's running statistics of the model's weights, from one pass (in order, no
    gradients) over the whole training split; False when the model has no BatchNorm."""
    model = workload.model
    if not has_batch_norm(model):
        return False
    batches, collate = Batches.of(workload), split_collate(workload, "train")
    dataset = workload.train_dataset
    loader: Any = (StreamedEval(only_named_columns(workload, dataset), collate,
                                cfg.train.batch_size) if is_ray_dataset(dataset) else
                   DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=False,
                              collate_fn=collate))

    def inputs() -> Iterator[tuple[Any]]:  # update_bn takes input[0] of a tuple
        for batch in loader:
            yield (to_device(batches.split(batch)[0], device),)

    update_bn(inputs(), _Forward(model, batches, device, cfg.train.precision))
    model.eval()
    return True


def averaged_workload(cfg: RunConfig, directories: list[str | Path],
                      device: torch.device) -> tuple[Any, bool]:
    """The workload (built as in training) whose model holds the average of the checkpoints'
    weights (the best first), its BatchNorm statistics recomputed; and whether it has any."""
    torch.manual_seed(cfg.seed)
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    workload.model.load_state_dict(average_weights([load_weights(d) for d in directories]))
    workload.model.to(device)
    return workload, recompute_batch_norm(cfg, workload, device)


def _filesystem(target: str) -> tuple[pafs.FileSystem, str]:
    if "://" in target:
        return pafs.FileSystem.from_uri(target)
    return pafs.LocalFileSystem(), os.path.abspath(target)


def write_averaged(workload: Any, best_dir: str | Path, metrics: dict[str, float],
                   averaged_from: list[str], target: str) -> dict[str, Any]:
    """The averaged model as a checkpoint directory (model.safetensors, the sizes and sha256
    of its files in metadata.json, as every checkpoint): the best's metadata, with the
    average's validation metrics. Returns that metadata."""
    metadata: dict[str, Any] = {**load_metadata(best_dir), **metrics, "is_best": True,
                                "saved_because": "average_top_k", "weights": "averaged",
                                "averaged_from": averaged_from}
    for stale in ("top_k_rank", "files", f"{metadata['monitor']}_smoothed"):
        metadata.pop(stale, None)
    weights = {k: v.detach().to("cpu").contiguous()
               for k, v in workload.model.state_dict().items()}
    fs, path = _filesystem(target)
    fs.create_dir(path, recursive=True)
    write_checkpoint(Snapshot(weights, {}, metadata), fs, path)
    return metadata


def average_checkpoints(config: dict[str, Any], checkpoints: list[Any], best_value: float,
                        target: str) -> dict[str, Any]:
    """Ray task body: ``checkpoints`` (ray.train.Checkpoint, the best first) averaged and
    scored on the whole validation split; written to ``target`` when it beats ``best_value``
    (the single best's monitored value). Returns ``metrics`` (the average's on validation),
    ``value`` (its monitored one), ``won``, ``batch_norm`` and, when it won, ``metadata``."""
    cfg = RunConfig.model_validate(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.ExitStack() as stack:
        directories = [stack.enter_context(c.as_directory()) for c in checkpoints]
        workload, batch_norm = averaged_workload(cfg, directories, device)
        metrics = evaluate_workload(cfg, workload, "val", device) or {}
        value = float(metrics.get(cfg.tracker.monitor, float("nan")))
        won = average_wins(value, best_value, cfg.tracker.resolved_mode)
        result: dict[str, Any] = {"metrics": metrics, "value": value, "won": won,
                                  "batch_norm": batch_norm}
        if won:
            result["metadata"] = write_averaged(workload, directories[0], metrics,
                                                [posixpath.basename(str(c.path).rstrip("/"))
                                                 for c in checkpoints], target)
    return result
