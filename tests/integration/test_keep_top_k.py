"""``checkpoint.keep_top_k: 3`` through the CLI on 2 workers: the run keeps exactly the models
of its 3 best evaluations (and at most one resume checkpoint), each re-scored in one process
equal to its metadata, after a worker's SIGKILL and restart, after a SIGTERM to the driver, and
after ``--resume``; summary.json, ``orchestrator best``, ``load_best(rank=k)`` and the W&B run
(offline, read back with ``wandb leet inspect``) agree on them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import (
    REPO,
    RunProcesses,
    assert_close,
    checkpoint_dirs,
    overfit_config,
    recorded,
    run_cli,
    wait_for,
)
from tests.integration.test_wandb import artifacts
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration

K = 3
EPOCHS = 14


def top_k_of_history(history: list[dict]) -> list[int]:
    """The epochs of the K lowest validation losses (earlier first among equals)."""
    return [r["epoch"] for r in sorted(history, key=lambda r: (r["val_loss"], r["epoch"]))][:K]


def check_kept(run_dir: Path, history: list[dict], cfg) -> list[dict]:
    """Exactly the K best evaluations' models in storage (and at most one resume
    checkpoint), each re-scored in this process equal to its metadata; their metadata, best
    first."""
    metas = [json.loads((d / "metadata.json").read_text()) | {"path": str(d)}
             for d in checkpoint_dirs(run_dir)]
    models = [m for m in metas if "top_k_rank" in m]
    others = [m for m in metas if "top_k_rank" not in m]
    assert len(models) == K, [(m["epoch"], m["saved_because"]) for m in metas]
    assert len(others) <= 1 and all(m["saved_because"] in ("resume", "preempt")
                                    for m in others), others
    ranked = sorted(models, key=lambda m: (m["val_loss"], m["epoch"]))
    assert [m["epoch"] for m in ranked] == top_k_of_history(history)
    by_epoch = {r["epoch"]: r for r in history}
    for m in ranked:
        assert_close(m["val_loss"], by_epoch[m["epoch"]]["val_loss"])
        rescored = evaluate_split(cfg, m["path"], "val")
        for name in ("val_loss", "val_accuracy", "val_mcc"):
            assert_close(rescored[name], m[name])
    return ranked


def test_keep_top_k_through_a_worker_kill_a_sigterm_and_a_resume(tmp_path, ray_tmp,
                                                                   monkeypatch):
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    marker = tmp_path / "killed-once"
    # 2 steps an epoch on each worker: the 7th step's process SIGKILLs itself (epoch 4);
    # each batch lasts a twentieth of a second, so a SIGTERM lands mid-run.
    cfg = overfit_config(
        tmp_path, name="topk", test_split=True, train={"epochs": EPOCHS},
        workload={"params": {"fail_after_steps": 7, "fail_with": "sigkill",
                             "marker": str(marker), "step_seconds": 0.05}},
        checkpoint={"keep_top_k": K, "resume_every_n_epochs": 1},
        failure={"max_failures": 1}, wandb={"mode": "offline", "project": "topk"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = tmp_path / "runs" / "topk"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
           "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_MODE", None)
    run = RunProcesses(marker=ray_tmp)

    # A worker SIGKILLed in epoch 4 and replaced; then a SIGTERM to the driver after epoch 9.
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", "run.yaml"],
                            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    run.roots.append(proc.pid)
    wait_for(lambda: len(recorded(run_dir)) >= 9 or proc.poll() is not None, 300, "epoch 9")
    assert proc.poll() is None, "\n".join(proc.communicate())
    assert marker.exists(), "the worker was not killed"
    run.find()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["status"] == "interrupted"
    check_kept(run_dir, stopped["history"], cfg)
    assert [c["epoch"] for c in stopped["best_checkpoints"]] == top_k_of_history(
        stopped["history"])

    # --resume to the end: the same rule over the whole history.
    done = run_cli(["train", "run.yaml", "--resume"], tmp_path, env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    history = summary["history"]
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    ranked = check_kept(run_dir, history, cfg)
    best = summary["best_checkpoints"]
    assert [c["rank"] for c in best] == [1, 2, 3]
    assert [c["path"] for c in best] == [m["path"] for m in ranked]
    assert [c["value"] for c in best] == sorted(c["value"] for c in best)
    assert summary["best_checkpoint"] == best[0]["path"] and best[0]["is_best"]
    assert summary["best_epoch"] == best[0]["epoch"]
    # The test split, scored with the best as with K = 1.
    test = evaluate_split(cfg, best[0]["path"], "test")
    assert_close(summary["test_metrics"]["test_loss"], test["test_loss"])

    # orchestrator best: the table of the K; load_best(rank=k): the k-th.
    shown = run_cli(["best", str(run_dir)], tmp_path, env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for c in best:
        assert f"epoch {c['epoch']}" in shown.stdout or str(c["epoch"]) in shown.stdout
    from orchestrator.api import load_best

    third = load_best(run_dir, rank=3)
    assert third.checkpoint == best[2]["path"] and third.metadata["epoch"] == best[2]["epoch"]

    # W&B (offline, the resumed run): the K as versions with aliases best, top-2, top-3.
    logged = artifacts(summary["wandb"]["run"])
    holders = {alias: a["metadata"]["epoch"] for a in logged for alias in a["aliases"]
               if alias == "best" or alias.startswith("top-")}
    assert holders == {"best": best[0]["epoch"], "top-2": best[1]["epoch"],
                       "top-3": best[2]["epoch"]}, [(a["aliases"], a["metadata"]["epoch"])
                                                    for a in logged]
