"""``orchestrator predict``: batch inference with a run's best model, as one Ray Data job.

Parquet rows in (``--data``, a local path or a URI), or the workload's own ``val``/``test``
split (``--split``); ``map_batches`` over a pool of actors, each loading the best model once
(``results/predictor.py``); Parquet out (``--out``): each row's id, its logits and, for a
classifier, the predicted class.

Each row's id is the input's id column where it has one (the workload's ``row_id_column``,
else a column named ``row_id``), else its position in the input, added before the model
(``row_id``, from 0): for ``--data``, files in path order, rows in file order (as
``pyarrow.dataset`` lists them); for a split, its index (map-style) or its row's position in
the Ray Dataset's own order. Ray Data's ``read_parquet`` tells no row's position (its
``row_hash`` is a hash, ``monotonically_increasing_id`` depends on task ids), so ``--data`` is
read by pyarrow in Ray Data tasks, one row group each, whose first position the files'
footers give; a Ray Dataset split is numbered by zipping it with ``ray.data.range`` in its own
order (which Ray holds in its object store, spilling to disk past it).

Bad input is one line (``UserError``, exit 2) with nothing written: the arguments, the run and
the paths are checked before Ray starts; the columns and the first rows through the model
before the job. ``--out`` is written only where it is new, empty, or an earlier output of this
command (its ``_predictions.json``), which it replaces.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from orchestrator import storage
from orchestrator.errors import UserError, user_error_among
from orchestrator.start.console import Console

if TYPE_CHECKING:  # the predictor imports torch: only where a job is planned
    from orchestrator.results.predictor import Source

MARKER = "_predictions.json"  # written first (status writing) and last (complete)
SPLITS = ("val", "test")
READ_ROWS = 4096  # rows per table a read task hands on


@dataclass(frozen=True)
class Predictions:
    """What ``predict`` wrote: ``out`` holds ``rows`` rows (the same record as its marker)."""

    out: str
    rows: int
    seconds: float
    checkpoint: str
    columns: list[str]

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        return (f"Predicted {self.rows} rows in {self.seconds:.1f} s "
                f"({self.rows_per_second:,.0f} rows/s) -> {self.out}")


@dataclass(frozen=True)
class ParquetInput:
    """``--data``'s files as pyarrow sees them: the pieces (row groups) Ray Data reads."""

    filesystem: Any
    columns: list[str]
    rows: int
    pieces: list[dict[str, Any]]  # path, row_group, start (its first row's position)


def check_arguments(data: str | None, split: str | None, out: str | None, batch_size: int,
                    num_actors: int) -> None:
    """The argument mistakes, before anything is read or Ray starts."""
    if (data is None) == (split is None):
        raise UserError("--data or --split: give exactly one (Parquet rows to predict, or "
                        "the workload's own val or test split)")
    if split is not None and split not in SPLITS:
        raise UserError(f"--split: {split!r} is not a split to predict; choose val or test")
    if not out:
        raise UserError("--out: give where the predictions go (a directory or a URI)")
    if batch_size < 1:
        raise UserError(f"--batch-size: {batch_size}; give 1 or more rows")
    if num_actors < 1:
        raise UserError(f"--actors: {num_actors}; give 1 or more actors")


def _filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if storage.is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _reachable(path: str, flag: str) -> None:
    problem = storage.unreachable(path) if storage.is_uri(path) else None
    if problem:
        raise UserError(f"{flag}: {path} cannot be reached ({problem[:200]}); check the URI, "
                        "the credentials and the network")


def check_out(out: str, data: str | None) -> str:
    """``--out`` resolved, where writing it loses nothing that is not this command's."""
    target = storage.resolve(out)
    _reachable(target, "--out")
    if data is not None:
        source = storage.resolve(data).rstrip("/")
        if any(a == b or a.startswith(b + "/")
               for a, b in ((target.rstrip("/"), source), (source, target.rstrip("/")))):
            raise UserError(f"--out: {out} is --data or holds it or lies inside it; write the "
                            "predictions elsewhere")
    if not storage.exists(target):
        return target
    filesystem, path = _filesystem(target)
    if filesystem.get_file_info(path).type.name != "Directory":
        raise UserError(f"--out: {out} is a file; give a directory (new, empty, or an earlier "
                        "output of orchestrator predict)")
    if storage.is_nonempty_dir(target) and not storage.exists(storage.join(target, MARKER)):
        raise UserError(f"--out: {out} exists and was not written by orchestrator predict (no "
                        f"{MARKER}); give a new or empty directory, nothing there is replaced")
    return target


