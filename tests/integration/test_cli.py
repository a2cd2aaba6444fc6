"""The command line as a user runs it: a subprocess that starts its own local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import REPO, assert_close
from workers.checkpoint.load import load_weights
from workers.contract.config import RunConfig
from workers.loop.metric_setup import workload_metrics
from workers.loop.scoring import evaluate_dataset
from workers.workloads.digits import build as build_digits

pytestmark = pytest.mark.integration


def run_cli(*args: str, cwd: Path, timeout: int = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_default_digits_run_and_best(tmp_path):
    runs = tmp_path / "runs"
    home = tmp_path / "home"  # no W&B credentials (no ~/.netrc, no key): the default goes offline
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = run_cli("train", str(REPO / "configs/digits.yaml"), "--set", f"storage_path={runs}",
                   "--set", "train.epochs=4", cwd=tmp_path, env={**env, "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best epoch" in proc.stdout and "best model:" in proc.stdout

    summary = json.loads((runs / "digits-mlp" / "summary.json").read_text())
    assert summary["epochs_completed"] == 4 and summary["test_metrics"] is not None
    # The built-in default logs an offline W&B run beside the model, with the best epoch.
    assert summary["wandb"]["mode"] == "offline", summary["wandb"]
    wandb_run = Path(summary["wandb"]["run"])
    assert wandb_run.is_relative_to(runs / "digits-mlp")
    assert f"wandb sync {wandb_run}" in proc.stdout
    inspected = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect",
                                "--json", "--summary", str(wandb_run)],
                               capture_output=True, text=True, timeout=120, check=True)
    wb_summary = json.loads(inspected.stdout)["summary"]
    assert wb_summary["best_epoch"] == summary["best_epoch"]
    assert wb_summary["best_val_loss"] == summary["best_metrics"]["val_loss"]
    # A user's check: the saved weights, loaded with safetensors into the workload's model,
    # reproduce best_metrics in one plain process.
    workload = build_digits(hidden=64)
    workload.model.load_state_dict(load_weights(summary["best_checkpoint"]))
    metrics = workload_metrics(workload, 10)
    recomputed = evaluate_dataset(workload.model, workload.val_dataset, workload.loss_fn,
                                  metrics, split="val", batch_size=256,
                                  device=torch.device("cpu"))
    for key, value in recomputed.items():
        assert_close(value, summary["best_metrics"][key])

    shown = run_cli("best", str(runs / "digits-mlp"), "--json", cwd=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout) == summary
    table = run_cli("best", str(runs / "digits-mlp"), cwd=tmp_path)
    assert table.returncode == 0 and f"best epoch {summary['best_epoch']}" in table.stdout


def test_user_module_in_working_directory(tmp_path):
    """A workload next to the user's config imports in the driver and in every Ray worker,
    with no install step, and without importing this project."""
    (tmp_path / "my_task.py").write_text(textwrap.dedent("""
        from types import SimpleNamespace
        import torch

        def build(n=45):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, 4, generator=g)
            y = (x.sum(dim=1) > 0).long()
            ds = torch.utils.data.TensorDataset(x, y)
            return SimpleNamespace(model=torch.nn.Linear(4, 2), train_dataset=ds,
                                   val_dataset=ds, loss_fn=torch.nn.functional.cross_entropy)
    """))
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""
        name: mine
        workload: {entrypoint: "my_task:build", params: {n: 45}}
        train: {epochs: 2, batch_size: 16}
        tracker: {monitor: val_accuracy}
        wandb: {mode: disabled}
    """))
    proc = run_cli("train", "cfg.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    cfg = RunConfig.model_validate(summary["config"])
    assert cfg.tracker.resolved_mode == "max"
    assert set(summary["best_metrics"]) >= {"val_loss", "val_accuracy", "train_loss"}
    assert summary["test_metrics"] is None  # the workload has no test split
