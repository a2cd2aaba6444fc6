"""A workload's mistakes found on the workers before the first epoch: one line naming what is
wrong (exit 2 from the CLI, as ``UserError`` from the API), never retried, nothing left."""

from __future__ import annotations

import pytest

from orchestrator import train
from orchestrator.errors import UserError

pytestmark = pytest.mark.integration

CASES = {
    "build_raises": "raised ModuleNotFoundError: No module named 'a_package_these_workers_lack'",
    "wrong_input": "workload.model: it cannot take a batch of {features: tensor(",
    "collate_fails": "workload.collate_fn: it fails on the first sample (KeyError",
    "no_logits": "is neither a tensor nor has logits",
    "no_loss": "has no 'loss'",
    "averaged_metric": "cannot be synced exactly across workers: its state(s) value (mean)",
    "not_an_optimizer": "workload.optimizer: returned a list, not a torch.optim.Optimizer",
    # the config's mistake, found once the workers know the run's steps
    "warmup_too_long": "train.warmup_steps: 1000 is more than this run's 9 optimizer steps (3 "
                       "per epoch on each worker",
}
CONFIGS = {"warmup_too_long": {"schedule": "cosine", "warmup_steps": 1000}}


@pytest.mark.parametrize("mistake", list(CASES))
def test_a_workload_mistake_is_one_line_before_any_epoch(tmp_path, ray_local, mistake):
    calls = tmp_path / "calls"
    config = {"name": mistake, "storage_path": str(tmp_path / "runs"),
              "workload": {"entrypoint": "tests.workloads.mistakes:build",
                           "params": {"mistake": mistake, "calls": str(calls)}},
              "scaling": {"num_workers": 1},
              "train": {"epochs": 3, "batch_size": 16, **CONFIGS.get(mistake, {})},
              # A retry would not help: user errors are never retried, whatever this says.
              "failure": {"max_failures": 2}, "wandb": {"mode": "disabled"}}
    with pytest.raises(UserError) as err:
        train(config)
    message = str(err.value)
    assert CASES[mistake] in message, message
    assert "\n" not in message
    # Built once by the worker, never again: no retry (max_failures would allow 2).
    assert len(calls.read_text().split()) == 1
    assert not (tmp_path / "runs" / mistake).exists()  # nothing of a run that never could work


def test_a_loop_that_never_reports_is_one_line_after_its_first_epoch(tmp_path, ray_local):
    config = {"name": "silent", "storage_path": str(tmp_path / "runs"), "engine": "loop",
              "workload": {"entrypoint": "tests.workloads.mistakes:build",
                           "params": {"mistake": "never_reports"}},
              "scaling": {"num_workers": 2}, "train": {"epochs": 3, "batch_size": 8},
              "failure": {"max_failures": 2}, "wandb": {"mode": "disabled"}}
    with pytest.raises(UserError) as err:
        train(config)
    assert str(err.value) == (
        "workload.loop tests.workloads.mistakes.never_reports: epoch 1 ended without "
        "ctx.report(metrics); report once per epoch, after ctx.evaluate(...)")
    assert not list((tmp_path / "runs").rglob("checkpoint_*"))
