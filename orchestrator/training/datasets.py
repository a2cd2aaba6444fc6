"""What the driver learns of a workload before training: the direction of its monitored
metric, and its Ray Dataset splits: a plain Parquet training or validation split is read by
each worker itself (``workers/loop/parquet_shards.py``; the driver reads its files' footers
here), any other is handed to Ray Train, which shards it to the workers
(``workers/loop/ray_data.py`` says how).

The driver builds the workload once (as every worker builds it) to see which splits are Ray
Datasets and which way its metric objects say they improve; a run of map-style datasets only
pays for that build (a map-style split of no samples is refused). Each Ray Dataset split is
checked here, before any worker starts: it has rows, at least one per worker for training, and
its first rows become a batch (the columns the workload names exist and are numbers).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.errors import UserError
from orchestrator.start.cluster import one_node_driver_env
from workers.contract.config import RunConfig
from workers.contract.direction import Direction, resolve
from workers.contract.names import RAY_DATASETS_KEY
from workers.contract.user_errors import UserInputError
from workers.evaluation.metrics import spec_directions
from workers.loop.batches import Batches
from workers.loop.iterable import check_iterable_run, is_iterable
from workers.loop.learner import build_workload
from workers.loop.parquet_shards import parquet_split
from workers.loop.ray_data import (
    SPLITS,
    engine_refuses,
    first_rows,
    for_streaming,
    is_ray_dataset,
    rows_collate,
    streamed_splits,
)

# The splits whose rows are all scored, each once (``streaming_split(equal=False)``).
EXACT_SPLITS = frozenset({"val", "test"})
# The splits the workers read from Ray Train or, when plain Parquet, from the files (the test
# split is scored in one Ray task that reads it whole: ``workers/loop/scoring.py``).
RANK_READ_SPLITS = ("train", "val")


@dataclass(frozen=True)
class RayDatasets:
    """The Ray Dataset splits of a run, by name, and what the workers learn of them."""

    datasets: dict[str, Any]
    rows: dict[str, int]
    samples: dict[str, dict[str, Any]]  # each split's first rows, as column arrays
    # The plain Parquet splits each worker reads itself (``loop.parquet_shards.ParquetSplit``)
    parquet: dict[str, Any] = field(default_factory=dict)

    def loop_config(self) -> dict[str, Any]:
        """For the workers' ``train_loop_config`` (``RAY_DATASETS_KEY``)."""
        return {RAY_DATASETS_KEY: {"rows": self.rows, "samples": self.samples,
                                   "parquet": self.parquet}}

    def trainer_options(self) -> dict[str, Any]:
        """``TorchTrainer``'s ``datasets`` (those Ray Train shards) and ``dataset_config``."""
        from workers.compat import split_data_config

        sharded = {s: ds for s, ds in self.datasets.items() if s not in self.parquet}
        return {"datasets": sharded, "dataset_config": split_data_config(EXACT_SPLITS)}


@dataclass(frozen=True)
class WorkloadFacts:
    """What ``inspect_workload`` learned: the Ray Dataset splits (None: every split is
    map-style) and the monitored metric's direction."""

    ray_datasets: RayDatasets | None
    direction: Direction
    # tracker.also_monitor's modes, resolved as the primary's (in their order)
    also_modes: tuple[Literal["min", "max"], ...] = ()
    # Each split's fingerprint (``workers.loop.provenance.data_fingerprint``)
    data: dict[str, Any] | None = None


def inspect_workload(cfg: RunConfig) -> WorkloadFacts:
    """The workload built once on the driver: its Ray Dataset splits checked and the
    monitored metric's direction resolved (``contract.direction``). A mistake is a
    ``UserError`` naming the key. Ray must be running (a Ray Dataset reads on it)."""
    from workers.loop.provenance import data_fingerprint

    workload = build_on_driver(cfg)  # also for a Learner: its data's fingerprint
    if cfg.engine == "fastai":  # a Learner's metrics declare no direction; no Ray Datasets
        return WorkloadFacts(None, direction_of(cfg, None), also_modes_of(cfg, None),
                             data_fingerprint(workload))
    spec = getattr(workload, "metrics", None)
    ray_datasets = ray_datasets_of(cfg, workload)
    return WorkloadFacts(ray_datasets, direction_of(cfg, spec), also_modes_of(cfg, spec),
                         data_fingerprint(workload, ray_datasets.rows if ray_datasets else None))


def direction_of(cfg: RunConfig, spec: Any) -> Direction:
    """``tracker.mode`` for this run: as set, declared by the monitored metric's object (in the
    workload's ``metrics`` spec), else by the monitor's name."""
    try:
        declared = {f"val_{name}": d for name, d in spec_directions(spec).items()}
    except ValueError as exc:  # the workload's metrics: the user's to fix
        raise UserError(f"workload.{exc}") from None
    try:
        return resolve(cfg.tracker.monitor, cfg.tracker.mode, declared)
    except UserInputError as exc:
        raise UserError(str(exc)) from None


