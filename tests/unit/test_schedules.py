"""The torch engine's learning-rate schedules, step by step, against the schedulers people
already trust: transformers' ``get_*_schedule_with_warmup`` and PyTorch's own ``OneCycleLR``
and ``StepLR``, driven by hand. Also: a restored schedule continues the same curve (from
its saved state, or stepped forward from a model-only checkpoint), a resized run's curve
ends at its new last step, and the workload's own optimizer and scheduler are taken, or
refused in one line."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from workers.contract.config import RunConfig
from workers.contract.user_errors import UserInputError
from workers.loop.optim import Stepper, make_optimizer, make_stepper

LR, TOTAL = 0.01, 60
REFERENCE = {"constant": get_constant_schedule_with_warmup,
             "linear": get_linear_schedule_with_warmup,
             "cosine": get_cosine_schedule_with_warmup}


def config(**train) -> RunConfig:
    return RunConfig.model_validate({"workload": {"entrypoint": "m:f"},
                                     "train": {"lr": LR, "optimizer": "sgd", **train}})


def fresh_optimizer() -> torch.optim.Optimizer:
    torch.manual_seed(0)
    return torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=LR)


def rates(stepper: Stepper, steps: int) -> list[float]:
    """The rate each optimizer step uses (``last_lr`` after it), as the loop steps it."""
    out = []
    for _ in range(steps):
        stepper.step(torch.nn.Linear(1, 1))  # no gradients: only the rate moves
        out.append(stepper.last_lr)
    return out


def reference_rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def ours(cfg: RunConfig, total: int = TOTAL) -> Stepper:
    return make_stepper(cfg, object(), fresh_optimizer(), total, total // 3)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_warmup_and_decay_equal_transformers_schedulers_at_every_step(kind, warmup):
    cfg = config(schedule=kind, warmup_steps=warmup)
    expected = reference_rates(REFERENCE[kind](fresh_optimizer(), warmup, TOTAL)
                               if kind != "constant"
                               else REFERENCE[kind](fresh_optimizer(), warmup), TOTAL)
    got = rates(ours(cfg), TOTAL)
    assert got == pytest.approx(expected, abs=1e-9)
    if warmup:
        assert got[0] == 0.0 and got[warmup] == pytest.approx(LR)  # from 0 to lr


@pytest.mark.parametrize("warmup", [0, 12])
def test_one_cycle_equals_pytorchs_one_cycle_lr(warmup):
    cfg = config(schedule="one_cycle", warmup_steps=warmup)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        fresh_optimizer(), max_lr=LR, total_steps=TOTAL, cycle_momentum=False,
        pct_start=warmup / TOTAL if warmup else 0.3)
    got = rates(ours(cfg), TOTAL)
    assert got == pytest.approx(reference_rates(reference, TOTAL), abs=1e-9)
    assert max(got) == pytest.approx(LR)


def test_step_decays_as_pytorchs_step_lr():
    cfg = config(schedule="step", step_size=7, step_gamma=0.5)
    reference = torch.optim.lr_scheduler.StepLR(fresh_optimizer(), step_size=7, gamma=0.5)
    assert rates(ours(cfg), TOTAL) == pytest.approx(reference_rates(reference, TOTAL), abs=1e-9)
    default = rates(ours(config(schedule="step")), TOTAL)  # a third of the steps, x 0.1
    assert default[19] == pytest.approx(LR) and default[20] == pytest.approx(LR * 0.1)


@pytest.mark.parametrize("saved", [True, False], ids=["resume checkpoint", "model checkpoint"])
def test_a_restored_schedule_continues_the_same_curve(saved):
    cfg = config(schedule="cosine", warmup_steps=5)
    whole = rates(ours(cfg), TOTAL)
    first = ours(cfg)
    before = rates(first, 25)
    extras = {"scheduler": first.scheduler.state_dict()} if saved else None
    again = ours(cfg)
    again.restore(extras, steps_before=25, steps_left=TOTAL - 25)
    assert again.last_lr == pytest.approx(whole[25], abs=1e-12)
    assert before + rates(again, TOTAL - 25) == pytest.approx(whole, abs=1e-12)


def test_a_resized_run_ends_its_curve_at_its_new_last_step():
    """20 steps done, then (fewer workers) 50 left instead of 40: the cosine reaches 0 at
    step 70 - 1, continuing from where it stood."""
    cfg = config(schedule="cosine")
    first = ours(cfg)
    rates(first, 20)
    resized = ours(cfg)
    resized.restore({"scheduler": first.scheduler.state_dict()}, 20, 50)
    assert resized.schedule.total == 70
    rest = rates(resized, 50)
    expected = reference_rates(get_cosine_schedule_with_warmup(fresh_optimizer(), 0, 70), 70)
    assert rest == pytest.approx(expected[20:], abs=1e-9)


def test_constant_without_warmup_has_no_scheduler():
    stepper = ours(config())
    assert stepper.scheduler is None and rates(stepper, 3) == [LR] * 3


@pytest.mark.parametrize(("train", "message"), [
    ({"schedule": "cosine", "warmup_steps": 61}, "train.warmup_steps: 61 is more than this "
     "run's 60 optimizer steps (20 per epoch on each worker"),
    ({"schedule": "one_cycle", "warmup_steps": 60}, "train.warmup_steps: 60 is more than"),
])
def test_more_warmup_than_steps_is_one_line(train, message):
    with pytest.raises(UserInputError) as info:
        ours(config(**train))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_grad_accum_steps_below_one_is_refused_by_the_config():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="grad_accum_steps"):
        config(grad_accum_steps=0)


def test_micro_batches_group_into_steps_with_a_shorter_last_one():
    stepper = Stepper(fresh_optimizer(), accum=4)
    groups = [stepper.group(i, 10) for i in range(10)]
    assert [size for size, _ in groups] == [4] * 8 + [2, 2]
    assert [i for i, (_, last) in enumerate(groups) if last] == [3, 7, 9]
    assert stepper.steps_per_epoch(10) == 3


class ParameterGroups:
    """A workload that brings its optimizer (no weight decay on biases) and scheduler."""

    def optimizer(self, model):
        decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=0.5)

    def scheduler(self, optimizer, total_steps):
        self.total_steps = total_steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total_steps)


def test_the_workloads_optimizer_and_scheduler_are_used():
    workload, model = ParameterGroups(), torch.nn.Linear(3, 2)
    optimizer = make_optimizer(config(), workload, model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    stepper = make_stepper(config(), workload, optimizer, 10, 5)
    assert workload.total_steps == 10 and stepper.schedule is None
    assert rates(stepper, 3) == pytest.approx([0.5, 0.45, 0.4])


@pytest.mark.parametrize(("attribute", "made", "message"), [
    ("optimizer", lambda model: [torch.zeros(1)], "workload.optimizer: returned a list, not a "
     "torch.optim.Optimizer"),
    ("optimizer", lambda model: 1 / 0, "workload.optimizer(model) raised (ZeroDivisionError"),
    ("scheduler", lambda optimizer, total: 0.1, "workload.scheduler: returned a float, not a "
     "learning-rate scheduler"),
])
def test_a_workload_optimizer_or_scheduler_that_is_not_one_is_one_line(attribute, made,
                                                                        message):
    class Workload:
        pass

    workload = Workload()
    setattr(workload, attribute, made)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UserInputError) as info:
        optimizer = make_optimizer(config(), workload, model)
        make_stepper(config(), workload, optimizer, 10, 5)
    assert str(info.value).startswith(message)
