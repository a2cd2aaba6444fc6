"""The overfitting test workload (``overfit``) as a plain fastai Learner, for engine fastai."""

from __future__ import annotations

from typing import Any


def build(bs: int = 8, **params: Any):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.metrics import accuracy

    from tests.workloads.overfit import build as build_overfit

    w = build_overfit(**params)
    dsets = [w.train_dataset, w.val_dataset, w.test_dataset]
    dls = DataLoaders.from_dsets(*(d for d in dsets if d is not None), bs=bs, num_workers=0)
    return Learner(dls, w.model, loss_func=w.loss_fn, metrics=[accuracy])
