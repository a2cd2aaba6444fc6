"""A plain Parquet split read by each rank itself: its own rows, straight from the files.

A Ray Dataset split that is ``ray.data.read_parquet(...)`` and nothing more (``columns=`` and
``select_columns`` aside, the workload's named columns included; ``compat.plain_parquet_read``
says what counts) whose columns are numbers or fixed-size lists of numbers is not handed to
Ray Train's ``streaming_split``: the driver reads the files' footers (``parquet_split``) and
each rank reads its own rows with pyarrow (``ParquetFile.iter_batches`` over the row groups
they lie in, through the dataset's own filesystem), in a thread of its own that keeps
``PREFETCH_BATCHES`` batches ahead. No read task, no object store, no row decoded by two
ranks but those of the (at most ``W - 1``) row groups two ranks' ranges share. Any other split
(a transform, a filter, another source, a column of strings) streams through Ray Data as
before (``loop.ray_data``); a workload with ``ray_data_streaming = True`` streams every split
so.

Rows. The split's row groups, in the files' order, form one sequence of ``rows`` rows.

- Training (``ParquetTrain``): each epoch the row groups are put in an order drawn from the
  run's seed and the epoch (the same on every rank), and rank ``r`` reads rows
  ``[r * P, (r + 1) * P)`` of that order, ``P = rows // W``: every rank as many rows, so as many
  optimizer steps; the last ``rows - W * P < W`` rows of the epoch's order are left out. Its
  rows then go through a pool of ``SHUFFLE_BUFFER_ROWS`` rows (at least two batches): each
  batch is drawn at random from the pool, whose drawn slots the next rows fill, seeded by the
  seed, the rank and the epoch. An epoch's batches are the same on a restart; a resume
  mid-epoch reads the epoch again and skips the batches trained before the stop, as
  ``StreamedTrain`` does.
- Validation (``ParquetEval``): rank ``r`` reads rows ``[r * rows // W, (r + 1) * rows // W)``
  in the files' order: each row on exactly one rank, none dropped, none padded.

Batches are as Ray Data's stream makes them: the workload's named columns or every column as
tensors (``ray_data.arrow_numpy``: one copy into the pool, one gather out of it), a
``collate_fn`` the NumPy column dict Ray Data's ``BlockAccessor`` makes of the same rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from workers.contract.user_errors import UserInputError
from workers.loop.ray_data import (
    PREFETCH_BATCHES,
    SHUFFLE_BUFFER_ROWS,
    StreamedEval,
    StreamedTrain,
    arrow_numpy,
    only_named_columns,
)
from workers.loop.runtime import epoch_seed

T = TypeVar("T")
Columns = dict[str, np.ndarray]  # a chunk of rows: column name -> (rows, ...) array
# (file index, row group index, first row, end row) of a row group, rows counted within it
Piece = tuple[int, int, int, int]


@dataclass(frozen=True)
class ParquetSplit:
    """What a rank needs to read its rows of a plain Parquet split (from the driver)."""

    files: tuple[str, ...]
    filesystem: Any  # a pyarrow filesystem (picklable), the dataset's own
    columns: tuple[str, ...]  # read, and handed on in this order
    types: tuple[Any, ...]  # each column's Arrow type
    row_groups: tuple[tuple[int, ...], ...]  # rows in each row group of each file

    @property
    def rows(self) -> int:
        return sum(sum(groups) for groups in self.row_groups)


def numeric_type(kind: Any) -> bool:
    """A number, or a fixed-size list of numbers (nested for more dimensions)."""
    import pyarrow as pa

    while pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def parquet_split(workload: Any, dataset: Any, rows: int) -> ParquetSplit | None:
    """The split's files and row groups when each rank can read its own rows (see the module
    docstring); None when it streams through Ray Data. ``rows``: the dataset's count, which
    the footers must give too. Runs on the driver (it reads every file's footer)."""
    import pyarrow.parquet as pq

    from workers.compat import plain_parquet_read

    if getattr(workload, "ray_data_streaming", False):
        return None
    plain = plain_parquet_read(only_named_columns(workload, dataset))
    if plain is None:
        return None
    try:
        footers = [pq.read_metadata(f, filesystem=plain.filesystem) for f in plain.files]
    except (OSError, ValueError):  # pyarrow's errors are both: Ray Data's stream says what
        return None
    schema = footers[0].schema.to_arrow_schema()
    if any(not f.schema.to_arrow_schema().equals(schema) for f in footers[1:]):
        return None  # Ray Data unifies the files' schemas; this reader does not
    columns = plain.columns or schema.names
    if any(c not in schema.names or not numeric_type(schema.field(c).type) for c in columns):
        return None
    if not all(no_nulls(footer, set(columns)) for footer in footers):
        return None
    groups = tuple(tuple(f.row_group(g).num_rows for g in range(f.num_row_groups))
                   for f in footers)
    split = ParquetSplit(tuple(plain.files), plain.filesystem, tuple(columns),
                         tuple(schema.field(c).type for c in columns), groups)
    return split if split.rows == rows else None


def no_nulls(footer: Any, columns: set[str]) -> bool:
    """Whether the footer's statistics say no column chunk of ``columns`` holds a null."""
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] not in columns:
                continue
            stats = chunk.statistics
            if stats is None or not stats.has_null_count or stats.null_count:
                return False
    return True