def parquet_input(data: str) -> ParquetInput:
    """``--data``'s files, columns, rows and pieces, from the footers alone (no Ray)."""
    import pyarrow.dataset as pads

    where = storage.resolve(data)
    _reachable(where, "--data")
    if not storage.exists(where):
        raise UserError(f"--data: {data} does not exist")
    filesystem, path = _filesystem(where)
    try:
        dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
        pieces, rows = [], 0
        for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path):
            fragment.ensure_complete_metadata()
            for group in fragment.row_groups:
                pieces.append({"path": fragment.path, "row_group": group.id, "start": rows})
                rows += group.num_rows
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"--data: {data} cannot be read as Parquet ({type(exc).__name__}: "
                        f"{first[:200]})") from None
    if not rows:
        raise UserError(f"--data: {data} holds no rows (no Parquet files, or empty ones)")
    return ParquetInput(filesystem, list(dataset.schema.names), rows, pieces)


def predict(run_dir: str, data: str | None = None, split: str | None = None,
            out: str | None = None, *, batch_size: int = 256, num_actors: int = 2,
            use_gpu: bool = False, monitor: str | None = None,
            console: Console | None = None, verbose: bool = False) -> Predictions:
    """The best model of ``run_dir`` (``load_best``'s; ``monitor``: a ``tracker.also_monitor``
    metric's) over ``data`` (Parquet) or the workload's ``split``, written to ``out``."""
    from orchestrator.api import best_checkpoint

    check_arguments(data, split, out, batch_size, num_actors)
    assert out is not None
    checkpoint = best_checkpoint(run_dir, monitor=monitor)
    target = check_out(out, data)
    parquet = parquet_input(data) if data is not None else None
    console = console or Console(verbose=verbose)

    from orchestrator.start.cluster import init_ray, one_node_driver_env
    from orchestrator.training.datasets import quiet_ray_data

    init_ray(verbose)
    quiet_ray_data()
    if not verbose:  # the last line is the summary; Ray Data's notices are for -v
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    with one_node_driver_env():
        job = plan_job(checkpoint, parquet, split, batch_size, num_actors, use_gpu)
    return run_job(job, target, console, data or f"split {split}")


@dataclass
class Job:
    """A checked job: the dataset of rows (ids among the columns), how its rows are read."""

    checkpoint: str
    dataset: Any
    source: Source
    rows: int
    classification: bool
    batch_size: int
    num_actors: int
    use_gpu: bool
    cpus_per_actor: float


def actor_cpus(num_actors: int) -> float:
    """Each actor's CPUs: one where the cluster has a CPU to spare for Ray Data's reads beside
    them, else a share of all but one (2 actors on 2 cores: half each)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if cpus >= num_actors + 1:
        return 1.0
    return max(0.01, (cpus - 1) / num_actors if cpus > 1 else cpus / (num_actors + 1))


def plan_job(checkpoint: str, parquet: ParquetInput | None, split: str | None,
             batch_size: int, num_actors: int, use_gpu: bool) -> Job:
    """The rows as a Ray Dataset and the model's checks on its first rows, on the driver."""
    import ray

    from orchestrator.api import load_checkpoint
    from orchestrator.results.predictor import ROW_ID, Source

    if use_gpu and ray.cluster_resources().get("GPU", 0.0) < num_actors:
        raise UserError(f"--gpu: {num_actors} actors need {num_actors} GPUs; the cluster has "
                        f"{ray.cluster_resources().get('GPU', 0.0):g}")
    loaded = load_checkpoint(checkpoint)
    workload = loaded.workload
    id_column = getattr(workload, "row_id_column", None) or ROW_ID
    if parquet is not None:
        source = Source("rows", None, id_column, "--data")
        dataset, first = parquet_dataset(parquet, workload, id_column)
        rows = parquet.rows
    else:
        assert split is not None
        dataset, rows, source, first = split_dataset(workload, split, id_column)
    classification = is_classifier(loaded.model, workload)
    check_first_rows(loaded, source, first, classification)
    return Job(checkpoint, dataset, source, rows, classification, batch_size, num_actors,
               use_gpu, actor_cpus(num_actors))


