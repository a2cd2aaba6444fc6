"""A fastai tabular Learner with a test split: the third DataLoader, as fastai users add it.

Seeded synthetic rows (three continuous columns, one categorical, a 3-class target), odd split
sizes so that no batch size divides them, ``tabular_learner`` (embeddings and BatchNorm) and
``dls.loaders.append(dls.test_dl(test_df, with_labels=True))``. Plain user code: no imports
of this project. ``test_rows=0``: no third loader (no test split).
"""

from __future__ import annotations

from typing import Any


def frame(rows: int, seed: int):
    """Rows whose class depends on the continuous columns and the category, with noise."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    city = rng.choice(["north", "south", "east", "west"], size=rows)
    shift = pd.Series(city).map({"north": 0.8, "south": -0.8, "east": 0.3, "west": -0.3})
    score = x[:, 0] - 0.7 * x[:, 1] + 0.4 * x[:, 2] ** 2 + shift.to_numpy()
    score += rng.normal(scale=0.6, size=rows)
    label = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "city": city,
                         "label": label})


def build(train_rows: int = 203, valid_rows: int = 101, test_rows: int = 57, bs: int = 16,
          layers: tuple[int, ...] = (24, 12), seed: int = 0, **_: Any):
    from fastai.data.block import CategoryBlock
    from fastai.metrics import accuracy
    from fastai.tabular.core import Categorify, Normalize
    from fastai.tabular.data import TabularDataLoaders
    from fastai.tabular.learner import tabular_learner

    df = frame(train_rows + valid_rows + test_rows, seed)
    rows = train_rows + valid_rows
    train_valid, test_df = df.iloc[:rows].reset_index(drop=True), df.iloc[rows:]
    dls = TabularDataLoaders.from_df(
        train_valid, procs=[Categorify, Normalize], cat_names=["city"],
        cont_names=["a", "b", "c"], y_names="label", y_block=CategoryBlock(),
        valid_idx=list(range(train_rows, rows)), bs=bs, num_workers=0)
    if test_rows:
        dls.loaders.append(dls.test_dl(test_df, with_labels=True))
    return tabular_learner(dls, layers=list(layers), metrics=accuracy)