def pieces(split: ParquetSplit, order: list[tuple[int, int]], lo: int, hi: int
           ) -> list[Piece]:
    """Rows ``[lo, hi)`` of the row groups laid end to end in ``order``, as pieces of them."""
    found, start = [], 0
    for file, group in order:
        size = split.row_groups[file][group]
        if start < hi and start + size > lo:
            found.append((file, group, max(lo - start, 0), min(hi - start, size)))
        start += size
    return found


def read_pieces(split: ParquetSplit, chosen: list[Piece], batch_size: int, name: str
                ) -> Iterator[Columns]:
    """The pieces' rows, in order, in chunks of at most ``batch_size`` rows: each column an
    array over Arrow's buffers (no copy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    opened: tuple[int, Any] | None = None
    for file, group, first, end in chosen:
        try:
            if opened is None or opened[0] != file:
                opened = (file, pq.ParquetFile(split.files[file], filesystem=split.filesystem))
            at = 0
            for batch in opened[1].iter_batches(batch_size=batch_size, row_groups=[group],
                                                columns=list(split.columns)):
                lo, hi = max(first - at, 0), min(end - at, batch.num_rows)
                at += batch.num_rows
                if hi > lo:
                    yield arrays_of(batch.slice(lo, hi - lo), split, name)
                if at >= end:
                    break
        except (OSError, pa.ArrowException) as exc:  # a damaged or vanished file: say which
            raise OSError(f"workload.{name}_dataset: {split.files[file]} (row group {group}) "
                          f"cannot be read: {type(exc).__name__}: {exc}") from exc


def arrays_of(batch: Any, split: ParquetSplit, name: str) -> Columns:
    columns = {}
    for column in split.columns:
        array = arrow_numpy(batch.column(column))
        if array is None:
            raise UserInputError(
                f"workload.{name}_dataset: column {column!r} holds nulls; give numbers, or add "
                "a transform that fills them (a split with a transform streams through Ray "
                "Data)")
        columns[column] = array
    return columns


def shuffled(chunks: Iterator[Columns], capacity: int, batch_size: int,
             rng: np.random.Generator) -> Iterator[Columns]:
    """Batches drawn at random from a pool of ``capacity`` rows (at least ``batch_size``),
    each drawn batch's slots filled by the next rows of ``chunks``; once they end, the pool's
    rows in a random order. Every row once; each batch a copy."""
    pool: Columns = {}
    size, holes = 0, np.empty(0, dtype=np.int64)  # holes: slots to fill before a draw
    for chunk in chunks:
        rows, at = len(next(iter(chunk.values()))), 0
        if not pool:
            pool = {c: np.empty((capacity, *a.shape[1:]), a.dtype) for c, a in chunk.items()}
        while at < rows:
            if size < capacity:
                take = min(capacity - size, rows - at)
                for c, a in chunk.items():
                    pool[c][size:size + take] = a[at:at + take]
                size += take
            else:
                take = min(len(holes), rows - at)
                for c, a in chunk.items():
                    pool[c][holes[:take]] = a[at:at + take]
                holes = holes[take:]
            at += take
            if size == capacity and not len(holes):
                holes = np.sort(rng.choice(capacity, batch_size, replace=False))
                yield {c: a[holes] for c, a in pool.items()}
    left = np.setdiff1d(np.arange(size), holes)
    rng.shuffle(left)
    for start in range(0, len(left), batch_size):
        yield {c: a[left[start:start + batch_size]] for c, a in pool.items()}


def batched(chunks: Iterator[Columns], batch_size: int) -> Iterator[Columns]:
    """The chunks' rows, in order, in batches of ``batch_size`` (the last may be shorter)."""
    held: list[Columns] = []
    count = 0
    for chunk in chunks:
        held.append(chunk)
        count += len(next(iter(chunk.values())))
        while count >= batch_size:
            joined = {c: np.concatenate([h[c] for h in held]) for c in held[0]}
            yield {c: a[:batch_size] for c, a in joined.items()}
            held, count = [{c: a[batch_size:] for c, a in joined.items()}], count - batch_size
    if count:
        yield {c: np.concatenate([h[c] for h in held]) for c in held[0]}


def to_batch(columns: Columns, split: ParquetSplit, tensors_in: bool) -> dict[str, Any]:
    """A batch's columns as the collate takes them: tensors (``tensors_in``), else the NumPy
    dict Ray Data makes of an Arrow table of the same rows (``BlockAccessor``)."""
    if tensors_in:
        return {c: torch.from_numpy(np.ascontiguousarray(a)) for c, a in columns.items()}
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    table = pa.table({c: arrow_array(columns[c], kind)
                      for c, kind in zip(split.columns, split.types, strict=True)})
    return BlockAccessor.for_block(table).to_batch_format("numpy")