def check_first_rows(loaded: Any, source: Source, first: dict[str, Any],
                     classification: bool) -> None:
    import torch

    from orchestrator.results.predictor import predict_batch
    from workers.contract.user_errors import UserInputError

    precision = loaded.metadata["config"].get("train", {}).get("precision", "fp32")
    try:
        predict_batch(loaded.model, loaded.workload, source, first,
                      classification=classification, device=torch.device("cpu"),
                      precision=precision)
    except UserInputError as exc:
        raise UserError(str(exc)) from None


def is_classifier(model: Any, workload: Any) -> bool:
    """As training decides it: integer targets in the training split's first batch. A Ray
    Dataset's ``label_column`` is read from its schema (a Parquet footer, no rows read)."""
    import pyarrow as pa
    import torch

    from workers.contract.user_errors import UserInputError
    from workers.loop.batches import Batches
    from workers.loop.loaders import split_collate
    from workers.loop.metric_setup import infer_num_classes
    from workers.loop.ray_data import is_ray_dataset, named_columns

    named = named_columns(workload)
    if named and is_ray_dataset(workload.train_dataset):
        schema = workload.train_dataset.schema()
        types = dict(zip(schema.names, schema.types, strict=True)) if schema else {}
        if isinstance(types.get(named[1]), pa.DataType):
            return bool(pa.types.is_integer(types[named[1]]))
    try:
        classes = infer_num_classes(model, workload.train_dataset, torch.device("cpu"),
                                    Batches.of(workload), split_collate(workload, "train"))
    except UserInputError as exc:
        raise UserError(str(exc)) from None
    return classes is not None


def parquet_dataset(parquet: ParquetInput, workload: Any, id_column: str
                    ) -> tuple[Any, dict[str, Any]]:
    """``--data`` as a Ray Dataset: one read task per row group, only the columns the model
    reads (and the id), each row's position added where the input has no id column; and its
    first rows, read here, as Ray Data hands rows to the actors (column arrays)."""
    import numpy as np
    import ray.data

    from orchestrator.results.predictor import ROW_ID, read_pieces
    from workers.loop.ray_data import named_columns

    has_ids = id_column in parquet.columns
    if not has_ids and id_column != ROW_ID:
        raise UserError(f"--data: no column {id_column!r} (workload.row_id_column; its "
                        f"columns: {', '.join(parquet.columns)})")
    named = named_columns(workload)
    columns = None
    if named:
        missing = [c for c in named[0] if c not in parquet.columns]
        if missing:
            raise UserError(f"--data: no column {missing[0]!r}, which the model reads "
                            f"(workload.feature_columns; its columns: "
                            f"{', '.join(parquet.columns)})")
        columns = [*named[0], *([id_column] if has_ids else [])]
    read = partial(read_pieces, filesystem=parquet.filesystem, columns=columns,
                   add_ids=not has_ids, rows=READ_ROWS)
    head = next(read({k: np.array([v]) for k, v in parquet.pieces[0].items()}, rows=2))
    first = ray.data.from_arrow(head.slice(0, 2)).take_batch(2, batch_format="numpy")
    pieces = ray.data.from_items(parquet.pieces, override_num_blocks=len(parquet.pieces))
    return pieces.map_batches(read, batch_size=1), first


def split_dataset(workload: Any, split: str, id_column: str
                  ) -> tuple[Any, int, Source, dict[str, Any]]:
    """The workload's ``split`` as a Ray Dataset of rows with ids: a Ray Dataset split as it
    is (numbered in its own order unless it has the id column), a map-style one as its
    indices. With its row count, its source and its first rows."""
    import numpy as np
    import ray.data

    from orchestrator.results.predictor import Source
    from workers.loop.ray_data import is_ray_dataset, named_columns

    field = f"workload.{split}_dataset"
    dataset = getattr(workload, f"{split}_dataset", None)
    if dataset is None:
        raise UserError(f"--split {split}: the workload has no {split} split ({field} is None)")
    if not is_ray_dataset(dataset):
        try:
            rows = len(dataset)
        except TypeError:
            raise UserError(f"--split {split}: {field} has no len(); predict reads map-style "
                            "and Ray Dataset splits") from None
        if not rows:
            raise UserError(f"--split {split}: {field} is empty")
        ids = ray.data.range(rows).rename_columns({"id": id_column})
        first = {id_column: np.arange(min(rows, 2))}
        return ids, rows, Source("indices", split, id_column, field), first
    named = named_columns(workload)
    has_ids = id_column in dataset.columns()
    if named:
        dataset = dataset.select_columns([*named[0], *([id_column] if has_ids else [])])
    rows = dataset.count()
    if not rows:
        raise UserError(f"--split {split}: {field} has no rows")
    first = dataset.take_batch(2, batch_format="numpy")
    if not has_ids:
        first[id_column] = np.arange(len(next(iter(first.values()))))
        dataset = numbered(dataset, id_column)
    return dataset, rows, Source("rows", split, id_column, field), first


