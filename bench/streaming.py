"""The benchmark's data set, as a Ray Dataset streamed from Parquet or as the same rows held in
memory by every worker (a map-style ``TensorDataset``): ``bench.ray_data`` runs both.

``write(path, rows, features)``: float32 rows in Parquet files of 8,192 rows, labels from a
fixed linear rule (the same for every split), so that a linear model learns something.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch

ROWS_PER_FILE = 8192


def write(path: str, rows: int, features: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    direction = np.random.default_rng(0).standard_normal(features).astype(np.float32)
    rng = np.random.default_rng(seed)  # the rows: one seed per split, the rule shared
    os.makedirs(path, exist_ok=True)
    for index, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        x = rng.standard_normal((min(ROWS_PER_FILE, rows - start), features), dtype=np.float32)
        y = (x @ direction > 0).astype(np.int64)
        table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)),
                                                                  features),
                          "y": pa.array(y)})
        pq.write_table(table, f"{path}/part-{index:05d}.parquet")


def in_memory(path: str) -> torch.utils.data.TensorDataset:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    features = table.schema.field("x").type.list_size
    x = table.column("x").combine_chunks().values.to_numpy().reshape(-1, features)
    return torch.utils.data.TensorDataset(torch.from_numpy(x.copy()),
                                          torch.from_numpy(table.column("y").to_numpy()))


def build(train_dir: str, val_dir: str, mode: str = "stream", features: int = 1024):
    if mode == "stream":
        import ray.data

        train, val = ray.data.read_parquet(train_dir), ray.data.read_parquet(val_dir)
    else:
        train, val = in_memory(train_dir), in_memory(val_dir)
    return SimpleNamespace(model=torch.nn.Linear(features, 2), train_dataset=train,
                           val_dataset=val, loss_fn=torch.nn.functional.cross_entropy,
                           feature_columns=["x"], label_column="y")
