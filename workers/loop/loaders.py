"""The loaders of a split on one rank: its collate, its worker processes, its share of the
samples, its first batch.

Validation shards are strided slices of the dataset (rank r takes r, r+W, r+2W, ...), never
padded, so every sample is counted exactly once across ranks whatever the set size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

from workers.contract.user_errors import UserInputError
from workers.loop.batches import Batches, blamed_on
from workers.loop.iterable import first_item, is_iterable
from workers.loop.ray_data import first_rows, is_ray_dataset, rows_collate


def collate_of(workload: Any) -> Callable[[list[Any]], Any]:
    """The workload's ``collate_fn`` (every split's loaders use it), else PyTorch's default."""
    return getattr(workload, "collate_fn", None) or default_collate



def loader_workers(setting: str | int, dataset: Any, cpus: float) -> int:
    """``train.loader_workers``: ``auto`` is none for in-memory tensors (indexing them costs
    less than handing batches between processes), one for a stream (each worker process reads
    all of it: ``loop.iterable``), else the worker's CPUs, from 2 to 8."""
    if setting != "auto":
        return int(setting)
    if is_iterable(dataset):
        return 1
    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(inner, TensorDataset):
        return 0
    return int(min(8, max(2, cpus)))



# What the loop itself decides about a loader: a workload's loader_options may not change it.
LOADER_OWN = ("dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn",
              "drop_last")



def make_loader(dataset: Any, batch_size: int, collate: Callable[[list[Any]], Any], *,
                workers: int, device: torch.device, sampler: Any = None,
                options: dict[str, Any] | None = None) -> DataLoader:
    """A loader of one split on one rank: ``sampler`` for the training shard, else in order.
    Worker processes stay between epochs; batches are pinned for a GPU. ``options``: the
    workload's ``loader_options`` (``prefetch_factor``, ``timeout``, ``num_workers``, ...),
    which take precedence over these defaults."""
    settings = {"num_workers": workers, "pin_memory": device.type == "cuda", **(options or {})}
    settings.setdefault("persistent_workers", bool(settings["num_workers"]))
    fixed = sorted(set(settings) & set(LOADER_OWN))
    if fixed:
        raise UserInputError(f"workload.loader_options: {', '.join(fixed)} is the run's to "
                             "set (shards, batch size, collate_fn); give the others only")
    if not settings["num_workers"]:
        settings.pop("persistent_workers")  # torch refuses it without worker processes
        settings.pop("prefetch_factor", None)
    try:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                          collate_fn=collate, **settings)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"workload.loader_options: {exc}") from None



def split_collate(workload: Any, split: str) -> Callable[[Any], Any]:
    """How the loaders of ``split`` collate: a Ray Dataset's rows (``ray_data.rows_collate``),
    or a map-style dataset's samples."""
    if is_ray_dataset(getattr(workload, f"{split}_dataset", None)):
        return rows_collate(workload, split)
    return collate_of(workload)



def first_batch(dataset: Any, collate: Callable[[Any], Any], split: str = "train") -> Any:
    """A batch of the dataset's first sample (a stream's first item, a Ray Dataset's first
    rows), collated as the loaders collate. ``split``: the one a failure is blamed on."""
    if is_ray_dataset(dataset):
        return collate(first_rows(dataset))
    with blamed_on(f"workload.{split}_dataset: its first sample cannot be read"):
        sample = first_item(dataset, split) if is_iterable(dataset) else dataset[0]
    with blamed_on("workload.collate_fn: it fails on the first sample"):
        return collate([sample])



def split_of(batches: Batches, batch: Any, split: str) -> tuple[Any, Any]:
    """``batches.split(batch)`` of a split's first batch, a failure naming the split."""
    return batches.split(batch, split)



def shard(dataset: Any, rank: int, world_size: int) -> Any:
    if world_size == 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world_size))
