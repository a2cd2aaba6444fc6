"""Handwritten digits as a fastai ``Learner``: the built-in workload for ``engine: fastai``.

scikit-learn's bundled digits (no download) with the same split and MLP as ``digits``, in a
plain fastai Learner over ``DataLoaders.from_dsets`` with three loaders (train, valid, test),
so that ``learn.validate(ds_idx=2)`` scores the test split. It is plain fastai, usable without
this project or Ray::

    learn = build()
    learn.fit_one_cycle(10, 1e-2)
"""

from __future__ import annotations

import torch

from workers.workloads._tabular import mlp, split_standardize


def build(
    hidden: int = 64,
    dropout: float = 0.0,
    bs: int = 64,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    path: str = ".",
):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    train, val, test = split_standardize(
        x, y, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed
    )
    # num_workers=0: the data is in memory; loader processes would only add start-up time.
    dls = DataLoaders.from_dsets(train, val, test, bs=bs, num_workers=0, path=path)
    return Learner(dls, mlp(64, hidden, 10, dropout), loss_func=torch.nn.functional.cross_entropy,
                   metrics=[accuracy], lr=1e-2)
