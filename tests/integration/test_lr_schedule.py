"""A learning-rate schedule with warmup, accumulation and clipping in a real 2-worker run:
the rate recorded at every epoch is transformers' ``get_cosine_schedule_with_warmup`` at that
optimizer step, sized from the run's real number of steps, and it continues the same curve
after a worker SIGKILL restart and after a ``--resume`` of the run that then failed: every
epoch's validation loss equals an uninterrupted run's."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from orchestrator.errors import TrainingError
from orchestrator.training.driver import run_training
from tests.integration.conftest import assert_close, overfit_config

pytestmark = pytest.mark.integration

EPOCHS, WARMUP = 6, 3
# 32 samples, 16 per worker, batches of 4, 2 micro-batches a step: 2 optimizer steps an epoch.
STEPS_PER_EPOCH = 2
TRAIN = {"epochs": EPOCHS, "batch_size": 4, "lr": 0.01, "schedule": "cosine",
         "warmup_steps": WARMUP, "grad_accum_steps": 2, "grad_clip_norm": 0.5}


def reference_rates() -> list[float]:
    """The rate of each optimizer step, from transformers' scheduler driven by hand."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=TRAIN["lr"])
    scheduler = get_cosine_schedule_with_warmup(optimizer, WARMUP, EPOCHS * STEPS_PER_EPOCH)
    rates = []
    for _ in range(EPOCHS * STEPS_PER_EPOCH):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_schedule_continues_its_curve_after_a_restart_and_a_resume(tmp_path, ray_local):
    common = {"train": TRAIN, "checkpoint": {"resume_every_n_epochs": 1}}
    reference = run_training(overfit_config(tmp_path, name="reference", **common))
    rates = reference_rates()
    expected = [rates[epoch * STEPS_PER_EPOCH - 1] for epoch in range(1, EPOCHS + 1)]
    assert [h["lr"] for h in reference["history"]] == pytest.approx(expected, abs=1e-9)

    # A worker SIGKILLs itself in epoch 3 (its 9th micro-batch): Ray restarts the workers
    # from epoch 2. Then rank 0 is SIGKILLed writing epoch 5's model: no restart is left
    # (max_failures 1), the run fails, and --resume continues it from epoch 4.
    marker = tmp_path / "killed"
    interrupted = overfit_config(
        tmp_path, name="interrupted", failure={"max_failures": 1},
        workload={"params": {"fail_after_steps": 9, "fail_with": "sigkill",
                             "kill_writing_epoch": 5, "marker": str(marker)}}, **common)
    with pytest.raises(TrainingError):
        run_training(interrupted)
    assert marker.exists() and (tmp_path / "killed.write").exists(), "a kill did not happen"
    resumed = run_training(interrupted, resume=True)

    assert resumed["start"] == "resume" and resumed["status"] == "completed"
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, EPOCHS + 1))
    assert [h["lr"] for h in resumed["history"]] == pytest.approx(expected, abs=1e-9)
    for got, ref in zip(resumed["history"], reference["history"], strict=True):
        assert_close(got["val_loss"], ref["val_loss"], rel=1e-5)
    assert resumed["best_epoch"] == reference["best_epoch"]
