"""A fastai ``Learner`` as the project's workload (no Ray here, fastai imported only once a
``build`` has returned a Learner, so it already is).

``build_workload`` is how every caller builds a workload: each rank (``runtime``), the driver's
inspection, the tune probe, a saved model scored. A Learner's model, DataLoaders' datasets
(a third loader is the test split, fastai's ``ds_idx=2``) and ``loss_func`` are used; its
metrics must be per-sample averages (fastai's ``AvgMetric``: ``accuracy``, ``error_rate``, any
plain function) or torchmetrics metrics, whose global value is exact from per-rank sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from workers.contract.protocol import Workload, WorkloadError
from workers.contract.workload import as_workload, call_build, is_fastai_learner
from workers.evaluation.metrics import MeanLoss, TorchMetric, is_torchmetric, snake_case

if TYPE_CHECKING:
    from fastai.learner import AvgMetric, Learner


def build_workload(entrypoint: str, params: dict[str, Any]) -> Any:
    """The workload; a fastai Learner is presented as one (``extras["learner"]`` holds it)."""
    built = call_build(entrypoint, params)
    if is_fastai_learner(built):
        built = learner_workload(built)
    return as_workload(built, entrypoint)


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
    from fastai.learner import AvgMetric

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
