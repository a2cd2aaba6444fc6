"""What every rank of every engine does before its first epoch, in one place.

``start_worker``: the validated config, this rank's place in the group and device, seeds,
the workload built (identical initial weights on every rank), and the run's state restored
from Ray's checkpoint when there is one (a restart or ``--resume``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from workers.checkpoint.load import load_intact
from workers.compat import quiet_ray_train_reports
from workers.contract.config import RunConfig
from workers.contract.errors import UserInputError
from workers.contract.names import STOP_QUEUE_KEY, STREAMS_KEY
from workers.contract.workload import build_workload


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Each rank's RNG stream for an epoch (dropout, augmentation): resume needs no RNG file."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """torch for dropout; ``random`` for fastai's augmentations and shuffles."""
    torch.manual_seed(epoch_seed(seed, rank, epoch))
    random.seed(epoch_seed(seed, rank, epoch))


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise UserInputError(f"train.precision: bf16 is not supported by {name} (bfloat16 needs an "
                         "Ampere or newer GPU); use train.precision: fp32")


@dataclass
class Restored:
    """Where a run continues: the first epoch to train (and, mid-epoch, how far into it),
    the tracker, the optimizer."""

    start_epoch: int = 1
    tracker_state: dict[str, Any] | None = None
    optimizer_state: dict[str, Any] | None = None  # only full-state (resume) checkpoints
    extras: dict[str, Any] | None = None  # the scheduler's, a loop's kept objects' (ditto)
    consumed: int = 0  # positions of start_epoch's permutation trained (``loop.stream``)
    step: int = 0  # optimizer steps of start_epoch trained
    global_step: int | None = None  # optimizer steps trained (None: a checkpoint without it)
    running_loss: tuple[float, float] | None = None  # a preempted step's training loss so far


def restore(model: torch.nn.Module, rank: int) -> Restored:
    """Load Ray's checkpoint for this attempt (if any) into ``model``."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Restored()
    weights, state, damaged = load_intact(checkpoint)  # the same choice on every rank
    model.load_state_dict(weights)
    log = logging.getLogger(__name__)
    if damaged and rank == 0:
        log.warning("damaged checkpoint(s) skipped: %s; resumed from epoch %s",
                    "; ".join(damaged), state["epoch"])
    optimizer_state, extras = state.get("optimizer"), state.get("extras")
    if optimizer_state is None and extras is None and rank == 0:
        log.warning(
            "resuming from epoch %s without optimizer state (a model checkpoint; set "
            "checkpoint.resume_every_n_epochs for full-state checkpoints)", state["epoch"])
    epoch, consumed = int(state["epoch"]), state.get("consumed")
    running = state.get("running_loss")  # a preempted stretch's, since its last evaluation
    running = (float(running[0]), float(running[1])) if running else None
    if consumed is not None:  # taken mid-epoch: the same epoch goes on at the next batch
        return Restored(epoch, state["tracker"], optimizer_state, extras, int(consumed),
                        int(state.get("step") or 0), state.get("global_step"), running)
    return Restored(epoch + 1, state["tracker"], optimizer_state, extras,
                    global_step=state.get("global_step"), running_loss=running)


@dataclass
class Worker:
    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    workload: Any  # the user's workload, its model on ``device`` with restored weights
    restored: Restored
    stop_queue: Any = None  # the driver's stop requests (``loop.preempt``); None in a trial
    # The Ray Dataset splits' row counts and first rows ({"rows": {split: n}, "samples":
    # {split: columns}}, ``loop.ray_data``); None when every split is map-style.
    streams: dict[str, Any] | None = None

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def parallel_strategy(self) -> str | None:
        """For ``ray.train.torch.prepare_model``: DDP when there is more than one rank."""
        return "ddp" if self.world_size > 1 else None

    def epochs(self, until: int | None = -1) -> Iterator[int]:
        """The epochs still to train, each with this rank's seeds set; up to ``until``
        (default train.epochs; None: no end, the caller stops)."""
        last = self.cfg.train.epochs if until == -1 else until
        epoch = self.restored.start_epoch
        while last is None or epoch <= last:
            seed_epoch(self.cfg.seed, self.rank, epoch)
            yield epoch
            epoch += 1


def start_worker(config: dict[str, Any]) -> Worker:
    import ray.train
    import ray.train.torch

    config = dict(config)
    stop_queue = config.pop(STOP_QUEUE_KEY, None)
    streams = config.pop(STREAMS_KEY, None)
    cfg = RunConfig.model_validate(config)
    quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    random.seed(cfg.seed)  # fastai DataLoaders seed their generators from `random`
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    device = ray.train.torch.get_device()
    check_precision(cfg.train.precision, device)
    if cfg.scaling.strategy == "ddp":
        workload.model.to(device)  # under fsdp, each rank moves only its shard there
    return Worker(cfg, rank, world_size, device, workload, restore(workload.model, rank),
                  stop_queue, streams)
