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

from workers.checkpoint.load import load_checkpoint_metadata, load_intact
from workers.checkpoint.manager import CheckpointManager
from workers.checkpoint.state import ModelState
from workers.compat import quiet_ray_train_reports, train_fn_utils
from workers.contract.config import RunConfig
from workers.contract.names import (
    MODE_SOURCE_KEY,
    PBT_KEY,
    PROVENANCE_KEY,
    RAY_DATASETS_KEY,
    STOP_QUEUE_KEY,
)
from workers.contract.user_errors import UserInputError
from workers.decisions.lineage import Lineage, ancestors_of, exploit_applies, leg_end
from workers.loop.learner import build_workload


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
    lineage: tuple[dict[str, Any], ...] = ()  # pbt: whose weights these were before (ancestors)
    # pbt, continuing from another trial's weights: its optimizer's rates times this (the
    # mutated train.lr over the donor's), and the mutated weight decay
    lr_scale: float | None = None
    weight_decay: float | None = None


def restore(model: torch.nn.Module, rank: int, pbt: dict[str, Any] | None = None,
            train: Any = None) -> Restored:
    """Load Ray's checkpoint for this attempt (if any) into ``model``; in a population-based
    search, the copy of another trial's checkpoint instead where the trial continues from it
    (``pbt["exploit"]``, with ``train``'s mutated lr and weight decay)."""
    checkpoint = train_fn_utils().get_checkpoint()
    restored = Restored() if checkpoint is None else restore_from(checkpoint, model, rank)
    pbt = pbt or {}
    exploit = pbt.get("exploit")
    if exploit and exploit_applies(restored.start_epoch, restored.consumed,
                                   int(exploit["epoch"])):
        restored = continue_from(exploit["path"], restored, model, rank, train.lr,
                                 train.weight_decay if pbt.get("weight_decay") else None)
    return restored


def restore_from(checkpoint: Any, model: torch.nn.Module, rank: int) -> Restored:
    weights, state, damaged = load_intact(checkpoint)  # the same choice on every rank
    model.load_state_dict(trained_weights(weights, state))
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
    lineage = tuple(state.get("lineage") or ())
    if consumed is not None:  # taken mid-epoch: the same epoch goes on at the next batch
        return Restored(epoch, state["tracker"], optimizer_state, extras, int(consumed),
                        int(state.get("step") or 0), state.get("global_step"), running,
                        lineage)
    return Restored(epoch + 1, state["tracker"], optimizer_state, extras,
                    global_step=state.get("global_step"), running_loss=running,
                    lineage=lineage)


