"""A workload's mistakes found on the workers before the first epoch: one line naming what is
wrong (exit 2 from the CLI, as ``UserError`` from the API), never retried, nothing left."""

from __future__ import annotations

import time

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
}


@pytest.mark.parametrize("mistake", list(CASES))
def test_a_workload_mistake_is_one_line_before_any_epoch(tmp_path, ray_local, mistake):
    config = {"name": mistake, "storage_path": str(tmp_path / "runs"),
              "workload": {"entrypoint": "tests.workloads.mistakes:build",
                           "params": {"mistake": mistake}},
              "scaling": {"num_workers": 2}, "train": {"epochs": 3, "batch_size": 8},
              # A retry would not help: user errors are never retried, whatever this says.
              "failure": {"max_failures": 2}, "wandb": {"mode": "disabled"}}
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        train(config)
    message = str(err.value)
    assert CASES[mistake] in message, message
    assert "\n" not in message
    assert time.monotonic() - started < 60  # no retry
    assert not (tmp_path / "runs" / mistake).exists()  # nothing of a run that never could work
