"""Ray Datasets as a workload's splits: streamed to the workers, sharded by Ray Train.

A training or validation split that is a plain ``ray.data.read_parquet(...)`` of numbers and
fixed-size lists of numbers (no transform) is read by each worker itself, straight from the
files (``workers/loop/parquet_shards.py``: the same batches, steps, shares and resume as
below, without Ray Data's read tasks and object store). Every other Ray Dataset split, and
every split of a workload that sets ``ray_data_streaming = True``, goes as follows.

The driver builds the workload once (as every worker builds it) and hands each such split to
``TorchTrainer(datasets=...)`` (``orchestrator/training/datasets.py``), with
``workers.compat.split_data_config``:

- ``train``: ``streaming_split(W, equal=True)`` in the dataset's own order (Ray Data's
  ``preserve_order``): every rank gets ``rows // W`` rows, so every rank makes as many
  optimizer steps (DDP and FSDP need that); at most ``W - 1`` rows of an epoch, the last ones,
  are left out. Each epoch is reshuffled on every rank by a local buffer
  (``iter_torch_batches(local_shuffle_buffer_size=...)``) seeded by the run's seed, the rank and
  the epoch, so an epoch's batches are the same on a restart: a resume mid-epoch reads the
  epoch again up to where it stopped and goes on from there.
- ``val`` and ``test``: ``equal=False``: each row goes to exactly one worker, none dropped,
  none padded, so the sufficient statistics summed over the workers are those of the whole
  split, whatever its row count.

Rows become batches through, in this order: the workload's ``feature_columns`` and
``label_column`` (``(features, label)``), its ``collate_fn`` (a dict of column arrays in, as
Ray Data's ``iter_torch_batches`` gives it), else every column as a tensor (a mapping batch,
whose target is the ``labels`` column). Splits are read in blocks of ``STREAM_BLOCK_BYTES``
(``for_streaming``), and columns of numbers or fixed-size lists become tensors straight from
Ray Data's Arrow batches (``arrow_collate``): ``bench/ray_data.py --profile`` times each stage.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from workers.contract.user_errors import UserInputError
from workers.loop.batches import blamed_on
from workers.loop.runtime import epoch_seed

SPLITS = ("train", "val", "test")
# Rows in each rank's shuffle buffer (at least two batches): how far apart two rows of the
# stream can land. Memory: this many rows per worker.
SHUFFLE_BUFFER_ROWS = 2048
PREFETCH_BATCHES = 2
# Ray Data's largest block in bytes (``DataContext.target_max_block_size``) for the splits
# handed to Ray Train, unless the workload set its own. Ray 2.60's Parquet reader packs rows up
# to Ray's default, 128 MB: 512 MB of Parquet became 6 blocks of 96 MB, each over a third of a
# 256 MB object store, so the read tasks waited on the store and a worker held a whole one.
# Measured in docs/benchmarks.md (Ray Data streaming): a streamed epoch 1.7-2.9x faster.
STREAM_BLOCK_BYTES = 16 * 2**20


def is_ray_dataset(obj: Any) -> bool:
    """Without importing Ray Data: a Dataset exists only if its module was imported."""
    module = sys.modules.get("ray.data")
    return module is not None and isinstance(obj, module.Dataset)


def streamed_splits(workload: Any) -> dict[str, Any]:
    """The workload's splits that are Ray Datasets, by split name."""
    found = {split: getattr(workload, f"{split}_dataset", None) for split in SPLITS}
    return {split: ds for split, ds in found.items() if is_ray_dataset(ds)}


def engine_refuses(engine: str, datasets: dict[str, Any]) -> UserInputError:
    """The error for an engine that trains map-style datasets only, given Ray Datasets."""
    names = ", ".join(f"workload.{split}_dataset" for split in datasets)
    kind = "is a Ray Dataset" if len(datasets) == 1 else "are Ray Datasets"
    return UserInputError(f"engine: {engine} trains map-style datasets, and {names} {kind}; "
                          "use engine: torch, which streams them")


def as_tensor(batch: dict[str, Any], column: str, split: str) -> torch.Tensor:
    """One column of a batch of rows as a tensor (float64 as float32, the models' dtype): from
    Ray Data's own tensors while streaming, or from the column arrays of ``take_batch``."""
    if column not in batch:
        raise UserInputError(
            f"workload.{split}_dataset: no column {column!r} (its columns: "
            f"{', '.join(batch) or 'none'}); workload.feature_columns and label_column name "
            "columns every Ray Dataset split has")
    values = batch[column]
    try:
        if isinstance(values, np.ndarray) and values.dtype == object:  # a column of arrays
            values = np.stack([np.asarray(v) for v in values])
        elif isinstance(values, np.ndarray) and not values.flags.writeable:  # Arrow's buffers
            values = np.array(values)
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserInputError(
            f"workload.{split}_dataset: column {column!r} cannot become a tensor "
            f"({type(exc).__name__}: {first[:160]}); give numbers or arrays of numbers, or "
            "a collate_fn that turns it into tensors") from None
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def named_columns(workload: Any) -> tuple[list[str], str] | None:
    """The workload's ``feature_columns`` and ``label_column``, if it names them."""
    features = getattr(workload, "feature_columns", None)
    label = getattr(workload, "label_column", None)
    if not features and not label:
        return None
    if not features or not label:
        raise UserInputError("workload.feature_columns and workload.label_column: give "
                             "both (the model's input columns and the target column)")
    return ([features] if isinstance(features, str) else list(features)), label


