"""What a run will report, learned before any of its workers start: its workload built once,
as every rank builds it, on a Ray worker like theirs (where its data and imports live), and
(``engine: torch``) its first batch through the model and the loss as the loop checks it, so
a search finds such a mistake before it touches any directory."""

from __future__ import annotations

import random
from typing import Any

import torch

from workers.contract.config import RunConfig
from workers.contract.user_errors import UserInputError
from workers.decisions.tracker import require_monitor
from workers.evaluation.metrics import epoch_metric_names, spec_directions
from workers.loop.batches import Batches, check_first_batch
from workers.loop.devices import model_device, to_device
from workers.loop.learner import build_workload
from workers.loop.loaders import first_batch, split_collate, split_of
from workers.loop.metric_setup import classes_from, infer_num_classes, workload_metrics
from workers.loop.ray_data import streamed_splits


def built(cfg: RunConfig) -> Any:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return build_workload(cfg.workload.entrypoint, cfg.workload.params)


def reported_metrics(cfg: RunConfig, workload: Any) -> list[str]:
    """The validation-time metric names a run of ``cfg`` reports each epoch."""
    learner = getattr(workload, "extras", {}).get("learner") if cfg.engine == "fastai" else None
    if learner is not None:
        metrics = workload.metrics  # the Learner's own, as mergeable sums
    elif cfg.engine == "torch":  # its first batch as the torch loop checks it: the loss too
        batches = Batches.of(workload)
        batch = first_batch(workload.train_dataset, split_collate(workload, "train"))
        split_of(batches, batch, "train")  # a batch of the wrong shape: blamed on the split
        logits, target = check_first_batch(workload.model, batches, batch,
                                           model_device(workload.model), to_device)
        metrics = workload_metrics(workload, classes_from(logits, target))
    else:
        num_classes = infer_num_classes(workload.model, workload.train_dataset,
                                        torch.device("cpu"), Batches.of(workload),
                                        split_collate(workload, "train"))
        metrics = workload_metrics(workload, num_classes)
    return epoch_metric_names(metrics)


def check_monitor(config: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """``MonitorNotReportedError`` (a user error) when the run would not report its monitor;
    else the directions its metric objects declare, by reported name
    (``metrics.spec_directions``), for the driver to resolve ``tracker.mode`` and each
    ``tracker.also_monitor``'s mode. A workload's own loop reports what it likes: its first
    report is checked instead."""
    cfg = RunConfig.model_validate(config)
    return monitor_directions(cfg, built(cfg))


def check_search(config: dict[str, Any]) -> tuple[dict[str, tuple[bool, str]], bool]:
    """``check_monitor``'s verdict for a search's trials, and whether the workload has Ray
    Dataset splits (its trials then train under Ray Train, which shards them), from one
    build of the workload."""
    declared, streamed, _ = search_facts(config)
    return declared, streamed


def search_facts(config: dict[str, Any]
                 ) -> tuple[dict[str, tuple[bool, str]], bool, dict[str, Any]]:
    """``check_search``'s two answers and the data's fingerprint (``loop.provenance``), from
    the same build of the workload: the search's provenance."""
    from workers.loop.provenance import data_fingerprint

    cfg = RunConfig.model_validate(config)
    workload = built(cfg)
    return (monitor_directions(cfg, workload), bool(streamed_splits(workload)),
            data_fingerprint(workload))


def monitor_directions(cfg: RunConfig, workload: Any) -> dict[str, tuple[bool, str]]:
    if cfg.engine != "loop":
        require_monitor(cfg.tracker.monitor, reported_metrics(cfg, workload))
    if cfg.engine == "fastai":  # a Learner's metrics declare no direction
        return {}
    try:
        declared = spec_directions(getattr(workload, "metrics", None))
    except ValueError as exc:
        raise UserInputError(f"workload.{exc}") from None
    return {f"val_{name}": d for name, d in declared.items()}
