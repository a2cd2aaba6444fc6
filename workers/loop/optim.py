"""How the torch engine optimises: the optimizer, the learning-rate schedule, and each
optimizer step (micro-batches accumulated, gradients clipped).

The schedule is a ``LambdaLR`` whose factor is a ``Schedule``: a plain object, so that the
scheduler's ``state_dict`` (saved in resume checkpoints) holds only numbers, and its length
can be set again when a resumed run has a different number of steps per epoch (an elastic
run that resized). A workload may bring its own ``optimizer(model)`` and
``scheduler(optimizer, total_steps)`` instead.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from workers.contract.config import RunConfig
from workers.contract.user_errors import UserInputError
from workers.loop.batches import blamed_on

# one_cycle's ends, as torch.optim.lr_scheduler.OneCycleLR's defaults: it starts at lr/25 and
# ends at lr/25/1e4; its rise is 30% of the steps unless warmup_steps says otherwise.
ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV, ONE_CYCLE_RISE = 25.0, 1e4, 0.3
# The length of a schedule whose run has no known last step (a stream trained for epochs,
# ``loop.iterable``): only those that never reach their end are allowed there (constant after
# its warmup, step with its step_size).
UNSIZED = 2**62


def built_in_optimizer(cfg: RunConfig, params: Any) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def make_optimizer(cfg: RunConfig, workload: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The workload's ``optimizer(model)`` (``model``: the module whose parameters train, sharded
    already under fsdp), else the built-in one of ``train.optimizer``."""
    make = getattr(workload, "optimizer", None)
    if make is None:
        return built_in_optimizer(cfg, model.parameters())
    with blamed_on("workload.optimizer(model) raised"):
        optimizer = make(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserInputError(f"workload.optimizer: returned a {type(optimizer).__name__}, not "
                             "a torch.optim.Optimizer (e.g. torch.optim.AdamW(model.parameters()"
                             ", lr=...))")
    return optimizer


@dataclass
class Schedule:
    """The factor of ``lr`` at optimizer step ``step`` (0-based), as ``LambdaLR`` asks."""

    kind: str
    warmup: int
    total: int
    step_size: int = 1
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        step = min(step, self.total - 1)  # past the end (never, sized right): the last rate
        if self.kind == "one_cycle":
            return self._one_cycle(step)
        if step < self.warmup:
            return step / max(1, self.warmup)
        after = step - self.warmup
        if self.kind == "linear":
            return max(0.0, (self.total - step) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            progress = after / max(1, self.total - self.warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if self.kind == "step":
            return self.gamma ** (after // self.step_size)
        return 1.0

    def _one_cycle(self, step: int) -> float:
        """OneCycleLR's rates (cosine annealing, two phases), as a factor of the peak."""
        start = 1.0 / ONE_CYCLE_DIV
        end = start / ONE_CYCLE_FINAL_DIV
        rise = self.warmup if self.warmup else ONE_CYCLE_RISE * self.total
        peak_step = float(rise) - 1
        if step <= peak_step:
            return cos_anneal(start, 1.0, step / peak_step)
        return cos_anneal(1.0, end, (step - peak_step) / (self.total - 1 - peak_step))


def cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def check_warmup(cfg: RunConfig, total: int, per_epoch: int | None) -> None:
    """``total``: the run's optimizer steps, train.max_steps or (``per_epoch``: this rank's
    steps per epoch) the epochs'; ``per_epoch`` None: a stream's run, whose steps per epoch
    no rank knows (its ``total`` is train.max_steps)."""
    t = cfg.train
    limit = total - 1 if cfg.schedule == "one_cycle" else total
    if t.max_steps or per_epoch is None:
        why = f"train.max_steps: {t.max_steps}"
        more = "a larger train.max_steps"
    else:
        why = (f"{per_epoch} per epoch on each worker (its batches / train.grad_accum_steps "
               f"{t.grad_accum_steps}) x train.epochs {t.epochs}")
        more = "more epochs"
    if t.warmup_steps > limit:
        raise UserInputError(
            f"train.warmup_steps: {t.warmup_steps} is more than this run's {total} optimizer "
            f"steps ({why}); use at most {limit}")
    if cfg.schedule == "one_cycle" and not t.warmup_steps and ONE_CYCLE_RISE * total < 2:
        raise UserInputError(f"train.schedule: one_cycle needs at least 7 optimizer steps, "
                             f"this run has {total} ({why}); use constant or {more}")


def built_in_schedule(cfg: RunConfig, total: int) -> Schedule:
    """``total``: the run's optimizer steps (``UNSIZED``: unknown)."""
    t = cfg.train
    step_size = t.step_size or max(1, (total - t.warmup_steps) // 3)
    return Schedule(cfg.schedule, t.warmup_steps, total, step_size, t.step_gamma)


class Stepper:
    """One optimizer step per ``grad_accum_steps`` micro-batches: the gradients summed (each
    micro-batch's loss divided by the number in its step), synchronised between ranks only
    on the last one, clipped, then the optimizer and the schedule stepped."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 schedule: Schedule | None = None, *, accum: int = 1,
                 clip: float | None = None) -> None:
        self.optimizer, self.scheduler, self.schedule = optimizer, scheduler, schedule
        self.accum, self.clip = accum, clip
        self.last_lr = float(optimizer.param_groups[0]["lr"])

    @property
    def steps_done(self) -> int:
        return int(getattr(self.scheduler, "last_epoch", 0)) if self.scheduler else 0

    def steps_per_epoch(self, batches: int) -> int:
        return math.ceil(batches / self.accum)

    def group(self, index: int, batches: int) -> tuple[int, bool]:
        """(micro-batches in the step batch ``index`` belongs to, whether it is the last)."""
        first = index - index % self.accum
        size = min(self.accum, batches - first)
        return size, index == first + size - 1

    @contextlib.contextmanager
    def micro_batch(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """Gradients synchronised on the last micro-batch of a step only (DDP's ``no_sync``,
        FSDP2's ``set_requires_gradient_sync``)."""
        # Methods of the wrapped model, not of nn.Module (whose __getattr__ types them as
        # Tensor | Module).
        set_sync = getattr(model, "set_requires_gradient_sync", None)
        no_sync = getattr(model, "no_sync", None)
        if set_sync is not None:  # FSDP2
            set_sync(last)
            yield
        elif not last and no_sync is not None:  # DDP
            with no_sync():
                yield
        else:
            yield

    def step(self, model: torch.nn.Module) -> None:
        if self.clip is not None:
            clip_grad_norm(model.parameters(), self.clip)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_objects(self) -> dict[str, Any]:
        """What resume checkpoints keep besides the weights and the optimizer."""
        return {"scheduler": self.scheduler} if self.scheduler is not None else {}

    def restore(self, extras: dict[str, Any] | None, steps_before: int,
                steps_left: int | None) -> None:
        """The schedule where the run stopped: its saved state (a resume checkpoint), else
        stepped forward to ``steps_before``, the steps of the epochs already trained (a model
        checkpoint). ``steps_left``: the rest of the run's steps at this worker count, which
        the built-in schedule's curve is stretched or shrunk to (an elastic run resized, or
        train.epochs raised for a --resume); None: unknown (a stream's), the curve as built."""
        if self.scheduler is None:
            return
        saved = (extras or {}).get("scheduler")
        if saved is not None:
            self.scheduler.load_state_dict(saved)
        else:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore")
                for _ in range(steps_before - self.steps_done):
                    self.scheduler.step()
        if self.schedule is not None and steps_left is not None:
            # A resized run (or more epochs): the curve now ends at this run's last step.
            self.schedule.total = self.steps_done + steps_left
            self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._set_lrs(self.schedule)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])

    def mutate(self, lr_scale: float | None, weight_decay: float | None) -> None:
        """PBT's explore, after the donor's optimizer and schedule were restored: every rate
        (and the schedule's base rates, so that its curve goes on at the new level) times
        ``lr_scale``; ``weight_decay`` set where the optimizer has one."""
        for group in self.optimizer.param_groups:
            if lr_scale is not None:
                group["lr"] *= lr_scale
                if "initial_lr" in group:
                    group["initial_lr"] *= lr_scale
            if weight_decay is not None and "weight_decay" in group:
                group["weight_decay"] = weight_decay
        if lr_scale is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [base * lr_scale for base in self.scheduler.base_lrs]
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])

    def _set_lrs(self, schedule: Schedule) -> None:
        """The rates of the restored step, from the schedule as it is now."""
        step = self.scheduler.last_epoch
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                               strict=True):
            group["lr"] = base * schedule(step)


def clip_grad_norm(parameters: Any, max_norm: float) -> torch.Tensor:
    """Clip by the global L2 norm of every gradient. Under fsdp each rank holds a shard of each
    gradient (a DTensor): the norm is then reduced across the shards before clipping."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    full_tensor = getattr(total, "full_tensor", None)
    if full_tensor is not None:  # a DTensor: each rank's part of the sum
        total = full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def make_stepper(cfg: RunConfig, workload: Any, optimizer: torch.optim.Optimizer,
                 total: int | None, per_epoch: int | None) -> Stepper:
    """The built-in schedule (sized to ``total`` optimizer steps), or the workload's
    ``scheduler(optimizer, total_steps)``. ``total`` None: a run whose steps are not known
    ahead (a stream trained for epochs, ``loop.iterable.check_iterable_run`` allowed its
    schedule); a workload's scheduler then gets ``total_steps=None``."""
    accum, clip = cfg.train.grad_accum_steps, cfg.train.grad_clip_norm
    make = getattr(workload, "scheduler", None)
    if make is not None:
        with blamed_on("workload.scheduler(optimizer, total_steps) raised"):
            scheduler = make(optimizer, total)
        if not callable(getattr(scheduler, "step", None)) or not callable(
                getattr(scheduler, "state_dict", None)):
            raise UserInputError(f"workload.scheduler: returned a {type(scheduler).__name__}, "
                                 "not a learning-rate scheduler (one with step() and "
                                 "state_dict(), e.g. torch.optim.lr_scheduler.LambdaLR)")
        return Stepper(optimizer, scheduler, accum=accum, clip=clip)
    if total is not None:
        check_warmup(cfg, total, per_epoch)
    if cfg.schedule == "constant" and not cfg.train.warmup_steps:
        return Stepper(optimizer, accum=accum, clip=clip)
    schedule = built_in_schedule(cfg, UNSIZED if total is None else total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Stepper(optimizer, scheduler, schedule, accum=accum, clip=clip)