def only_named_columns(workload: Any, dataset: Any) -> Any:
    """A Ray Dataset reduced to the columns the workload names (Parquet then reads no other
    column); the whole dataset when it names none."""
    named = named_columns(workload)
    return dataset.select_columns([*named[0], named[1]]) if named else dataset


def for_streaming(workload: Any, dataset: Any) -> Any:
    """A split as it is handed to Ray Train: the named columns only (``only_named_columns``),
    read in blocks of at most ``STREAM_BLOCK_BYTES`` when the workload left Ray's default."""
    from ray.data.context import DEFAULT_TARGET_MAX_BLOCK_SIZE

    dataset = only_named_columns(workload, dataset)
    if dataset.context.target_max_block_size == DEFAULT_TARGET_MAX_BLOCK_SIZE:
        # A deep copy: a plain ``Dataset.copy`` shares the DataContext object, and the workload's
        # own Dataset would be read in small blocks too. ``_deep_copy`` copies the context.
        dataset = dataset.copy(dataset, _deep_copy=True)
        dataset.context.target_max_block_size = STREAM_BLOCK_BYTES
    return dataset


def columns_collate(features: Sequence[str], label: str, split: str
                    ) -> Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
    """``(features, label)``: one feature column as it is, several side by side, (B, F)."""
    def collate(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        columns = [as_tensor(batch, c, split) for c in features]
        if len(columns) == 1:
            x = columns[0]
        else:
            x = torch.cat([c.reshape(c.shape[0], -1).float() for c in columns], dim=1)
        return x, as_tensor(batch, label, split)

    # Ray Data's own conversion of the columns comes first (a flag mypy cannot see on a def)
    collate.tensors_in = True  # type: ignore[attr-defined]
    return collate


def rows_collate(workload: Any, split: str) -> Callable[[dict[str, Any]], Any]:
    """How a batch of a Ray Dataset split's rows becomes a batch: named columns, the
    workload's ``collate_fn`` (column arrays in), or every column as a tensor. The first and
    the last take the tensors Ray Data makes of the columns (``tensors_in``), and the column
    arrays of ``take_batch`` alike."""
    named = named_columns(workload)
    if named:
        return columns_collate(*named, split)
    user = getattr(workload, "collate_fn", None)
    if user is None:
        def every_column(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return {c: as_tensor(batch, c, split) for c in batch}

        every_column.tensors_in = True  # type: ignore[attr-defined]  # as columns_collate's
        return every_column

    def collate(batch: dict[str, np.ndarray]) -> Any:
        with blamed_on(f"workload.collate_fn: it fails on a batch of {split}_dataset's rows "
                       f"(columns {', '.join(batch)})"):
            return user(batch)

    return collate


def ray_collate(fn: Callable[[dict[str, np.ndarray]], Any]) -> Any:
    """``fn`` as ``iter_torch_batches`` takes a collate function (numpy batches in)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> Any:
            return fn(batch)

    return Collate()


def first_rows(dataset: Any, rows: int = 2) -> dict[str, np.ndarray]:
    """The dataset's first rows as column arrays (runs a little of the dataset: on the driver
    or in a task, never on a worker whose CPUs the training holds)."""
    return dataset.take_batch(rows, batch_format="numpy")


def arrow_numpy(column: Any) -> np.ndarray | None:
    """A column of an Arrow batch as one (B, ...) NumPy array over Arrow's buffers (no copy),
    when it holds numbers or fixed-size lists of numbers (nested for more dimensions) and no
    nulls; None for any other column."""
    import pyarrow as pa

    array = column  # a RecordBatch's column; a Table's is chunked
    if isinstance(column, pa.ChunkedArray):
        array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        if array.null_count:
            return None
        shape.append(array.type.list_size)
        array = array.flatten()  # the values of this slice's rows only (``.values``: all)
    if array.null_count or not (pa.types.is_integer(array.type)
                                or pa.types.is_floating(array.type)):
        return None
    return array.to_numpy(zero_copy_only=True).reshape(shape)


def arrow_tensor(column: Any) -> torch.Tensor | None:
    """A column of an Arrow batch as one (B, ...) tensor, in one copy (``arrow_numpy``); None
    for a column that is not numbers or fixed-size lists of them. Ray Data's own conversion
    goes through a NumPy object array of B row arrays, then stacks them."""
    values = arrow_numpy(column)
    # A copy: the Arrow buffers are read-only pages of Ray's object store.
    return None if values is None else torch.from_numpy(values.copy())


def arrow_collate(fn: Callable[[dict[str, Any]], Any]) -> Any:
    """``fn``, which takes a dict of column tensors (``tensors_in``), as ``iter_torch_batches``
    takes a collate over Arrow batches: numeric and fixed-size list columns by
    ``arrow_tensor``, any other column by Ray Data's own ``arrow_batch_to_tensors``."""
    from ray.data.collate_fn import ArrowBatchCollateFn
    from ray.data.util.torch_utils import arrow_batch_to_tensors

    class Collate(ArrowBatchCollateFn):
        def __call__(self, batch: Any) -> Any:
            columns: dict[str, Any] = {}
            for name in batch.column_names:
                tensor = arrow_tensor(batch.column(name))
                if tensor is not None:
                    columns[name] = tensor
            rest = [name for name in batch.column_names if name not in columns]
            if rest:
                columns.update(arrow_batch_to_tensors(batch.select(rest), combine_chunks=True))
            return fn({name: columns[name] for name in batch.column_names})

    return Collate()


def iter_batches(dataset: Any, collate: Callable[[dict[str, np.ndarray]], Any],
                 batch_size: int, **shuffle: Any) -> Iterator[Any]:
    """A Dataset's (or a worker's shard's) batches, on the host (the loops move them to the
    device), made on Ray Data's prefetch thread. Named columns and every-column batches take
    Arrow batches to tensors (``arrow_collate``); a workload's ``collate_fn`` gets NumPy column
    arrays, as Ray Data gives them."""
    options = {"batch_size": batch_size, "device": "cpu", "prefetch_batches": PREFETCH_BATCHES,
               **shuffle}
    if getattr(collate, "tensors_in", False):
        return iter(dataset.iter_torch_batches(collate_fn=arrow_collate(collate), **options))
    return iter(dataset.iter_torch_batches(collate_fn=ray_collate(collate), **options))


class StreamedTrain:
    """A rank's shard of a streamed training split, as the torch loop uses its DataLoader:
    ``len()`` batches this epoch, ``sampler`` (this object) with ``set_epoch(epoch,
    consumed)``, ``batches_per_epoch`` and ``position_after`` as ``loop.stream.EpochSampler``
    has them. ``rows``: the whole split's; ``consumed``: positions of the epoch trained over
    all ranks (a mid-epoch resume skips this rank's share of them)."""

    def __init__(self, shard: Any, collate: Callable[[dict[str, np.ndarray]], Any], *,
                 rows: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.shard, self.collate, self.batch_size = shard, collate, batch_size
        self.per_rank = rows // world_size  # streaming_split(equal=True)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.consumed = 1, 0
        self.sampler = self

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.per_rank / batch_size)

    def _skipped(self) -> int:
        return self.consumed // self.world_size // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch(self.batch_size) - self._skipped()

    def position_after(self, batches: int, batch_size: int) -> int:
        return min(self.per_rank * self.world_size,
                   self.consumed + batches * batch_size * self.world_size)

    def __iter__(self) -> Iterator[Any]:
        buffer = max(SHUFFLE_BUFFER_ROWS, 2 * self.batch_size)
        batches = iter_batches(self.shard, self.collate, self.batch_size,
                               local_shuffle_buffer_size=buffer,
                               local_shuffle_seed=epoch_seed(self.seed, self.rank, self.epoch)
                               % (2**32))
        skip, left = self._skipped(), len(self)
        for index, batch in enumerate(batches):
            if index >= skip + left:
                break  # every rank stops at the same batch: the rows Ray Data left over
            if index >= skip:
                yield batch


class StreamedEval:
    """A rank's shard of a streamed validation or test split, in order, each row once."""

    def __init__(self, shard: Any, collate: Callable[[dict[str, np.ndarray]], Any],
                 batch_size: int) -> None:
        self.shard, self.collate, self.batch_size = shard, collate, batch_size

    def __iter__(self) -> Iterator[Any]:
        return iter_batches(self.shard, self.collate, self.batch_size)


def joined(batches: Any, device: torch.device) -> Iterator[Any]:
    """Under fsdp, where a forward is a collective and no rank knows ahead how many batches
    its stream holds: every rank goes on while any rank has a batch; a rank whose stream ended
    gets None (a padding forward, counted nowhere). One all-reduce per batch."""
    stream = iter(batches)
    while True:
        batch = next(stream, None)
        more = torch.tensor([0 if batch is None else 1], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        yield batch