def also_modes_of(cfg: RunConfig, spec: Any) -> tuple[Literal["min", "max"], ...]:
    """``tracker.also_monitor``'s modes, each resolved as ``tracker.mode`` is
    (``direction_of``) from what the workload's metric objects declare (``spec``)."""
    if not cfg.tracker.also_monitor:
        return ()
    return also_modes(cfg, {f"val_{name}": d for name, d in spec_directions(spec).items()})


def also_modes(cfg: RunConfig, declared: Mapping[str, tuple[bool, str]]
               ) -> tuple[Literal["min", "max"], ...]:
    """``tracker.also_monitor``'s modes, in their order, from ``declared`` (reported name ->
    (higher is better, the object that says so)): a run's from the workload it built, a
    search's from its probe (``workers.loop.probe.check_search``). A name that cannot be
    placed is refused naming the key."""
    try:
        return tuple(resolve(a.monitor, a.mode, declared).mode
                     for a in cfg.tracker.also_monitor)
    except UserInputError as exc:
        raise UserError(f"tracker.also_monitor: {exc}") from None


def build_on_driver(cfg: RunConfig) -> Any:
    import torch

    torch.manual_seed(cfg.seed)  # as the workers build it
    random.seed(cfg.seed)
    try:
        with one_node_driver_env():  # the Ray Datasets it makes are read on this Ray
            return build_workload(cfg.workload.entrypoint, cfg.workload.params)
    except UserInputError as exc:
        raise UserError(str(exc)) from None


def find_ray_datasets(cfg: RunConfig) -> RayDatasets | None:
    """The run's Ray Dataset splits, checked; None when every split is map-style."""
    if cfg.engine == "fastai":  # its engine refuses Ray Datasets itself (a Learner has none)
        return None
    return ray_datasets_of(cfg, build_on_driver(cfg))


def ray_datasets_of(cfg: RunConfig, workload: Any) -> RayDatasets | None:
    """``workload``'s Ray Dataset splits, checked; None when every split is map-style."""
    try:
        check_iterable_run(cfg, workload)  # a stream's schedule (workers/loop/iterable.py)
    except UserInputError as exc:
        raise UserError(str(exc)) from None
    refuse_empty_splits(workload)
    datasets = streamed_splits(workload)
    if not datasets:
        return None
    quiet_ray_data()
    if cfg.engine != "torch":
        raise UserError(str(engine_refuses(cfg.engine, datasets)))
    rows, samples, parquet = {}, {}, {}
    for split, dataset in datasets.items():
        rows[split], samples[split] = check_split(workload, split, dataset)
        plain = parquet_split(workload, dataset, rows[split]) if split in RANK_READ_SPLITS else None
        if plain is not None:
            parquet[split] = plain
        datasets[split] = for_streaming(workload, dataset)
    if "train" in rows and rows["train"] < cfg.scaling.max_workers:
        raise UserError(f"workload.train_dataset: {rows['train']} rows for "
                        f"{cfg.scaling.max_workers} workers; each worker needs at least one")
    return RayDatasets(datasets, rows, samples, parquet)


def refuse_empty_splits(workload: Any) -> None:
    """A map-style split of no samples (``len()`` 0) would train an epoch and record a NaN
    loss: refused in one line naming it. Ray Datasets are counted by ``check_split``; a stream
    has no length (an empty one is refused by the workers' first batch)."""
    for split in SPLITS:
        dataset = getattr(workload, f"{split}_dataset", None)
        if dataset is None or is_ray_dataset(dataset) or is_iterable(dataset):
            continue
        try:
            size = len(dataset)
        except Exception:  # noqa: BLE001 - no length to check (the workers index it)
            continue
        if size == 0:
            raise UserError(f"workload.{split}_dataset: the dataset is empty (its len() is 0); "
                            "every split needs at least one sample")


def quiet_ray_data() -> None:
    """The driver prints one line per epoch: Ray Data's progress bars and its INFO lines for
    each dataset it runs (here, and in the run it is handed to) would bury them."""
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def check_split(workload: Any, split: str, dataset: Any) -> tuple[int, dict[str, Any]]:
    """(rows, first rows) of one Ray Dataset split, whose first rows make a batch."""
    field = f"workload.{split}_dataset"
    try:
        count = dataset.count()  # Parquet: from the files' metadata
        sample = first_rows(dataset) if count else {}
    except Exception as exc:  # noqa: BLE001 - a path that is not there, a bad transform
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{field}: the Ray Dataset cannot be read ({type(exc).__name__}: "
                        f"{first[:200]})") from None
    if not count:
        raise UserError(f"{field}: the Ray Dataset has no rows; every split needs some")
    try:
        batch = rows_collate(workload, split)(sample)  # its errors name the split or collate_fn
    except UserInputError as exc:
        raise UserError(str(exc)) from None
    try:
        Batches.of(workload).split(batch, split)  # its errors name label_key, collate_fn or
    except UserInputError as exc:                  # the split, and the batch's structure
        raise UserError(str(exc)) from None
    return count, sample
