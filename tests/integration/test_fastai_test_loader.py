"""A fastai tabular Learner with a test loader, through the CLI on 2 workers: its third
DataLoader is the run's test split, scored once with the best weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import REPO, assert_close, run_cli
from workers.checkpoint.load import load_metadata, load_weights

pytestmark = pytest.mark.integration

WORKLOAD = "tests.workloads.tabular_fastai:build"


def test_a_learners_test_loader_is_scored_with_the_best_weights(tmp_path):
    import fastai.callback.progress  # noqa: F401 - registers Learner.no_bar

    from tests.workloads.tabular_fastai import build

    config = {
        "name": "tabular", "storage_path": str(tmp_path / "runs"), "seed": 0,
        "engine": "fastai", "workload": {"entrypoint": WORKLOAD, "params": {}},
        "scaling": {"num_workers": 2},
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.01},
        # The best epoch must not be the last for the test to tell the best weights from the
        # last: one_cycle anneals, so val_loss mostly improves to the end, while the training
        # loss falls from the first epoch on (each rank's tabular rows are drawn by numpy,
        # unseeded: the run is not reproducible, so the usual monitor would make this flaky).
        "tracker": {"monitor": "train_loss", "mode": "max"}, "wandb": {"mode": "disabled"},
    }
    (tmp_path / "tabular.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    proc = run_cli(["train", "tabular.yaml"], cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir = tmp_path / "runs" / "tabular"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    test = summary["test_metrics"]
    assert test is not None and set(test) == {"test_loss", "test_accuracy"}, summary
    assert "test_error" not in summary
    assert "test (best weights)" in proc.stdout and f"{test['test_accuracy']:.6g}" in proc.stdout
    best, last = summary["best_metrics"], summary["history"][-1]
    assert summary["best_epoch"] == 1 and last["val_loss"] != pytest.approx(best["val_loss"],
                                                                             rel=1e-3)
    best_dir = Path(summary["best_checkpoint"])
    assert load_metadata(best_dir)["test_split"] is True

    # One process, a fresh Learner, the best checkpoint's weights, fastai's own validate:
    # the recorded best epoch's validation metrics and the test metrics.
    learn = build()
    learn.model.load_state_dict(load_weights(best_dir))
    with learn.no_bar():
        val_loss, val_accuracy = learn.validate()
        test_loss, test_accuracy = learn.validate(ds_idx=2)
    assert_close(best["val_loss"], val_loss)
    assert_close(best["val_accuracy"], val_accuracy)
    assert_close(test["test_loss"], test_loss)
    assert_close(test["test_accuracy"], test_accuracy)
