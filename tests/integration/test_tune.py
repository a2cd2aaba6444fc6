"""Ray Tune searches: 4 real trials of 1 worker each, 2 at a time, on the 2 CPUs here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.search.runner import run_search
from tests.integration.conftest import (
    REPO,
    RunProcesses,
    assert_close,
    overfit_config,
    wait_for,
)
from tests.integration.test_wandb import artifacts, run_summary, wandb_env  # noqa: F401
from workers.checkpoint.load import load_metadata
from workers.contract.config import RunConfig
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration

# The validation loss falls as the two classes separate: the best trial is the most separated.
SEPARATIONS = [1.0, 0.7, 0.3, 0.1]  # the best first, so ASHA has something to cut against


def search_config(root: Path, name: str, **tune: object) -> RunConfig:
    cfg = overfit_config(
        root, name=name, scaling={"num_workers": 1}, train={"epochs": 4, "batch_size": 16},
        wandb={"mode": "offline"},
    )
    data = cfg.to_dict()
    data["tune"] = {"num_samples": 1, "max_concurrent_trials": 2,
                    "search_space": {"workload.params.separation": {"grid": SEPARATIONS}},
                    **tune}
    return RunConfig.model_validate(data)


def test_search_with_asha_leaderboard_wandb_and_best_model(wandb_env, ray_local):  # noqa: F811
    cfg = search_config(wandb_env, "search", scheduler="asha", grace_period=1,
                        reduction_factor=2)
    started = time.perf_counter()
    board = run_search(cfg)
    print(f"4-trial search took {time.perf_counter() - started:.1f} s")
    experiment = Path(cfg.storage_path) / "search"

    # The leaderboard is ordered by the best val_loss, which follows the separation.
    order = [row["hyperparameters"]["workload.params.separation"] for row in board]
    assert order == sorted(SEPARATIONS, reverse=True)
    losses = [row["best_val_loss"] for row in board]
    assert losses == sorted(losses)
    saved = json.loads((experiment / "leaderboard.json").read_text())
    assert [r["trial_id"] for r in saved["trials"]] == [r["trial_id"] for r in board]

    stopped = [row for row in board if row["status"] == "stopped early"]
    assert stopped, "ASHA stopped no trial"
    for row in board:
        summary = json.loads((experiment / "trials" / row["trial_id"] / "summary.json")
                             .read_text())
        history = summary["history"]
        best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
        assert row["best_epoch"] == best_epoch
        # Every trial, stopped early or not, has its best model in W&B with that epoch's data.
        logged = artifacts(row["wandb"]["run"])
        best = [a for a in logged if "best" in a["aliases"]][-1]
        assert f"epoch-{best_epoch}" in best["aliases"]
        assert best["metadata"]["val_loss"] == history[best_epoch - 1]["val_loss"]
        assert best["metadata"]["hyperparameters"] == row["hyperparameters"]
        assert best["metadata"]["trial_id"] == row["trial_id"]
        final = run_summary(row["wandb"]["run"])
        assert final["best_val_loss"] == row["best_val_loss"]
        assert final["best_epoch"] == best_epoch
    assert all(len(r["best_metrics"]) > 0 for r in stopped)

    # The exported overall best model reproduces its recorded validation loss.
    best_dir = experiment / "best_model"
    metadata = load_metadata(best_dir)
    assert metadata["trial_id"] == board[0]["trial_id"]
    assert metadata["hyperparameters"] == board[0]["hyperparameters"]
    trial_cfg = RunConfig.model_validate(metadata["config"])
    recomputed = evaluate_split(trial_cfg, best_dir, "val")
    assert_close(recomputed["val_loss"], board[0]["best_val_loss"])
    # ... and is findable in W&B: the search's own run logged it as <experiment>-best-model.
    models = [a for a in artifacts(saved["wandb"]["run"]) if a["type"] == "model"]
    assert [a["name"] for a in models] == ["search-best-model"]
    assert "best" in models[0]["aliases"]
    assert models[0]["metadata"]["trial_id"] == board[0]["trial_id"]


def kept_epochs(trial_dir: Path) -> list[int]:
    return sorted(json.loads((d / "metadata.json").read_text())["epoch"]
                  for d in trial_dir.glob("checkpoint_*") if d.is_dir())


def test_a_one_worker_trial_trains_in_its_own_process_as_a_ray_train_run_would(
        tmp_path, ray_local):
    """The default trains each one-worker trial in its Tune trial's own process; the same
    search as Ray Train runs records the same numbers to the bit: every epoch's metrics and
    verdicts, the models kept (resume checkpoints among them), the test split, the
    leaderboard. A model with BatchNorm and dropout. In the first search a trial fails once
    in its third epoch and, in its own process, trains again from its last checkpoint (each
    epoch's holds the optimizer's state: checkpoint.resume_every_n_epochs 1), as Ray Train
    restarts its worker group (failure.max_failures): its record is the same as if it had not
    failed."""
    def search(name: str, where: str, fail: bool) -> tuple[list[dict], Path]:
        data = search_config(tmp_path, name, one_worker_trials=where).to_dict()
        data["wandb"]["mode"] = "disabled"
        data["train"]["epochs"] = 5
        data["checkpoint"] = {"resume_every_n_epochs": 1}
        data["failure"] = {"max_failures": 1}
        data["workload"]["params"].update(with_test=True, norm=True, dropout=0.1)
        if fail:
            data["workload"]["params"].update(fail_after_steps=5,
                                              marker=str(tmp_path / f"{name}.failed"))
        data["tune"]["search_space"] = {"workload.params.separation": {"grid": [1.0, 0.1]}}
        return run_search(RunConfig.model_validate(data)), tmp_path / "runs" / name

    def record(r: dict) -> dict:  # its numbers, without the timings
        return {k: v for k, v in r.items() if k.startswith(("val_", "train_", "test_"))
                or k in ("epoch", "step", "global_step", "is_best", "saved_because")}

    def row_numbers(r: dict) -> dict:
        return {"trial": r["trial_id"], "epoch": r["best_epoch"], "best": r["best_val_loss"],
                "metrics": record(r["best_metrics"]), "test": r["test_metrics"],
                "status": r["status"]}

    board, own = search("own", "in_trial", fail=True)
    ray_board, ray_train = search("ray", "ray_train", fail=False)
    assert (tmp_path / "own.failed").exists()  # a trial failed (and trained again)
    assert [r["status"] for r in board] == ["completed"] * 2
    assert [row_numbers(r) for r in board] == [row_numbers(r) for r in ray_board]
    improvements = []
    for row in board:
        trial = own / "trials" / row["trial_id"]
        twin = ray_train / "trials" / row["trial_id"]
        summary = json.loads((trial / "summary.json").read_text())
        assert summary["trained_in"] == "in_trial"
        assert json.loads((twin / "summary.json").read_text())["trained_in"] == "ray_train"
        twin_history = json.loads((twin / "summary.json").read_text())["history"]
        assert [record(r) for r in summary["history"]] == [record(r) for r in twin_history]
        assert kept_epochs(trial) == kept_epochs(twin)
        assert summary["test_metrics"] is not None
        improvements.append(sum(r["is_best"] for r in summary["history"]))
    assert max(improvements) >= 2  # a trial improved more than once


def test_invalid_search_spaces_fail_before_any_trial(tmp_path):
    base = search_config(tmp_path, "bad").to_dict()
    cases = {
        "unknown key": {"train.lrr": {"choice": [1]}},
        "empty choice": {"train.lr": {"choice": []}},
        "low above high": {"train.lr": {"loguniform": [0.1, 0.001]}},
        "rejected value": {"train.lr": {"choice": [0.1, -1.0]}},
        "unknown param": {"workload.params.colour": {"choice": ["red"]}},
        "unknown kind": {"train.lr": {"normal": [0, 1]}},
    }
    for what, space in cases.items():
        data = {**base, "tune": {**base["tune"], "search_space": space}}
        with pytest.raises(UserError, match=r"^tune\.search_space"):
            run_search(RunConfig.model_validate(data))
        assert not (tmp_path / "runs" / "bad").exists(), what


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, ray_tmp):
    cfg = search_config(tmp_path, "interrupted", max_concurrent_trials=1).to_dict()
    cfg["wandb"]["mode"] = "disabled"
    cfg["train"]["epochs"] = 3
    # A trial takes seconds, not the fraction of one it takes in its own reused process:
    # trials are still to run when the signal lands (a step's sleep changes no number).
    cfg["workload"]["params"]["step_seconds"] = 0.5
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    # The search's local Ray under a temp dir of its own: its processes are found by it.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "orchestrator", "tune", "tune.yaml"]
    trial_dir = tmp_path / "runs" / "interrupted" / "trials" / "trial-000"
    first_done = trial_dir / "trial_done.json"

    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    search = RunProcesses(roots=[proc.pid], marker=ray_tmp)
    deadline = time.monotonic() + 240
    while not first_done.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert first_done.exists(), "the first trial never finished"
    search.find()  # every process of the search, remembered before it is stopped
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` sends
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, out[-2000:] + err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted by SIGTERM: [1-3] of 4 trials done, [1-3] to run again; "
                        r"continue with: orchestrator tune tune\.yaml --resume", last), last
    wait_for(lambda: not search.find(), 60, "the search's Ray processes to exit")
    before = (trial_dir / "history.json").read_text()
    board = json.loads((trial_dir.parents[1] / "leaderboard.json").read_text())["trials"]
    assert any(r["status"] == "interrupted" for r in board), board
    assert next(r for r in board if r["trial_id"] == "trial-000")["status"] == "completed"

    # A resume continues the search that was saved: a changed setting that would change
    # what trials compute is refused at once, naming it; nothing is touched.
    changed = subprocess.run([*command, "--resume", "--set", "train.epochs=5"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert changed.stderr.count("\n") == 1 and "train.epochs" in changed.stderr
    assert (trial_dir / "history.json").read_text() == before

    resumed = subprocess.run([*command, "--resume", "--set", "tune.max_concurrent_trials=2"],
                             cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "1 already finished" in resumed.stdout or "already finished" in resumed.stdout
    assert (trial_dir / "history.json").read_text() == before  # not trained again
    board = json.loads((trial_dir.parents[1] / "leaderboard.json").read_text())["trials"]
    assert sorted(r["status"] for r in board) == ["completed"] * 4
    order = [r["hyperparameters"]["workload.params.separation"] for r in board]
    assert order == sorted(SEPARATIONS, reverse=True)


def test_a_monitor_no_trial_reports_is_refused_before_any_trial(tmp_path):
    """The workload is built once on a Ray worker before the search: a misspelt monitor is one
    line, exit 2, with nothing written and no trial started."""
    cfg = search_config(tmp_path, "typo").to_dict()
    cfg["tracker"]["monitor"] = "val_acc"
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "tune", "tune.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: tracker.monitor: 'val_acc' is not reported by this "
                                  "run; it reports: train_loss, val_accuracy, val_loss, val_mcc")
    assert not (tmp_path / "runs").exists()
