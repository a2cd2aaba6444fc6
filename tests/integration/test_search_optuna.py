"""Optuna searches on real Ray Tune trials (1 worker each): trials proposed from earlier
trials' best values, the leaderboard and the exported best agreeing with W&B and
``orchestrator best``, and a search stopped by SIGTERM that resumes with the proposals of an
uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from orchestrator.search.adaptive import TrialSeededTPE, distributions
from orchestrator.search.runner import run_search
from orchestrator.search.space import PARAMS_KEY, parse_space
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

SPACE = {"train.lr": {"loguniform": [0.0005, 0.05]},
         "workload.params.separation": {"uniform": [0.1, 1.0]}}


def optuna_config(root: Path, name: str, wandb: str = "disabled", **tune: object) -> RunConfig:
    data = overfit_config(root, name=name, scaling={"num_workers": 1},
                          train={"epochs": 2, "batch_size": 16},
                          wandb={"mode": wandb}).to_dict()
    data["tune"] = {"search": "optuna", "num_samples": 8, "max_concurrent_trials": 2,
                    "startup_trials": 2, "seed": 11, "search_space": SPACE, **tune}
    return RunConfig.model_validate(data)


def replayed_proposal(records: list[dict], n: int, cfg: RunConfig) -> dict:
    """What the sampler proposes for trial ``n`` from the study as it stood when trial ``n``
    was asked (from the sampler's own records): the trials that had ended by then, with their
    values, and the others still running."""
    params = parse_space(cfg.tune.search_space)
    dists = distributions(params)
    study = optuna.create_study(direction="minimize", sampler=TrialSeededTPE(11, 2))
    asked = records[n]["started"]
    for r in records[:n]:
        ended = r["completed"] is not None and r["completed"] < asked
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if ended else
            optuna.trial.TrialState.RUNNING,
            value=r["value"] if ended else None, distributions=dists,
            params={f"{PARAMS_KEY}/{k}": v for k, v in r["params"].items()}))
    trial = study.ask(dists)
    return {k.removeprefix(f"{PARAMS_KEY}/"): v for k, v in trial.params.items()}


def test_an_optuna_search_proposes_from_results_and_its_best_is_everywhere(
        wandb_env, ray_local):  # noqa: F811
    cfg = optuna_config(wandb_env, "optuna", wandb="offline")
    started = time.perf_counter()
    board = run_search(cfg)
    print(f"8-trial optuna search took {time.perf_counter() - started:.1f} s")
    experiment = Path(cfg.storage_path) / "optuna"

    # Every trial was proposed by the sampler, and is recorded with its values.
    searched = json.loads((experiment / "search.json").read_text())["trials"]
    records = json.loads((experiment / "searcher.json").read_text())["trials"]
    assert [t["trial_id"] for t in searched] == [f"trial-{i:03d}" for i in range(8)]
    assert [r["number"] for r in records] == list(range(8))
    assert [r["params"] for r in records] == [t["overrides"] for t in searched]
    assert all(r["state"] == "complete" for r in records), records

    # The sampler learnt each trial's best val_loss (the tracker's), not its last.
    for trial, record in zip(searched, records, strict=True):
        summary = json.loads((experiment / "trials" / trial["trial_id"] / "summary.json")
                             .read_text())
        assert record["value"] == summary["best_metrics"]["val_loss"]
        assert record["value"] == min(h["val_loss"] for h in summary["history"])

    # Trials after the two random ones were proposed from the results in the study when they
    # were asked: the same sampler given those records proposes exactly them.
    later = [n for n in range(2, 8)
             if any(r["completed"] and r["completed"] < records[n]["started"]
                    for r in records[:n])]
    assert len(later) >= 4, records
    for n in later:
        assert replayed_proposal(records, n, cfg) == records[n]["params"], n

    # The leaderboard is sorted by each trial's best; row 0 is the exported best, and the
    # same in W&B and in `orchestrator best`.
    assert len(board) == 8
    best_agrees_everywhere(experiment, board)


def best_agrees_everywhere(experiment: Path, board: list[dict]) -> dict:
    """The leaderboard is sorted by each trial's best; row 0 is the exported best (re-scored
    in one process to its value), the search's W&B ``best_trial`` and ``best`` model, and
    ``orchestrator best``'s first row; each trial's W&B run has its best. Returns the
    exported best's metadata."""
    losses = [row["best_val_loss"] for row in board]
    assert losses == sorted(losses)
    best_dir = experiment / "best_model"
    metadata = load_metadata(best_dir)
    assert metadata["trial_id"] == board[0]["trial_id"]
    recomputed = evaluate_split(RunConfig.model_validate(metadata["config"]), best_dir, "val")
    assert_close(recomputed["val_loss"], board[0]["best_val_loss"])
    saved = json.loads((experiment / "leaderboard.json").read_text())
    assert run_summary(saved["wandb"]["run"])["best_trial"] == board[0]["trial_id"]
    models = [a for a in artifacts(saved["wandb"]["run"]) if a["type"] == "model"]
    assert "best" in models[-1]["aliases"]
    assert models[-1]["metadata"] == {**models[-1]["metadata"], **{
        k: metadata[k] for k in ("trial_id", "lineage") if k in metadata}}
    for row in board:
        assert run_summary(row["wandb"]["run"])["best_val_loss"] == row["best_val_loss"]
    shown = subprocess.run([sys.executable, "-m", "orchestrator", "best", str(experiment),
                            "--json"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["trials"][0]["trial_id"] == board[0]["trial_id"]
    return metadata


def test_a_resumed_optuna_search_proposes_what_an_uninterrupted_one_did(
        tmp_path, ray_local, ray_tmp):
    """SIGTERM while the third trial runs, then --resume one trial at a time: the interrupted
    trial runs again with its values, and every trial's values are what the seeded sampler
    proposes from the trials that had ended before it, with the values they recorded: what an
    uninterrupted search, one trial at a time, proposes (the fourth by TPE from the three
    before it). Replayed from the records rather than run a second time: the sampler is the
    same, and an uninterrupted search's proposals are checked by the test above."""
    cfg = optuna_config(tmp_path, "s", num_samples=4, max_concurrent_trials=1)
    data = cfg.to_dict()
    # A trial takes seconds, not the fraction of one it takes in its own reused process: the
    # third is still running when the signal lands (a step's sleep changes no number).
    data["workload"]["params"]["step_seconds"] = 0.5
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "orchestrator", "tune", "tune.yaml"]
    trials = tmp_path / "runs" / "s" / "trials"
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    search = RunProcesses(roots=[proc.pid], marker=ray_tmp)
    wait_for(lambda: (trials / "trial-001" / "trial_done.json").exists()
             and (trials / "trial-002").exists() or proc.poll() is not None, 400,
             "the third trial to start")
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    search.find()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, out[-2000:] + err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert err.strip().splitlines()[-1].endswith(
        "continue with: orchestrator tune tune.yaml --resume"), err[-2000:]
    wait_for(lambda: not search.find(), 60, "the search's Ray processes to exit")
    before = {t: (trials / t / "history.json").read_text() for t in ("trial-000", "trial-001")}
    interrupted = json.loads((tmp_path / "runs" / "s" / "searcher.json").read_text())["trials"]

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "2 already finished" in resumed.stdout, resumed.stdout[-2000:]
    for trial_id, history in before.items():  # finished trials are not trained again
        assert (trials / trial_id / "history.json").read_text() == history
    board = json.loads((tmp_path / "runs" / "s" / "leaderboard.json").read_text())["trials"]
    assert sorted(r["status"] for r in board) == ["completed"] * 4
    records = json.loads((tmp_path / "runs" / "s" / "searcher.json").read_text())["trials"]
    assert [r["number"] for r in records] == list(range(4))
    # The interrupted trial ran again with the values it was first given.
    assert records[2]["params"] == interrupted[2]["params"]
    assert {r["trial_id"]: r["hyperparameters"] for r in board} == {
        f"trial-{r['number']:03d}": r["params"] for r in records}
    # One trial at a time: each was asked once every trial before it had ended.
    for n in range(1, 4):
        assert all(r["completed"] < records[n]["started"] for r in records[:n]), records
    # Each trial's values are the seeded sampler's proposal from the ones before it (the two
    # random start-up trials included), and each value the sampler holds is the trial's best.
    for n in range(4):
        assert replayed_proposal(records, n, cfg) == records[n]["params"], n
    for record in records:
        summary = json.loads((trials / f"trial-{record['number']:03d}" / "summary.json")
                             .read_text())
        assert record["value"] == summary["best_metrics"]["val_loss"]
        assert [h["epoch"] for h in summary["history"]] == [1, 2]


def test_an_optuna_search_refuses_a_grid_key_in_one_line(tmp_path):
    cfg = optuna_config(tmp_path, "bad").to_dict()
    cfg["tune"]["search_space"]["train.batch_size"] = {"grid": [8, 16]}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "tune", "tune.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "error: tune.search_space.train.batch_size: tune.search optuna proposes"), proc.stderr
    assert not (tmp_path / "runs").exists()
