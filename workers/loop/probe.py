"""What a run will report, learned before any of its workers start: its workload built once,
as every rank builds it, on a Ray worker like theirs (where its data and imports live)."""

from __future__ import annotations

import random
from typing import Any

import torch

from workers.contract.config import RunConfig
from workers.contract.workload import build_workload
from workers.loop.batches import Batches
from workers.loop.reporter import epoch_metric_names, require_monitor
from workers.loop.steps import infer_num_classes, split_collate, workload_metrics


def reported_metrics(config: dict[str, Any]) -> list[str]:
    """The validation-time metric names a run of ``config`` reports each epoch."""
    cfg = RunConfig.model_validate(config)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    learner = getattr(workload, "extras", {}).get("learner") if cfg.engine == "fastai" else None
    if learner is not None:
        metrics = workload.metrics  # the Learner's own, as mergeable sums
    else:
        num_classes = infer_num_classes(workload.model, workload.train_dataset,
                                        torch.device("cpu"), Batches.of(workload),
                                        split_collate(workload, "train"))
        metrics = workload_metrics(workload, num_classes)
    return epoch_metric_names(metrics)


def check_monitor(config: dict[str, Any]) -> None:
    """``MonitorNotReportedError`` (a user error) when the run would not report its monitor.
    A workload's own loop reports what it likes: its first report is checked instead."""
    cfg = RunConfig.model_validate(config)
    if cfg.engine != "loop":
        require_monitor(cfg.tracker.monitor, reported_metrics(config))
