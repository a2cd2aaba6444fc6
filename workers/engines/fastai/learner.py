"""fastai ``Learner`` <-> the project's workload protocol (no Ray here).

For ``engine: fastai`` a workload's ``build(**params)`` may return either

- a fastai ``Learner``: its model, DataLoaders (train, valid and, if present, a third one for
  the test split, fastai's ``ds_idx=2``), ``loss_func``, ``opt_func`` and ``metrics`` are used;
  its metrics must be per-sample averages (fastai's ``AvgMetric``: ``accuracy``,
  ``error_rate``, any plain function), whose global value is exact from per-rank sums; or
- the standard workload (model, datasets, ``loss_fn``, ``metrics``), from which
  ``learner_from_workload`` builds a Learner with the run's optimizer settings.

A Learner is presented as a standard workload by ``workers.loop.learner`` (every caller builds
through it); a Learner's split is scored through its own DataLoader.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fastai.data.core import DataLoaders
from fastai.learner import Learner, Metric
from fastai.optimizer import SGD, Adam

from workers.contract.config import RunConfig


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
