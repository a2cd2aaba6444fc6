"""Handwritten digits streamed from Parquet files: each split a Ray Dataset.

On first use the splits are written as Parquet under ``data_dir`` (a local directory or a
pyarrow URI such as ``s3://bucket/digits?endpoint_override=host:port&scheme=http``) from
scikit-learn's bundled copy: no download. Each split is a few files of rows ``pixels`` (64
standardised values) and ``label``; the workload names them with ``feature_columns`` and
``label_column``. Written as plain user code: it needs nothing from this project.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

COMPLETE = "_COMPLETE"  # written last: a directory without it is written again


def build(data_dir: str = "./data/digits-parquet", hidden: int = 64, val_rows: int = 360,
          test_rows: int = 360, files_per_split: int = 4, split_seed: int = 0,
          dropout: float = 0.0) -> SimpleNamespace:
    import ray.data

    filesystem, root = filesystem_of(data_dir)
    tag = f"v{val_rows}-t{test_rows}-f{files_per_split}-s{split_seed}"
    where = f"{root.rstrip('/')}/{tag}"
    if filesystem.get_file_info(f"{where}/{COMPLETE}").type.name == "NotFound":
        write_splits(filesystem, where, val_rows, test_rows, files_per_split, split_seed)

    def split(name: str) -> ray.data.Dataset:
        return ray.data.read_parquet(f"{where}/{name}", filesystem=filesystem)

    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 10))
    return SimpleNamespace(
        model=model, train_dataset=split("train"), val_dataset=split("val"),
        test_dataset=split("test"), loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy", "f1_macro", "mcc"],
        feature_columns=["pixels"], label_column="label",
    )


def filesystem_of(data_dir: str):
    """(pyarrow filesystem, path in it) of a local directory or a URI."""
    import os

    import pyarrow.fs

    if "://" not in data_dir:
        path = os.path.abspath(data_dir)
        os.makedirs(path, exist_ok=True)
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.FileSystem.from_uri(data_dir)


def write_splits(filesystem, where: str, val_rows: int, test_rows: int, files: int,
                 seed: int) -> None:
    """The three splits, standardised with the training split's statistics."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_rows,
                                                      random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=val_rows,
                                                      random_state=seed, stratify=y_rest)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std < 1e-6] = 1.0
    for name, features, labels in (("train", x_train, y_train), ("val", x_val, y_val),
                                   ("test", x_test, y_test)):
        filesystem.create_dir(f"{where}/{name}", recursive=True)
        values = ((features - mean) / std).astype(np.float32)
        for index, rows in enumerate(np.array_split(np.arange(len(labels)), files)):
            pixels = pa.FixedSizeListArray.from_arrays(pa.array(values[rows].reshape(-1)), 64)
            table = pa.table({"pixels": pixels, "label": pa.array(labels[rows], pa.int64())})
            pq.write_table(table, f"{where}/{name}/part-{index:03d}.parquet",
                           filesystem=filesystem)
    with filesystem.open_output_stream(f"{where}/{COMPLETE}") as marker:
        marker.write(b"ok\n")