def arrow_array(values: np.ndarray, kind: Any) -> Any:
    """``values`` (rows, ...) as an Arrow array of ``kind`` (fixed-size lists nested as its
    dimensions), over the same buffer."""
    import pyarrow as pa

    if not pa.types.is_fixed_size_list(kind):
        return pa.array(np.ascontiguousarray(values), type=kind)
    inner = arrow_array(values.reshape(-1, *values.shape[2:]), kind.value_type)
    return pa.FixedSizeListArray.from_arrays(inner, kind.list_size)


def prefetched(produce: Callable[[], Iterator[T]], depth: int) -> Iterator[T]:
    """``produce()``'s items, made ``depth`` ahead by a thread (pyarrow's reads and NumPy's
    copies let go of the GIL); its error is raised here. Stopping early stops the thread."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put((kind, item), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce():
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put("error", exc)

    thread = threading.Thread(target=run, name="parquet-rows", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class ParquetTrain(StreamedTrain):
    """A rank's rows of a plain Parquet training split (the module docstring says which), as
    ``StreamedTrain`` is used: the same steps, positions and resume."""

    def __init__(self, split: ParquetSplit, collate: Callable[[dict[str, Any]], Any], *,
                 batch_size: int, rank: int, world_size: int, seed: int, name: str = "train"
                 ) -> None:
        super().__init__(None, collate, rows=split.rows, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self.split, self.name = split, name

    def order(self) -> list[tuple[int, int]]:
        """This epoch's order of the row groups: the same on every rank."""
        groups = [(f, g) for f, sizes in enumerate(self.split.row_groups)
                  for g, size in enumerate(sizes) if size]
        rng = np.random.default_rng([epoch_seed(self.seed, 0, self.epoch), 0])
        return [groups[i] for i in rng.permutation(len(groups))]

    def my_pieces(self) -> list[Piece]:
        lo = self.rank * self.per_rank
        return pieces(self.split, self.order(), lo, lo + self.per_rank)

    def __iter__(self) -> Iterator[Any]:
        skip, left = self._skipped(), len(self)
        capacity = max(SHUFFLE_BUFFER_ROWS, 2 * self.batch_size)
        rng = np.random.default_rng([epoch_seed(self.seed, self.rank, self.epoch), 1])
        tensors_in = getattr(self.collate, "tensors_in", False)

        def produce() -> Iterator[Any]:
            chunks = read_pieces(self.split, self.my_pieces(), self.batch_size, self.name)
            for index, batch in enumerate(shuffled(chunks, capacity, self.batch_size, rng)):
                if index >= skip + left:
                    return
                if index >= skip:
                    yield self.collate(to_batch(batch, self.split, tensors_in))

        return prefetched(produce, PREFETCH_BATCHES)


class ParquetEval(StreamedEval):
    """A rank's rows of a plain Parquet validation or test split, in order, each row once."""

    def __init__(self, split: ParquetSplit, collate: Callable[[dict[str, Any]], Any],
                 batch_size: int, *, rank: int, world_size: int, name: str = "val") -> None:
        super().__init__(None, collate, batch_size)
        self.split, self.rank, self.world_size, self.name = split, rank, world_size, name

    def my_pieces(self) -> list[Piece]:
        order = [(f, g) for f, sizes in enumerate(self.split.row_groups) for g in range(len(sizes))]
        rows, w, r = self.split.rows, self.world_size, self.rank
        return pieces(self.split, order, r * rows // w, (r + 1) * rows // w)

    def __iter__(self) -> Iterator[Any]:
        tensors_in = getattr(self.collate, "tensors_in", False)

        def produce() -> Iterator[Any]:
            chunks = read_pieces(self.split, self.my_pieces(), self.batch_size, self.name)
            for batch in batched(chunks, self.batch_size):
                yield self.collate(to_batch(batch, self.split, tensors_in))

        return prefetched(produce, PREFETCH_BATCHES)


def train_stream(ray_datasets: dict[str, Any], collate: Callable[[dict[str, Any]], Any], *,
                 batch_size: int, rank: int, world_size: int, seed: int) -> StreamedTrain:
    """This rank's training stream: its own rows of a plain Parquet split, else its Ray Train
    shard (``ray.train.get_dataset_shard``)."""
    split = ray_datasets.get("parquet", {}).get("train")
    if split is not None:
        return ParquetTrain(split, collate, batch_size=batch_size, rank=rank,
                            world_size=world_size, seed=seed)
    import ray.train

    return StreamedTrain(ray.train.get_dataset_shard("train"), collate,
                         rows=ray_datasets["rows"]["train"], batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)


def eval_stream(ray_datasets: dict[str, Any], split_name: str,
                collate: Callable[[dict[str, Any]], Any], *, batch_size: int, rank: int,
                world_size: int) -> StreamedEval:
    """This rank's share of an evaluated split, as ``train_stream`` chooses."""
    split = ray_datasets.get("parquet", {}).get(split_name)
    if split is not None:
        return ParquetEval(split, collate, batch_size, rank=rank, world_size=world_size,
                           name=split_name)
    import ray.train

    return StreamedEval(ray.train.get_dataset_shard(split_name), collate, batch_size)

