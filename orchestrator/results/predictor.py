"""The actor side of ``orchestrator predict``: a batch of rows through the best model.

``Predictor`` is the callable class Ray Data's ``map_batches`` runs in each actor of the pool:
it loads the model once (``orchestrator.api.load_checkpoint``, ``load_best``'s own loading),
then turns each batch of rows into the model's inputs as the workload's training batches are
made, and returns a table of the rows' ids, their logits and, for a classifier, the predicted
class. The driver runs the same ``predict_batch`` on the first rows before the job starts, so
that a batch the model cannot take is one line, with nothing written.

Rows become inputs, in the order ``workers/loop/ray_data.py`` uses for training: the
workload's ``feature_columns`` (one column as it is, several flattened side by side, (B, F);
``label_column`` is not needed), else its ``collate_fn`` (column arrays in), else every column
as a tensor (a mapping: ``model(**columns)``). A map-style split's rows are its indices: the
samples are collated by the workload's ``collate_fn`` (or PyTorch's default), as its loaders do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from workers.contract.user_errors import UserInputError
from workers.loop.batches import Batches, blamed_on, logits_of
from workers.loop.devices import to_device
from workers.loop.loaders import collate_of
from workers.loop.precision import as_float32, autocast
from workers.loop.ray_data import as_tensor, named_columns, rows_collate

ROW_ID = "row_id"  # the id column added where the input has none: the row's position
LOGITS = "logits"  # (B, C) as a fixed-size list of float32
PREDICTED = "predicted"  # argmax of the logits (a single logit: > 0), classifiers only


@dataclass(frozen=True)
class Source:
    """Where a job's rows come from. ``kind``: ``rows`` (Parquet rows, or a Ray Dataset split's
    rows) or ``indices`` (a map-style split: each row is an index into it). ``field``: how an
    error names the input (``--data``, ``workload.val_dataset``)."""

    kind: str
    split: str | None  # the workload's split (--split); None for --data
    id_column: str
    field: str


def features_of(columns: Mapping[str, Any], features: list[str], field: str) -> torch.Tensor:
    """``feature_columns``' tensor, as ``ray_data.columns_collate`` makes the training input."""
    tensors = []
    for name in features:
        if name not in columns:
            raise UserInputError(
                f"{field}: no column {name!r}, which the model reads (workload.feature_columns;"
                f" its columns: {', '.join(columns) or 'none'})")
        try:
            tensors.append(as_tensor(dict(columns), name, "predict"))
        except UserInputError as exc:  # its message names a training split: name ours
            raise UserInputError(f"{field}: {str(exc).partition(': ')[2]}") from None
    if len(tensors) == 1:
        return tensors[0]
    return torch.cat([t.reshape(t.shape[0], -1).float() for t in tensors], dim=1)


def model_inputs(workload: Any, source: Source, batch: Mapping[str, np.ndarray]) -> Any:
    """A batch of rows (column arrays, the id column among them) as the model's inputs."""
    if source.kind == "indices":
        dataset = getattr(workload, f"{source.split}_dataset")
        with blamed_on(f"{source.field}: its samples cannot be read or collated"):
            made = collate_of(workload)([dataset[int(i)] for i in batch[source.id_column]])
    else:
        columns = {k: v for k, v in batch.items() if k != source.id_column}
        named = named_columns(workload)
        if named:
            return features_of(columns, named[0], source.field)
        made = rows_collate(workload, source.split or "predict")(columns)
    batches = Batches.of(workload)
    if isinstance(made, Mapping) and batches.label_key not in made:
        return dict(made)  # rows without their labels: all of it is input
    return batches.split(made)[0]


def output_table(ids: np.ndarray, logits: torch.Tensor, classification: bool,
                 id_column: str) -> pa.Table:
    """The rows' ids, their logits (B, C) and, for a classifier, the predicted class."""
    flat = logits.detach().float().cpu().reshape(len(ids), -1)  # (B, C); one output: (B, 1)
    values = pa.array(flat.numpy().reshape(-1), pa.float32())
    columns: dict[str, Any] = {
        id_column: pa.array(ids),
        LOGITS: pa.FixedSizeListArray.from_arrays(values, flat.shape[1]),
    }
    if classification:
        classes = flat.argmax(dim=1) if flat.shape[1] > 1 else (flat[:, 0] > 0).long()
        columns[PREDICTED] = pa.array(classes.numpy().astype(np.int64))
    return pa.table(columns)


def predict_batch(model: torch.nn.Module, workload: Any, source: Source,
                  batch: Mapping[str, np.ndarray], *, classification: bool,
                  device: torch.device, precision: str) -> pa.Table:
    """One batch of rows through the model (in eval mode), as an output table."""
    inputs = model_inputs(workload, source, batch)
    with blamed_on(f"workload.model: it fails on a batch of {source.field}'s rows"):
        with torch.inference_mode(), autocast(device, precision):
            output = Batches.forward(model, to_device(inputs, device))
        logits = as_float32(logits_of(output))
    return output_table(np.asarray(batch[source.id_column]), logits, classification,
                        source.id_column)


class Predictor:
    """Ray Data's callable class: one model load per actor, then a table per batch.
    ``progress``: an actor counting the rows done, for the driver's bar (None: no bar)."""

    def __init__(self, checkpoint: str, source: Source, classification: bool,
                 use_gpu: bool = False, progress: Any = None) -> None:
        from orchestrator.api import load_checkpoint

        loaded = load_checkpoint(checkpoint)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = loaded.model.to(self.device).eval()
        self.workload, self.source = loaded.workload, source
        self.classification = classification
        self.precision = loaded.metadata["config"].get("train", {}).get("precision", "fp32")
        self.progress = progress

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        table = predict_batch(self.model, self.workload, self.source, batch,
                              classification=self.classification, device=self.device,
                              precision=self.precision)
        if self.progress is not None:
            self.progress.add.remote(table.num_rows)
        return table


def read_pieces(pieces: dict[str, np.ndarray], *, filesystem: Any, columns: list[str] | None,
                add_ids: bool, rows: int) -> Iterator[pa.Table]:
    """Ray Data's read of ``--data``: each piece (a file's row group, and the position of its
    first row in the input) read by pyarrow in tables of ``rows`` rows, only ``columns``
    (None: all), each row's position added as ``row_id`` when ``add_ids``."""
    import pyarrow.parquet as pq

    for path, group, start in zip(pieces["path"], pieces["row_group"], pieces["start"],
                                  strict=True):
        position = int(start)
        parquet = pq.ParquetFile(str(path), filesystem=filesystem)
        for record_batch in parquet.iter_batches(batch_size=rows, row_groups=[int(group)],
                                                 columns=columns):
            table = pa.Table.from_batches([record_batch])
            if add_ids:
                ids = np.arange(position, position + table.num_rows, dtype=np.int64)
                table = table.append_column(ROW_ID, pa.array(ids))
            position += table.num_rows
            yield table
