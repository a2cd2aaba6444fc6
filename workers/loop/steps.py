"""The steps of an epoch (train, evaluate, global metrics), in a Ray worker or a plain process.

Validation shards are strided slices of the dataset (rank r takes r, r+W, r+2W, ...), never
padded, so every sample is counted exactly once across ranks whatever the set size.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

from workers.contract.errors import UserInputError
from workers.decisions.metrics import (
    MeanLoss,
    TorchMetric,
    TorchMetricCollection,
    build_metrics,
    pack_states,
    unpack_compute,
)
from workers.loop.batches import Batches, as_batches, batch_size, blamed_on, describe, logits_of
from workers.loop.iterable import first_item, is_iterable
from workers.loop.optim import Stepper
from workers.loop.ray_data import StreamedEval, first_rows, is_ray_dataset, rows_collate


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 mixed precision for a forward pass (and the loss): matmuls and convolutions in
    bfloat16, the parameters untouched (float32 master weights)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def as_float32(obj: Any) -> Any:
    """Outputs of an autocast forward, in float32: losses and metrics are computed on these."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float64 else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: as_float32(v) for k, v in obj.items()}
    return obj


def is_class_label(target: Any) -> bool:
    if isinstance(target, bool):
        return False
    if isinstance(target, int):
        return True
    return isinstance(target, torch.Tensor) and target.ndim == 0 and not target.is_floating_point()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's tensors are (the host for one without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


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


def classes_from(logits: torch.Tensor, target: Any) -> int | None:
    """Number of classes when targets are integer labels (from the logits' width), else None.
    ``logits`` and ``target``: a batch's."""
    first = (target.reshape(-1)[0] if isinstance(target, torch.Tensor) and target.ndim == 1
             else target)
    if not is_class_label(first):
        return None
    width = logits.shape[-1] if logits.ndim > 1 else 1
    return 2 if width == 1 else int(width)


def infer_num_classes(model: torch.nn.Module, dataset: Any, device: torch.device,
                      batches: Batches | None = None,
                      collate: Callable[[list[Any]], Any] = default_collate) -> int | None:
    """Number of classes when targets are integer labels (from the model's output width)."""
    # Without the workload's own: a mapping batch goes in without its target (a loss_fn's
    # rule); the loss is never computed here.
    batches = batches or Batches(loss_fn=lambda out, y: out)
    inputs, target = split_of(batches, first_batch(dataset, collate), "train")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = logits_of(batches.forward(model, to_device(inputs, device)))
    model.train(was_training)
    return classes_from(out, target)


def workload_metrics(workload: Any, num_classes: int | None) -> list[Any]:
    spec = getattr(workload, "metrics", None)
    if spec is None:
        spec = ["accuracy"] if num_classes is not None else []
    try:
        return build_metrics(spec, num_classes)
    except ValueError as exc:  # the workload's metrics: the user's to fix, never retried
        raise UserInputError(f"workload.{exc}") from None


def check_metrics(metrics: Sequence[Any], logits: torch.Tensor, target: Any) -> None:
    """The metrics tried on the first batch (``check_first_batch``'s logits and target) before
    training, each on a throwaway copy: one that cannot take them (a torchmetrics metric built
    for another number of classes) is one line naming it, not a first evaluation failed after
    an epoch; so is one whose value is not one number (a per-class vector). A value one batch
    is too small for (an error computing it) is left to the evaluations."""
    target = to_device(target, logits.device)
    for metric in metrics:
        parts = (metric.members if isinstance(metric, TorchMetricCollection)
                 else {metric.name: metric})
        for name, part in parts.items():
            try_metric(name, part, logits.detach(), target)


def one_process() -> bool:
    """A metric copy's ``distributed_available_fn``: its value on this rank's batch alone."""
    return False


def try_metric(name: str, metric: Any, logits: torch.Tensor, target: Any) -> None:
    inner = metric.metric if isinstance(metric, TorchMetric) else metric
    try:
        trial, undo = copy.deepcopy(metric), None
    except Exception:  # noqa: BLE001 - a metric deepcopy cannot copy: tried itself, then reset
        trial, undo = metric, metric.reset
    if isinstance(trial, TorchMetric):  # computed without gathering from other ranks
        trial.metric.distributed_available_fn = one_process
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # one batch: a class missing, a sample too few
            with blamed_on(f"workload.metrics: {name} ({type(inner).__name__}) fails on the "
                           f"first batch's logits ({describe(logits)}) and target "
                           f"({describe(target)})"):
                trial.update(logits, target)
            try:
                value = trial.compute(trial.state())
            except UserInputError:
                raise  # not one number (``TorchMetric.as_number``)
            except Exception:  # noqa: BLE001 - one batch may be too few (R2Score: 2 samples)
                return
    finally:
        if undo is not None:
            undo()
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        TorchMetric.as_number(name, inner, value)  # raises: one line naming the metric


