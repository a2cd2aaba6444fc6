"""A model scored with fixed weights: a pass over one rank's shard (``accumulate``), every
rank's statistics made one set of values (``global_metrics``), a whole split in one process
(``evaluate_dataset``), and a saved checkpoint's weights on a split (``evaluate_split``, the
test split's score after training, in a plain process or a Ray task; ``evaluate_workload``
for weights already in the model, such as an average of checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from workers.checkpoint.load import load_weights
from workers.contract.config import RunConfig
from workers.evaluation.collectives import all_reduce_sum
from workers.evaluation.metrics import MeanLoss, pack_states, unpack_compute
from workers.loop.batches import Batches, as_batches, batch_size, logits_of
from workers.loop.devices import to_device
from workers.loop.learner import build_workload
from workers.loop.loaders import split_collate
from workers.loop.metric_setup import infer_num_classes, workload_metrics
from workers.loop.precision import autocast, forward_loss
from workers.loop.ray_data import StreamedEval, is_ray_dataset, only_named_columns


def accumulate(
    model: torch.nn.Module,
    loader: Iterable[Any],
    batches: Batches | Callable[[Any, Any], torch.Tensor] | None,
    metrics: Sequence[Any],
    device: torch.device,
    precision: str = "fp32",
    forwards: int = 0,
    padding_input: Any = None,
) -> MeanLoss:
    """Sufficient statistics of one pass over ``loader`` with fixed weights.

    ``forwards``: make at least this many forward calls, the extra ones on ``padding_input``
    and counted nowhere (a sharded model's forward is a collective: every rank must make as
    many, whatever the size of its shard)."""
    batches = as_batches(batches)
    loss = MeanLoss()
    for metric in metrics:
        metric.reset()
    model.eval()
    made = 0
    with torch.no_grad():
        for batch in loader:
            if batch is None:  # another rank's stream goes on (``ray_data.joined``)
                with autocast(device, precision):
                    batches.forward(model, to_device(padding_input, device))
                continue
            x, y = batches.split(batch)
            x, y = to_device(x, device), to_device(y, device)
            out, batch_loss = forward_loss(model, batches, x, y, device, precision)
            made += 1
            loss.add_batch(batch_loss.item(), batch_size(y))
            logits = logits_of(out)
            for metric in metrics:
                metric.update(logits, y)
        for _ in range(forwards - made):
            with autocast(device, precision):
                batches.forward(model, to_device(padding_input, device))
    return loss



def global_metrics(
    groups: Sequence[tuple[str, MeanLoss, Sequence[Any]]], device: torch.device
) -> dict[str, float]:
    """One all-reduce for every split's statistics, then the values: identical on all ranks."""
    packed = [pack_states(loss, metrics) for _, loss, metrics in groups]
    vector = all_reduce_sum(torch.cat([p[0] for p in packed]), device)
    values: dict[str, float] = {}
    offset = 0
    for (split, loss, metrics), (part, sizes) in zip(groups, packed, strict=True):
        n = part.numel()
        values.update(unpack_compute(split, vector[offset : offset + n], sizes, loss, metrics))
        offset += n
    return values



def evaluate_dataset(
    model: torch.nn.Module,
    dataset: Any,
    batches: Batches | Callable[[Any, Any], torch.Tensor] | None,
    metrics: Sequence[Any],
    *,
    split: str,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    collate: Callable[[Any], Any] = default_collate,  # rows (a DataLoader) or columns
) -> dict[str, float]:
    """A single-process evaluation of a whole split (used for the test split and for checks);
    a Ray Dataset is read whole, in order (``collate``: its ``ray_data.rows_collate``)."""
    loader = (StreamedEval(dataset, collate, batch_size) if is_ray_dataset(dataset) else
              DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate))
    loss = accumulate(model, loader, batches, metrics, device, precision)
    vector, sizes = pack_states(loss, metrics)
    return unpack_compute(split, vector, sizes, loss, metrics)


def load_model(cfg: RunConfig, checkpoint_dir: str | Path) -> tuple[Any, torch.nn.Module]:
    """The workload (built as in training) with its model holding the checkpoint's weights."""
    torch.manual_seed(cfg.seed)
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    workload.model.load_state_dict(load_weights(checkpoint_dir))
    return workload, workload.model


def evaluate_split(
    cfg: RunConfig, checkpoint_dir: str | Path, split: str, device: str | torch.device = "cpu"
) -> dict[str, float] | None:
    """Metrics of one split (train, val, test) for the checkpoint's weights; None if absent."""
    workload, _ = load_model(cfg, checkpoint_dir)
    return evaluate_workload(cfg, workload, split, device)


def evaluate_workload(
    cfg: RunConfig, workload: Any, split: str, device: str | torch.device = "cpu"
) -> dict[str, float] | None:
    """Metrics of one split for the weights the workload's model holds; None if absent."""
    device = torch.device(device)
    model = workload.model
    learn = (getattr(workload, "extras", None) or {}).get("learner")
    if learn is not None:  # a Learner's splits are its DataLoaders, which make its batches
        from workers.loop.learner_splits import evaluate_learner_split

        return evaluate_learner_split(learn, split, workload.metrics,
                                      batch_size=cfg.train.batch_size, device=device,
                                      precision=cfg.train.precision)
    dataset = getattr(workload, f"{split}_dataset", None)
    if dataset is None:
        return None
    if is_ray_dataset(dataset):
        dataset = only_named_columns(workload, dataset)
    model.to(device)
    batches = Batches.of(workload)
    metrics = workload_metrics(workload, infer_num_classes(model, workload.train_dataset, device,
                                                           batches,
                                                           split_collate(workload, "train")))
    return evaluate_dataset(model, dataset, batches, metrics, split=split,
                            batch_size=cfg.train.batch_size, device=device,
                            precision=cfg.train.precision,
                            collate=split_collate(workload, split))


def evaluate_checkpoint(config: dict[str, Any], checkpoint: Any, split: str):
    """Ray task body: ``checkpoint`` is a ray.train.Checkpoint (local or remote storage)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with checkpoint.as_directory() as directory:
        return evaluate_split(RunConfig.model_validate(config), directory, split, device)
