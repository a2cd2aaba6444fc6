"""Population-based training on real Ray Tune trials (1 worker each): the worst trial
continues from the best one's weights with a perturbed learning rate, its record and its
saved models say so (the lineage, the rate), no trial's best is lost, and the overall best
re-scores to row 0 of the leaderboard, in W&B with its lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.search.runner import run_search
from tests.integration.conftest import REPO, overfit_config, wait_for
from tests.integration.test_search_optuna import best_agrees_everywhere
from tests.integration.test_wandb import wandb_env  # noqa: F401
from workers.checkpoint.load import load_metadata
from workers.contract.config import RunConfig

pytestmark = pytest.mark.integration


def pbt_config(root: Path, name: str, wandb: str = "disabled", **tune: object) -> RunConfig:
    data = overfit_config(root, name=name, scaling={"num_workers": 1},
                          train={"epochs": 4, "batch_size": 16},
                          wandb={"mode": wandb}).to_dict()
    data["tune"] = {"scheduler": "pbt", "perturbation_interval": 2, "num_samples": 4,
                    "max_concurrent_trials": 2, "seed": 5,
                    "search_space": {"train.lr": {"loguniform": [0.0002, 0.05]}}, **tune}
    return RunConfig.model_validate(data)


def test_a_pbt_search_exploits_keeps_every_best_and_records_the_lineage(
        wandb_env, ray_local):  # noqa: F811
    cfg = pbt_config(wandb_env, "pbt", wandb="offline")
    board = run_search(cfg)
    experiment = Path(cfg.storage_path) / "pbt"
    trials = experiment / "trials"

    # At epoch 2 the worst of the 4 trials continued from the best one's checkpoint.
    exploits = json.loads((experiment / "pbt.json").read_text())["exploits"]
    assert exploits, "no exploit"
    summaries = {row["trial_id"]: json.loads((trials / row["trial_id"] / "summary.json")
                                             .read_text()) for row in board}
    at_2 = {t: next(h for h in s["history"] if h["epoch"] == 2)["val_loss"]
            for t, s in summaries.items()}
    first = exploits[0]
    assert first["epoch"] == 2
    assert first["trial_id"] == max(at_2, key=at_2.get)
    assert first["from_trial"] == min(at_2, key=at_2.get)
    before, after = first["before"]["train.lr"], first["after"]["train.lr"]
    assert after != before

    # Its record: every epoch once, its own rate for epochs 1-2, the donor's perturbed one
    # after; its last saved model's lineage runs through the donor's first two epochs.
    exploiter = summaries[first["trial_id"]]
    history = exploiter["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["lr"] for h in history[:2]] == pytest.approx([before] * 2, rel=1e-6)
    assert [h["lr"] for h in history[2:]] == pytest.approx([after] * 2, rel=1e-6)
    latest = max((d for d in (trials / first["trial_id"]).glob("checkpoint_*") if d.is_dir()),
                 key=lambda d: load_metadata(d)["epoch"])
    assert load_metadata(latest)["lineage"] == [
        {"trial_id": first["from_trial"], "epochs": [1, 2]},
        {"trial_id": first["trial_id"], "epochs": [3, 4]}]
    copy = Path(first["copy"])
    assert copy.parent == trials / first["trial_id"] and (copy / "model.safetensors").is_file()

    # No trial's best is lost: each one's best checkpoint is on disk, holds the best of its
    # whole history, and re-scores to it.
    for trial_id, summary in summaries.items():
        assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4], trial_id
        best = min(h["val_loss"] for h in summary["history"])
        assert summary["best_metrics"]["val_loss"] == best, trial_id
        saved = Path(summary["best_checkpoint"])
        assert load_metadata(saved)["epoch"] == summary["best_epoch"], trial_id
        assert load_metadata(saved)["lineage"][-1]["trial_id"] == trial_id

    # The overall best: row 0 of a sorted leaderboard, exported, re-scored in one process to
    # its value, and in W&B with its lineage.
    assert len(board) == 4
    assert best_agrees_everywhere(experiment, board)["lineage"]


@pytest.mark.parametrize(("change", "message"), [
    ({"search_space": {"workload.params.separation": {"uniform": [0.1, 1.0]}}},
     "error: tune.search_space.workload.params.separation: pbt cannot change it"),
    ({"perturbation_interval": 4}, "error: tune.perturbation_interval: 4 epochs is not shorter"),
])
def test_what_pbt_cannot_do_is_one_line_before_any_trial(tmp_path, change, message):
    cfg = pbt_config(tmp_path, "bad").to_dict()
    cfg["tune"].update(change)
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "tune", "tune.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_pbt_search_stopped_by_sigterm_resumes_with_its_exploits(tmp_path):
    """SIGTERM to the search's driver (by its pid) once the first exploit is recorded, then
    --resume: every trial ends with each epoch once, the exploiting trial trains on with the
    exploit's learning rate from the donor's weights, and the resume says there are no further
    exploits."""
    cfg = pbt_config(tmp_path, "pbt-resume").to_dict()
    # Legs take seconds, not the fraction of one they take in a trial's own process: the
    # search is still running when the signal lands (a step's sleep changes no number).
    cfg["workload"]["params"]["step_seconds"] = 0.3
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "orchestrator", "tune", "tune.yaml"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    experiment = tmp_path / "runs" / "pbt-resume"
    first = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: (experiment / "pbt.json").exists() or first.poll() is not None, 600,
             "the first exploit")
    assert first.poll() is None, first.communicate()
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].endswith("orchestrator tune tune.yaml --resume"), err

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, text=True,
                             capture_output=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed PBT search: each unfinished trial continues" in resumed.stdout
    exploit = json.loads((experiment / "pbt.json").read_text())["exploits"][0]
    for trial in ("trial-000", "trial-001", "trial-002", "trial-003"):
        summary = json.loads((experiment / "trials" / trial / "summary.json").read_text())
        assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4], trial
        if trial == exploit["trial_id"]:
            lrs = [h["lr"] for h in summary["history"]]
            assert lrs[2:] == pytest.approx([exploit["after"]["train.lr"]] * 2, rel=1e-6)
            latest = max((d for d in (experiment / "trials" / trial).glob("checkpoint_*")
                          if d.is_dir()), key=lambda d: load_metadata(d)["epoch"])
            assert load_metadata(latest)["lineage"][0] == {
                "trial_id": exploit["from_trial"], "epochs": [1, 2]}
