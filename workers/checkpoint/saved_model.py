"""Loading a saved model back into the workload's model, in a plain process or a Ray task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from workers.checkpoint.load import load_weights
from workers.contract.config import RunConfig
from workers.contract.workload import build_workload
from workers.loop.batches import Batches
from workers.loop.ray_data import is_ray_dataset, only_named_columns
from workers.loop.steps import (
    evaluate_dataset,
    infer_num_classes,
    split_collate,
    workload_metrics,
)


def load_model(cfg: RunConfig, checkpoint_dir: str | Path) -> tuple[Any, torch.nn.Module]:
    """The workload (built as in training) with its model holding the checkpoint's weights."""
    torch.manual_seed(cfg.seed)
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    workload.model.load_state_dict(load_weights(checkpoint_dir))
    return workload, workload.model


def evaluate_split(
    cfg: RunConfig, checkpoint_dir: str | Path, split: str, device: str | torch.device = "cpu"
) -> dict[str, float] | None:
    """Metrics of one split (train, val, test) for the checkpoint's weights; None if absent."""
    device = torch.device(device)
    workload, model = load_model(cfg, checkpoint_dir)
    learn = (getattr(workload, "extras", None) or {}).get("learner")
    if learn is not None:  # a Learner's splits are its DataLoaders, which make its batches
        from workers.engines.fastai.splits import evaluate_learner_split

        return evaluate_learner_split(learn, split, workload.metrics,
                                      batch_size=cfg.train.batch_size, device=device,
                                      precision=cfg.train.precision)
    dataset = getattr(workload, f"{split}_dataset", None)
    if dataset is None:
        return None
    if is_ray_dataset(dataset):
        dataset = only_named_columns(workload, dataset)
    model.to(device)
    batches = Batches.of(workload)
    metrics = workload_metrics(workload, infer_num_classes(model, workload.train_dataset, device,
                                                           batches,
                                                           split_collate(workload, "train")))
    return evaluate_dataset(model, dataset, batches, metrics, split=split,
                            batch_size=cfg.train.batch_size, device=device,
                            precision=cfg.train.precision,
                            collate=split_collate(workload, split))


def evaluate_checkpoint(config: dict[str, Any], checkpoint: Any, split: str):
    """Ray task body: ``checkpoint`` is a ray.train.Checkpoint (local or remote storage)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with checkpoint.as_directory() as directory:
        return evaluate_split(RunConfig.model_validate(config), directory, split, device)
