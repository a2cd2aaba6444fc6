"""``engine: loop``: a GAN-style pair with two optimizers, trained by the workload's own loop
through the CLI on 2 workers. A worker SIGKILLed mid-run (found by its pid) restarts with
both optimizers' state; the best model, re-scored in one process, equals the record; the
test split, W&B's ``best_*`` keys and the summary come as for the built-in loops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from tests.integration.conftest import REPO, RunProcesses, recorded, wait_for
from tests.integration.test_wandb import run_summary
from workers.contract.config import RunConfig
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration

EPOCHS, STEPS_PER_EPOCH = 7, 3  # 96 points, 48 per worker, batches of 16


def recorded_epochs(run_dir) -> int:
    return len(recorded(run_dir))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_optimizer_loop_restarts_with_both_and_keeps_an_exact_best(tmp_path, ray_tmp,
                                                                         strategy):
    """Under fsdp ``ctx.prepare`` shards each network; the optimizers' states are gathered
    whole into the checkpoint and sharded again on the restart."""
    config = {"name": "gan", "storage_path": str(tmp_path / "runs"), "engine": "loop",
              "workload": {"entrypoint": "tests.workloads.gan_pair:build",
                           "params": {"epoch_seconds": 1.0}},
              "scaling": {"num_workers": 2, "strategy": strategy},
              "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.002},
              "tracker": {"monitor": "val_loss"},
              "checkpoint": {"resume_every_n_epochs": 1}, "failure": {"max_failures": 1},
              "wandb": {"mode": "offline"}}
    (tmp_path / "gan.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp,
           "WANDB_DIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", "gan.yaml"],
                            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    run = RunProcesses(roots=[proc.pid], marker=ray_tmp)
    run_dir = tmp_path / "runs" / "gan"
    wait_for(lambda: recorded_epochs(run_dir) >= 2 or proc.poll() is not None, 240, "epoch 2")
    assert proc.poll() is None, proc.communicate()
    workers = run.find(r"^ray::RayTrainWorker")
    assert len(workers) == 2, workers
    os.kill(min(workers), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "a worker failed (worker " in out and "(failure 1 of 1)" in out, out
    assert "workers restarted: training again from epoch" in out, out

    summary = json.loads((run_dir / "summary.json").read_text())
    history = summary["history"]
    assert summary["status"] == "completed"
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    # Both optimizers continued from their saved state: Adam's step count never restarted.
    for record in history:
        assert record["train_steps_g"] == record["train_steps_d"] == \
            record["epoch"] * STEPS_PER_EPOCH, record

    # The best model, re-scored in one process: the record's metrics, and the test split's.
    cfg = RunConfig.model_validate(summary["config"])
    best = summary["best_checkpoint"]
    assert best and summary["best_epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]
    val = evaluate_split(cfg, best, "val")
    for key in ("val_loss", "val_accuracy"):
        assert val[key] == pytest.approx(summary["best_metrics"][key], abs=1e-6)
    assert summary["test_metrics"] == pytest.approx(evaluate_split(cfg, best, "test"), abs=1e-6)
    # W&B: the best epoch's metrics, as a built-in loop's run has them.
    wandb = run_summary(summary["wandb"]["run"])
    assert wandb["best_epoch"] == summary["best_epoch"]
    assert wandb["best_val_loss"] == pytest.approx(summary["best_metrics"]["val_loss"])