def shard(dataset: Any, rank: int, world_size: int) -> Any:
    if world_size == 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world_size))


def forward_loss(model: torch.nn.Module, batches: Batches, x: Any, y: Any,
                 device: torch.device, precision: str) -> tuple[Any, torch.Tensor]:
    """(the output in float32, the batch's loss). The forward runs under autocast; a
    ``loss_fn`` runs after it, on the float32 output (backward leaves autocast, as it should);
    the model's own loss is computed inside its forward, so it comes out of autocast."""
    with autocast(device, precision):
        out = batches.forward(model, x)
        own = batches.loss(out, y) if batches.loss_fn is None else None
    out = as_float32(out)
    return out, own.float() if own is not None else batches.loss(out, y)


def accumulate(
    model: torch.nn.Module,
    loader: DataLoader,
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


def distributed() -> bool:
    """Whether there are other ranks to agree with."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def most_on_any_rank(count: int, device: torch.device) -> int:
    """The largest ``count`` among the ranks (a sharded model's forwards per evaluation)."""
    if not distributed():
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics, or any other) on every rank.

    DDP broadcasts rank 0's buffers before each training forward, but that forward then
    updates each rank's running statistics from its own batch: after an epoch every rank holds
    different buffers, and only rank 0's are saved. Evaluating after this, every rank scores
    its shard with the model rank 0 saves (the parameters are already identical: DDP averages
    the gradients). One broadcast per dtype, the buffers packed into one flat tensor.
    """
    if not distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in model.buffers():  # the same order on every rank: the same module tree
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for (dtype, _), buffers in groups.items():
        wire = torch.uint8 if dtype == torch.bool else dtype  # gloo and NCCL take no bool
        flat = torch.cat([b.detach().reshape(-1).to(wire) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for buffer in buffers:
            n = buffer.numel()
            with torch.no_grad():
                buffer.copy_(flat[offset:offset + n].view_as(buffer).to(dtype))
            offset += n


def all_reduce_sum(vector: torch.Tensor, device: torch.device) -> torch.Tensor:
    """SUM across ranks in float64 (on the device for NCCL, which cannot reduce CPU tensors)."""
    if not distributed():
        return vector
    on_device = vector.to(device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.cpu()


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
    collate: Callable[[list[Any]], Any] = default_collate,
) -> dict[str, float]:
    """A single-process evaluation of a whole split (used for the test split and for checks);
    a Ray Dataset is read whole, in order (``collate``: its ``ray_data.rows_collate``)."""
    loader = (StreamedEval(dataset, collate, batch_size) if is_ray_dataset(dataset) else
              DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate))
    loss = accumulate(model, loader, batches, metrics, device, precision)
    vector, sizes = pack_states(loss, metrics)
    return unpack_compute(split, vector, sizes, loss, metrics)


def micro_batches(loader: Any, stepper: Stepper) -> Iterator[tuple[Any, int, bool]]:
    """(batch, micro-batches in its optimizer step, whether it is the step's last): from the
    loader's length, or as a stream's ranks agree on them (``iterable.TrainStream``)."""
    agreed = getattr(loader, "micro_batches", None)
    if agreed is not None:
        return agreed(stepper.accum)
    count = len(loader)
    return ((batch, *stepper.group(index, count)) for index, batch in enumerate(loader))


def train_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    batches: Batches | Callable[[Any, Any], torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | Stepper,
    device: torch.device,
    precision: str = "fp32",
    after_step: Callable[[int, MeanLoss], bool] | None = None,
    loss: MeanLoss | None = None,
) -> MeanLoss:
    """One pass over this rank's training shard; the running loss as sufficient statistics.
    ``optimizer``: a ``Stepper`` (schedule, accumulation, clipping), or a plain optimizer
    stepped once per batch. ``after_step(batches done, running loss)``: called after each
    optimizer step (it may evaluate, and reset the loss); True ends the pass there. ``loss``:
    the running loss to add to (default: a new one)."""
    batches = as_batches(batches)
    stepper = optimizer if isinstance(optimizer, Stepper) else Stepper(optimizer)
    model.train()
    loss = loss if loss is not None else MeanLoss()
    stepper.optimizer.zero_grad(set_to_none=True)
    for index, (batch, in_step, last) in enumerate(micro_batches(loader, stepper)):
        x, y = batches.split(batch)
        y = to_device(y, device)
        with stepper.micro_batch(model, last):
            _, batch_loss = forward_loss(model, batches, to_device(x, device), y, device,
                                         precision)
            (batch_loss / in_step if in_step > 1 else batch_loss).backward()
        if last:
            stepper.step(model)
        loss.add_batch(batch_loss.item(), batch_size(y))
        if last and after_step is not None and after_step(index + 1, loss):
            break
    return loss