def numbered(dataset: Any, id_column: str) -> Any:
    """``dataset`` with each row's position in its own order (Ray Data's ``preserve_order``)
    as ``id_column``: run once into Ray's object store, its blocks counted, then each block
    numbered from its first row's position (blocks stay blocks: the actors share them)."""
    import ray
    import ray.data

    dataset.context.execution_options.preserve_order = True
    blocks = dataset.to_arrow_refs()
    counted = ray.remote(num_cpus=0)(_rows)
    counts = ray.get([counted.remote(block) for block in blocks])
    starts = [sum(counts[:i]) for i in range(len(counts))]
    with_ids = ray.remote(num_cpus=0)(_with_ids)
    numbered_blocks: list[Any] = [with_ids.remote(block, start, id_column)
                                  for block, start in zip(blocks, starts, strict=True)]
    return ray.data.from_arrow_refs(numbered_blocks)


def _rows(table: Any) -> int:
    return int(table.num_rows)


def _with_ids(table: Any, start: int, id_column: str) -> Any:
    import numpy as np
    import pyarrow as pa

    ids = np.arange(start, start + table.num_rows, dtype=np.int64)
    return table.append_column(id_column, pa.array(ids))


def run_job(job: Job, target: str, console: Console, described: str) -> Predictions:
    """The job itself: ``--out`` made ours (marker first), ``map_batches`` over the actor pool,
    ``write_parquet``, the marker completed; a job that fails leaves no output behind."""
    import ray
    import ray.data

    from orchestrator.results.predictor import LOGITS, PREDICTED, Predictor

    if storage.exists(target):
        storage.delete_dir(target)  # empty, or an earlier output of this command
    record = {"status": "writing", "checkpoint": job.checkpoint, "input": described,
              "rows": job.rows}
    storage.write_json(storage.join(target, MARKER), record)
    progress = _progress_actor().remote() if console.interactive else None
    predictions = job.dataset.map_batches(
        Predictor, batch_size=job.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.num_actors),
        num_cpus=job.cpus_per_actor, num_gpus=1 if job.use_gpu else 0,
        fn_constructor_kwargs={"checkpoint": job.checkpoint, "source": job.source,
                               "classification": job.classification,
                               "use_gpu": job.use_gpu, "progress": progress})
    filesystem, path = _filesystem(target)
    start = time.perf_counter()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            predictions.write_parquet(path, filesystem=filesystem)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            failure.append(exc)

    writer = threading.Thread(target=write, name="predict-write", daemon=True)
    with console.progress(job.rows, "rows"):
        writer.start()
        while writer.is_alive():
            writer.join(timeout=0.5)
            if progress is not None:
                console.advance(completed=ray.get(progress.rows.remote()))
    seconds = time.perf_counter() - start
    if progress is not None:
        ray.kill(progress)
    if failure:
        storage.delete_dir(target)
        message = user_error_among(failure)
        if message:
            raise UserError(message)
        raise failure[0]
    columns = [job.source.id_column, LOGITS, *([PREDICTED] if job.classification else [])]
    result = Predictions(out=target, rows=job.rows, seconds=seconds,
                         checkpoint=job.checkpoint, columns=columns)
    storage.write_json(storage.join(target, MARKER), {
        **record, "status": "complete", "seconds": round(seconds, 3), "columns": columns,
        "batch_size": job.batch_size, "actors": job.num_actors, "gpu": job.use_gpu})
    console.say(result.line())
    return result


def _progress_actor() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Rows done, counted by the actors, read by the driver's bar."""

        def __init__(self) -> None:
            self.done = 0

        def add(self, rows: int) -> None:
            self.done += rows

        def rows(self) -> int:
            return self.done

    return Progress
