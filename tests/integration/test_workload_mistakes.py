"""A workload's mistakes found on the workers before the first epoch, through a real Ray run:
one line naming what is wrong (exit 2 from the CLI, as ``UserError`` from the API), never
retried, nothing left. A mistake of each of the two places the workers find them: building
the workload, and setting up its loop (its first batch, its metrics, its optimizer, the run's
steps: every such mistake's message, from the same worker code in one process, in
``tests/unit/test_workload_mistakes.py``)."""

from __future__ import annotations

import os

import pytest

from orchestrator import train
from orchestrator.errors import UserError
from tests.workloads.mistakes import EXPECTED, TRAIN, TRAIN_OF

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mistake", ["build_raises", "warmup_too_long", "metric_for_3_classes"])
def test_a_workload_mistake_is_one_line_before_any_epoch(tmp_path, ray_local, mistake):
    calls = tmp_path / "calls"
    config = {"name": mistake, "storage_path": str(tmp_path / "runs"),
              "workload": {"entrypoint": "tests.workloads.mistakes:build",
                           "params": {"mistake": mistake, "calls": str(calls)}},
              "scaling": {"num_workers": 1},
              "train": {**TRAIN, **TRAIN_OF.get(mistake, {})},
              # A retry would not help: user errors are never retried, whatever this says.
              "failure": {"max_failures": 2}, "wandb": {"mode": "disabled"}}
    with pytest.raises(UserError) as err:
        train(config)
    message = str(err.value)
    assert EXPECTED[mistake] in message, message
    assert "\n" not in message
    # Built once by the worker, never again: no retry (max_failures would allow 2). The
    # driver (this process) builds it once too, to find Ray Dataset splits, when the build
    # gets that far; a build that raises is one line from there already.
    workers = [pid for pid in calls.read_text().split() if pid != str(os.getpid())]
    assert len(workers) == (0 if mistake == "build_raises" else 1), calls.read_text()
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
