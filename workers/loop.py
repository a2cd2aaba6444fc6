"""The per-worker training loop that Ray Train runs on every rank.

Per epoch: train on this rank's shard -> evaluate this rank's validation shard -> one
all-reduce of every split's sufficient statistics -> identical metrics on all ranks ->
rank 0's tracker decides (improved? stop?) and, if the policy says so, snapshots the model
-> every rank calls ``ray.train.report`` (rank 0 with the checkpoint, others with none).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from workers.checkpointing import AsyncSaver, load_train_state, load_weights, snapshot
from workers.config import RunConfig
from workers.evaluation import (
    accumulate,
    global_metrics,
    infer_num_classes,
    shard,
    train_epoch,
    workload_metrics,
)
from workers.metrics import MeanLoss
from workers.policy import decide_save
from workers.tracker import BestTracker, MonitorNotReportedError
from workers.workload import build_workload

# Reported every epoch besides the split metrics; the tracker's ranking is Ray's checkpoint
# score (see policy.ray_keep_settings).
RANK_KEY = "checkpoint_rank"


def make_optimizer(cfg: RunConfig, params: Any) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Each rank's RNG stream for an epoch (dropout, augmentation): resume needs no RNG file."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


@dataclass
class Setup:
    model: torch.nn.Module  # DDP-wrapped when world_size > 1
    plain: torch.nn.Module  # the unwrapped model whose weights are saved
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader
    loss_fn: Any
    metrics: list[Any]
    device: torch.device
    start_epoch: int
    tracker_state: dict[str, Any] | None
    precision: str = "fp32"


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"train.precision: bf16 is not supported by {name} (bfloat16 needs an "
                         "Ampere or newer GPU); use train.precision: fp32")


def setup(cfg: RunConfig, rank: int, world_size: int) -> Setup:
    import ray.train
    import ray.train.torch

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    device = ray.train.torch.get_device()
    check_precision(cfg.train.precision, device)
    plain = workload.model.to(device)
    num_classes = infer_num_classes(plain, workload.train_dataset, device)
    metrics = workload_metrics(workload, num_classes)

    start_epoch, tracker_state, optimizer_state = 1, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            plain.load_state_dict(load_weights(directory))
            state = load_train_state(directory)
        start_epoch = int(state["epoch"]) + 1
        tracker_state = state["tracker"]
        # Only full-state (resume) checkpoints hold it; from a model checkpoint the optimizer
        # starts afresh.
        optimizer_state = state.get("optimizer")
        if optimizer_state is None and rank == 0:
            logging.getLogger(__name__).warning(
                "resuming from epoch %s without optimizer state (a model checkpoint; set "
                "checkpoint.resume_every_n_epochs for full-state checkpoints)", state["epoch"])

    strategy = "ddp" if world_size > 1 else None
    model = ray.train.torch.prepare_model(plain, parallel_strategy=strategy)
    optimizer = make_optimizer(cfg, plain.parameters())
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    sampler = DistributedSampler(
        workload.train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed
    )
    train_loader = DataLoader(workload.train_dataset, batch_size=cfg.train.batch_size,
                              sampler=sampler)
    val_loader = DataLoader(shard(workload.val_dataset, rank, world_size),
                            batch_size=cfg.train.batch_size, shuffle=False)
    return Setup(model, plain, optimizer, train_loader, val_loader, workload.loss_fn, metrics,
                 device, start_epoch, tracker_state, cfg.train.precision)


def evaluate_epoch(s: Setup, train_loss: MeanLoss) -> dict[str, float]:
    # The unwrapped module: DDP's forward would broadcast buffers, a collective that ranks
    # with different numbers of validation batches would never all reach.
    val_loss = accumulate(s.plain, s.val_loader, s.loss_fn, s.metrics, s.device, s.precision)
    return global_metrics([("train", train_loss, []), ("val", val_loss, s.metrics)], s.device)


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, made identical on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def require_monitor(monitor: str, reported: Iterable[str]) -> None:
    names = sorted(reported)
    if monitor not in names:
        raise MonitorNotReportedError(
            f"tracker.monitor: {monitor!r} is not reported by this run; "
            f"it reports: {', '.join(names)}"
        )


@dataclass
class EpochReporter:
    """The end of every epoch, the same for every engine: rank 0's tracker decides (improved?
    save? stop?) and snapshots the model if the policy says so; every rank reports."""

    cfg: RunConfig
    tracker: BestTracker | None  # rank 0 only
    saver: AsyncSaver
    model: torch.nn.Module  # the unwrapped model whose weights are saved
    optimizer: Any  # anything with state_dict() (see checkpointing.snapshot)
    device: torch.device
    world_size: int
    # Also write the weights as a torch.save'd state dict under this name in checkpoints that
    # hold an improvement (the fastai engine's file for ``learn.load``).
    torch_weights_file: str | None = None

    @classmethod
    def create(cls, cfg: RunConfig, is_rank_zero: bool, tracker_state: dict[str, Any] | None,
               **parts: Any) -> EpochReporter:
        tracker = BestTracker(cfg.tracker.monitor, cfg.tracker.mode, cfg.tracker.min_delta,
                              cfg.tracker.patience) if is_rank_zero else None
        if tracker is not None and tracker_state is not None:
            tracker.load_state_dict(tracker_state)
        saver = AsyncSaver()
        if tracker is not None and (cfg.checkpoint.policy != "none"
                                    or cfg.checkpoint.resume_every_n_epochs):
            # The snapshot's memory, allocated now rather than during the first save.
            saver.buffers.prepare(parts["model"].state_dict())
        return cls(cfg, tracker, saver, **parts)

    def report(self, epoch: int, values: dict[str, float], started: float) -> bool:
        """Report one epoch's global metrics; returns whether to stop (the same on all ranks)."""
        import ray.train

        cfg, tracker = self.cfg, self.tracker
        record: dict[str, Any] = {"epoch": epoch, **values}
        metrics = dict(record)
        require_monitor(cfg.tracker.monitor, values)  # identical on all ranks: all raise together

        snap, dir_name, stop = None, None, False
        if tracker is not None:
            decision = tracker.update(epoch, record)
            stop = decision.should_stop
            save = decide_save(
                cfg.checkpoint.policy, epoch, improved=decision.improved,
                is_final=stop or epoch == cfg.train.epochs,
                every_n_epochs=cfg.checkpoint.every_n_epochs,
                resume_every_n_epochs=cfg.checkpoint.resume_every_n_epochs,
            )
            metrics["is_best"] = decision.improved
            metrics[RANK_KEY] = tracker.improvements - (0.0 if decision.improved else 0.5)
            if save.save:
                save_started = time.perf_counter()
                self.saver.wait()  # the previous save must finish before its memory is reused
                copy_started = time.perf_counter()
                snap = snapshot(
                    self.model, self.optimizer if save.full_state else None,
                    {"epoch": epoch, "tracker": tracker.state_dict(), "seed": cfg.seed},
                    {**record, "monitor": tracker.monitor, "mode": tracker.mode,
                     "is_best": decision.improved, "saved_because": save.reason,
                     "world_size": self.world_size, "seed": cfg.seed, "config": cfg.to_dict()},
                    torch_weights_file=self.torch_weights_file if decision.improved else None,
                    buffers=self.saver.buffers,
                )
                dir_name = f"checkpoint_epoch{epoch:04d}_{time.time_ns()}"
                # What this save cost the loop: the host copy, and waiting for the previous
                # save's write if it had not finished (the write itself runs off the loop).
                metrics["snapshot_seconds"] = time.perf_counter() - copy_started
                metrics["save_blocked_seconds"] = time.perf_counter() - save_started
        stop = broadcast_flag(stop, self.device)
        metrics["epoch_seconds"] = time.perf_counter() - started

        if snap is not None:
            self.saver.report(metrics, snap, dir_name)
        else:
            ray.train.report(metrics)
        return stop


def quiet_ray_train_logs() -> None:
    # Ray Train logs every report at INFO on each worker; one progress line per epoch (from the
    # controller) is what a user reads.
    from ray.train.v2._internal.execution import context as train_context

    # (that module's logger is named after its file path, not its module name)
    train_context.logger.setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    cfg = RunConfig.model_validate(config)
    quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()

    s = setup(cfg, rank, world_size)
    reporter = EpochReporter.create(cfg, rank == 0, s.tracker_state, model=s.plain,
                                    optimizer=s.optimizer, device=s.device,
                                    world_size=world_size)
    for epoch in range(s.start_epoch, cfg.train.epochs + 1):
        torch.manual_seed(epoch_seed(cfg.seed, rank, epoch))
        s.train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        train_loss = train_epoch(s.model, s.train_loader, s.loss_fn, s.optimizer, s.device,
                                 cfg.train.precision)
        if reporter.report(epoch, evaluate_epoch(s, train_loss), started):
            break
    reporter.saver.wait()
