"""fastai ``Learner`` <-> the project's workload protocol (no Ray here).

For ``engine: fastai`` a workload's ``build(**params)`` may return either

- a fastai ``Learner``: its model, DataLoaders (train, valid and, if present, a third one for
  the test split, fastai's ``ds_idx=2``), ``loss_func``, ``opt_func`` and ``metrics`` are used;
  its metrics must be per-sample averages (fastai's ``AvgMetric``: ``accuracy``,
  ``error_rate``, any plain function), whose global value is exact from per-rank sums; or
- the standard workload (model, datasets, ``loss_fn``, ``metrics``), from which
  ``learner_from_workload`` builds a Learner with the run's optimizer settings.

``learner_workload`` presents a Learner as a standard workload, so that loading a checkpoint and
evaluating a split (``workers.checkpoint.saved_model``) work for both; a Learner's split is
scored through its own DataLoader (``workers.engines.fastai.splits``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from fastai.data.core import DataLoaders
from fastai.learner import AvgMetric, Learner, Metric
from fastai.optimizer import SGD, Adam

from workers.contract.config import RunConfig
from workers.contract.protocol import Workload, WorkloadError
from workers.decisions.metrics import MeanLoss, TorchMetric, is_torchmetric, snake_case


class AvgMetricStats(MeanLoss):
    """A fastai ``AvgMetric`` as the project's mergeable metric: (sum of value * n, n), the
    same sufficient statistics as a mean loss.

    fastai averages ``func(pred, *targets)`` over a split weighting each batch by its size;
    summing the same two numbers across ranks gives exactly the single-process value.
    """

    def __init__(self, metric: AvgMetric) -> None:
        self.func = metric.func
        self.name = metric.name
        super().__init__()

    def update(self, output: torch.Tensor, *targets: torch.Tensor) -> None:
        self.add_batch(float(self.func(output.detach(), *targets)), len(targets[0]))


def mergeable_metrics(learn: Learner) -> list[AvgMetricStats | TorchMetric]:
    """The Learner's metrics as project metrics; a metric that is not a per-sample average
    (an ``AccumMetric`` such as F1 or ROC AUC) cannot be merged from per-rank sums. A
    torchmetrics metric (fastai wraps it as an ``AvgMetric``) is taken whole: exact."""
    out: list[AvgMetricStats | TorchMetric] = []
    for metric in learn.metrics:
        func = getattr(metric, "func", None)
        if is_torchmetric(func):
            out.append(TorchMetric(snake_case(type(func).__name__), func))
            continue
        if not isinstance(metric, AvgMetric):
            raise WorkloadError(
                f"workload: the Learner's metric {metric.name!r} ({type(metric).__name__}) is "
                "not a per-sample average, so its value over the whole validation set cannot "
                "be computed exactly from per-rank sums; use AvgMetric-style metrics (accuracy, "
                "error_rate, a function of (pred, target)), a torchmetrics metric (such as "
                "MulticlassAUROC), or return the standard workload with metrics: [accuracy, "
                "f1_macro, mcc]"
            )
        out.append(AvgMetricStats(metric))
    return out


def learner_workload(learn: Learner) -> Workload:
    """A Learner seen as a workload: its model and loss, its DataLoaders' datasets."""
    loaders = learn.dls.loaders
    return Workload(
        model=learn.model,
        train_dataset=learn.dls.train_ds,
        val_dataset=learn.dls.valid_ds,
        test_dataset=loaders[2].dataset if len(loaders) > 2 else None,
        loss_fn=learn.loss_func,
        metrics=mergeable_metrics(learn),
        extras={"learner": learn},
    )


class MetricColumn(Metric):
    """A Recorder column for a metric computed globally elsewhere: the engine writes the value
    into the Recorder's row each epoch, so fastai's per-rank pass computes nothing here."""

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def value(self) -> float:
        return float("nan")


def optimizer_func(cfg: RunConfig) -> Any:
    """fastai's optimizers for ``train.optimizer``; weight decay as torch's (L2) for adam and
    sgd, decoupled for adamw."""
    return {
        "adam": partial(Adam, decouple_wd=False),
        "adamw": partial(Adam, decouple_wd=True),
        "sgd": partial(SGD, mom=0.9, decouple_wd=False),
    }[cfg.train.optimizer]


def learner_from_workload(workload: Any, cfg: RunConfig) -> Learner:
    """fastai's defaults otherwise (shuffled train batches, the last partial one dropped)."""
    # num_workers=0: fastai would start loader processes every epoch for in-memory data.
    dls = DataLoaders.from_dsets(workload.train_dataset, workload.val_dataset,
                                 bs=cfg.train.batch_size, num_workers=0)
    return Learner(dls, workload.model, loss_func=workload.loss_fn, opt_func=optimizer_func(cfg),
                   lr=cfg.train.lr, wd=cfg.train.weight_decay)