def trained_weights(weights: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The weights training continues from: the model file's, unless it holds the EMA
    (train.ema_decay, the EMA won) and the checkpoint kept the raw weights beside it (a resume
    checkpoint's ``raw_weights``). A model checkpoint of the EMA has no raw weights: training
    then continues from the EMA, and a new average starts there."""
    raw = state.get("raw_weights")
    return raw if raw is not None else weights


def continue_from(path: str, own: Restored, model: torch.nn.Module, rank: int, lr: float,
                  weight_decay: float | None) -> Restored:
    """PBT's exploit: the donor's weights, optimizer, schedule and epoch, this trial's own
    tracker (its best so far stays its best), the rates scaled to this trial's mutated lr."""
    import ray.train

    checkpoint = ray.train.Checkpoint(path)
    weights, state, _ = load_intact(checkpoint)
    metadata = load_checkpoint_metadata(checkpoint)
    model.load_state_dict(trained_weights(weights, state))
    donor = metadata["config"]["train"]
    if rank == 0:
        logging.getLogger(__name__).warning(
            "continuing from %s's weights after its epoch %s (exploit), lr %s -> %s",
            metadata["config"]["name"], state["epoch"], donor["lr"], lr)
    return Restored(int(state["epoch"]) + 1, own.tracker_state, state.get("optimizer"),
                    state.get("extras"), global_step=state.get("global_step"),
                    lineage=ancestors_of(metadata), lr_scale=lr / float(donor["lr"]),
                    weight_decay=weight_decay)


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
    ray_datasets: dict[str, Any] | None = None
    # A population-based search's trial: the lineage its saved models carry, and the epoch its
    # leg ends at (where the population is compared; None: the run's last).
    lineage: Lineage | None = None
    leg_end: int | None = None
    # Why tracker.mode (pinned by the driver) is what it is: in each saved model's metadata.
    mode_source: str = "set by tracker.mode"
    # The run's provenance (``loop.provenance``, the driver's): in each saved model's metadata.
    provenance: dict[str, Any] | None = None
    # Trained in a Tune trial's own process, not by a Ray Train worker group
    # (``orchestrator/training/one_process``): the model is moved, never wrapped.
    one_process: bool = False

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    def checkpoint_manager(self, state: ModelState, torch_weights_file: str | None = None,
                           extras: dict[str, Any] | None = None,
                           ema_state: ModelState | None = None) -> CheckpointManager:
        """This rank's checkpoint manager, for the model and optimizer ``state`` reads (see
        ``CheckpointManager`` for ``torch_weights_file``, ``extras`` and ``ema_state``)."""
        return CheckpointManager.create(
            self.cfg, state, rank_zero=self.is_rank_zero, device=self.device,
            world_size=self.world_size, tracker_state=self.restored.tracker_state,
            torch_weights_file=torch_weights_file, extras=extras,
            test_split=getattr(self.workload, "test_dataset", None) is not None,
            lineage=self.lineage, mode_source=self.mode_source, ema_state=ema_state,
            provenance=self.provenance)

    @property
    def parallel_strategy(self) -> str | None:
        """For ``ray.train.torch.prepare_model``: DDP when there is more than one rank."""
        return "ddp" if self.world_size > 1 else None

    def epochs(self, until: int | None = -1) -> Iterator[int]:
        """The epochs still to train, each with this rank's seeds set; up to ``until``
        (default train.epochs; None: no end, the caller stops)."""
        last = self.cfg.train.epochs if until == -1 else until
        if self.leg_end is not None and last is not None:
            last = min(last, self.leg_end)
        epoch = self.restored.start_epoch
        while last is None or epoch <= last:
            seed_epoch(self.cfg.seed, self.rank, epoch)
            yield epoch
            epoch += 1


def start_worker(config: dict[str, Any]) -> Worker:
    import ray.train.torch

    config = dict(config)
    stop_queue = config.pop(STOP_QUEUE_KEY, None)
    ray_datasets = config.pop(RAY_DATASETS_KEY, None)
    pbt = config.pop(PBT_KEY, None)
    mode_source = config.pop(MODE_SOURCE_KEY, None)
    provenance = config.pop(PROVENANCE_KEY, None)
    cfg = RunConfig.model_validate(config)
    quiet_ray_train_reports()
    utils = train_fn_utils()
    ctx = utils.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    random.seed(cfg.seed)  # fastai DataLoaders seed their generators from `random`
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    # A trial trained in its own process (``orchestrator/training/one_process``) names its
    # device; Ray's local mode would take any GPU the process sees.
    device = getattr(utils, "device", None) or ray.train.torch.get_device()
    check_precision(cfg.train.precision, device)
    if cfg.scaling.strategy == "ddp":
        workload.model.to(device)  # under fsdp, each rank moves only its shard there
    restored = restore(workload.model, rank, pbt, cfg.train)
    worker = Worker(cfg, rank, world_size, device, workload, restored, stop_queue, ray_datasets,
                    one_process=not utils.is_distributed())
    if mode_source:
        worker.mode_source = mode_source
    worker.provenance = provenance
    if pbt is not None:
        worker.lineage = Lineage(pbt["trial_id"], restored.lineage)
        worker.leg_end = leg_end(restored.start_epoch, pbt["interval"], cfg.train.epochs)
    return worker
