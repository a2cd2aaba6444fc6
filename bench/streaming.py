"""The benchmark's data set, as a Ray Dataset from Parquet (read by each worker itself, the
project's path for a plain ``read_parquet`` split; streamed through Ray Data as the project
streamed it before that, ``ray_data_streaming``; or as it streamed before issue 42), as the
same rows held in memory by every worker (a map-style ``TensorDataset``), or read by a plain
pyarrow loop in a torch ``IterableDataset`` (the loop a user writes by hand):
``bench.ray_data`` runs them side by side.

``write(path, rows, features)``: float32 rows in Parquet files of 8,192 rows, labels from a
fixed linear rule (the same for every split), so that a linear model learns something.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROWS_PER_FILE = 8192
MODES = ("map", "stream-before", "stream-ray", "stream", "stream-half-cpu-reads",
         "pyarrow")
# Modes that stream through Ray Data (``workload.ray_data_streaming``), not the ranks' reads
RAY_DATA_MODES = ("stream-before", "stream-ray", "stream-half-cpu-reads")


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
                                          torch.from_numpy(table.column("y").to_numpy().copy()))


class ParquetRows(torch.utils.data.IterableDataset):
    """The hand-written anchor: each file read batch by batch with pyarrow
    (``ParquetFile.iter_batches``), rows as tensors over the batch (``torch.from_numpy``)."""

    def __init__(self, path: str) -> None:
        self.files = sorted(str(p) for p in Path(path).glob("*.parquet"))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import pyarrow.parquet as pq

        for file in self.files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
                column = batch.column("x")
                x = column.flatten().to_numpy().reshape(len(batch), column.type.list_size)
                yield from zip(torch.from_numpy(x.copy()),
                               torch.from_numpy(batch.column("y").to_numpy()), strict=True)


def before_iter_batches(dataset: Any, collate: Any, batch_size: int, **shuffle: Any) -> Any:
    """``workers.loop.ray_data.iter_batches`` as it was before issue 42 (commit 6a14921):
    Ray Data's own conversion of the columns to tensors, prefetching 2 batches."""
    from workers.loop import ray_data

    options = {"batch_size": batch_size, "device": "cpu", "prefetch_batches": 2, **shuffle}
    if getattr(collate, "tensors_in", False):
        return (collate(batch) for batch in dataset.iter_torch_batches(**options))
    return iter(dataset.iter_torch_batches(collate_fn=ray_data.ray_collate(collate), **options))


_CURRENT: dict[str, Any] = {}


def select_feed(before: bool) -> None:
    """The stream as before issue 42 (Ray Data's default blocks, its own conversion), or as
    now: the functions swapped in this process (the driver's, and each worker's, which builds
    the workload before it makes its loaders)."""
    import sys

    from workers.loop import ray_data

    driver = sys.modules.get("orchestrator.training.datasets")
    if not _CURRENT:
        _CURRENT.update(iter_batches=ray_data.iter_batches, for_streaming=ray_data.for_streaming)
    ray_data.iter_batches = before_iter_batches if before else _CURRENT["iter_batches"]
    if driver is not None:
        driver.for_streaming = (ray_data.only_named_columns if before  # type: ignore[attr-defined]
                                else _CURRENT["for_streaming"])


def build(train_dir: str, val_dir: str, mode: str = "stream", features: int = 1024):
    if mode.startswith("stream"):
        import ray.data

        select_feed(before=mode == "stream-before")
        # stream-half-cpu-reads: read tasks of half a CPU, so that two read while the workers
        # (half a CPU each) wait on data; a workload's own setting
        reads = {"ray_remote_args": {"num_cpus": 0.5}} if mode.endswith("cpu-reads") else {}
        train = ray.data.read_parquet(train_dir, **reads)
        val = ray.data.read_parquet(val_dir, **reads)
    elif mode == "pyarrow":
        train, val = ParquetRows(train_dir), ParquetRows(val_dir)
    else:
        train, val = in_memory(train_dir), in_memory(val_dir)
    return SimpleNamespace(model=torch.nn.Linear(features, 2), train_dataset=train,
                           val_dataset=val, loss_fn=torch.nn.functional.cross_entropy,
                           feature_columns=["x"], label_column="y",
                           ray_data_streaming=mode in RAY_DATA_MODES)
