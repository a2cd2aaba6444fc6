"""A torch ``IterableDataset`` as the training split (and as the validation and test splits),
run as a user runs it: ``python -m orchestrator train`` on 2 workers (a local Ray of its own).

The stream has 203 items, so the ranks' shares are uneven (102 and 101); the model has
BatchNorm and dropout. The run must end, and the kept model, re-scored in ONE process, must
give the recorded best validation metrics and the summary's test metrics (to 1e-6 relative):
each rank scored its own share of each streamed split, every row once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.integration.conftest import REPO, assert_close
from tests.workloads.iterable import build
from workers.checkpoint.load import load_weights
from workers.loop.metric_setup import workload_metrics
from workers.loop.scoring import evaluate_dataset

pytestmark = pytest.mark.integration

CONFIG = {
    "name": "stream",
    "workload": {"entrypoint": "tests.workloads.iterable:build", "params": {}},
    "scaling": {"num_workers": 2},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.01},
    "tracker": {"monitor": "val_loss"},
    "wandb": {"mode": "disabled"},
}


def run_cli(tmp_path: Path, *args: str, checkpoint: dict | None = None,
            **train: object) -> subprocess.CompletedProcess:
    cfg = {**CONFIG, "storage_path": str(tmp_path / "runs"),
           "train": {**CONFIG["train"], **train}, "checkpoint": checkpoint or {}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "orchestrator", "train", "cfg.yaml", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)


def test_a_stream_trains_and_its_kept_model_scores_as_recorded(tmp_path):
    proc = run_cli(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "stream" / "summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["status"] == "completed"
    # Every epoch ends with its stream: 7 optimizer steps on each rank (102 and 101 items in
    # batches of 16: 6 full ones and a last of 6 or 5).
    assert [r["global_step"] for r in summary["history"]] == [7, 14, 21]

    workload = build()
    workload.model.load_state_dict(load_weights(summary["best_checkpoint"]))
    for split, expected in (("val", summary["best_metrics"]), ("test", summary["test_metrics"])):
        metrics = workload_metrics(workload, 3)
        scored = evaluate_dataset(workload.model, getattr(workload, f"{split}_dataset"),
                                  workload.loss_fn, metrics, split=split, batch_size=16,
                                  device=torch.device("cpu"))
        assert set(scored) == {f"{split}_loss", f"{split}_accuracy"}
        for key, value in scored.items():
            assert_close(value, expected[key])


def test_a_schedule_over_unknown_steps_is_refused_before_training(tmp_path):
    proc = run_cli(tmp_path, schedule="cosine")
    assert proc.returncode == 2, proc.stderr[-4000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "train.schedule: cosine is laid out over the run's total optimizer steps" in line
    assert "set train.max_steps" in line


def test_a_resume_mid_epoch_skips_the_items_trained(tmp_path):
    """Evaluations (each a full-state checkpoint) every 5 steps, 10 steps: the last one falls
    at epoch 2's third step (7 a epoch), after the stream's first 3 x 16 x 2 = 96 items of that
    epoch. A --resume with more steps goes on from there, saying so in one line."""
    every = {"eval_every_n_steps": 5, "schedule": "constant"}
    keep = {"policy": "all", "resume_every_n_epochs": 1}
    first = run_cli(tmp_path, checkpoint=keep, max_steps=10, **every)
    assert first.returncode == 0, first.stderr[-4000:]
    # -v: the workers' log lines reach the terminal (by default only the driver's do).
    resumed = run_cli(tmp_path, "--resume", "-v", checkpoint=keep, max_steps=17, **every)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    said = [line for line in (resumed.stdout + resumed.stderr).splitlines()
            if "of an IterableDataset training split" in line]
    assert len(said) == 1 and ("resuming epoch 2 of an IterableDataset training split: its "
                               "first 96 items") in said[0], said
    summary = json.loads((tmp_path / "runs" / "stream" / "summary.json").read_text())
    # Epoch 2 went on with its last 4 steps (11-14: 54 and 53 items left on the ranks), so
    # step 15 is epoch 3's first; had the epoch restarted, it would have been epoch 2's.
    assert [(r["epoch"], r["global_step"]) for r in summary["history"]] == [
        (1, 5), (2, 10), (3, 15), (3, 17)]
