"""``engine: fastai`` on a real 2-worker Ray: fastai's own fit, the project's best model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.training.driver import run_training
from tests.integration.conftest import assert_close, checkpoint_dirs, overfit_config
from workers.checkpoint.load import load_metadata, load_train_state
from workers.contract.names import LEARNER_FILE
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration

# With BatchNorm: per-rank BatchNorm statistics must never reach the recorded metrics, which
# are those of the weights and buffers rank 0 saved, under fastai's own loop too.
LEARNER_PARAMS = {"norm": True}
LEARNER_WORKLOAD = {"entrypoint": "tests.workloads.overfit_fastai:build",
                    "params": LEARNER_PARAMS}
# fit_one_cycle at this peak lr overfits the test workload after a few epochs.
COMMON = {"engine": "fastai", "train": {"epochs": 6, "lr": 0.005}}


def fastai_config(tmp_path: Path, name: str, **sections):
    return overfit_config(tmp_path, name=name, **{**COMMON, **sections})


@pytest.fixture(scope="module")
def learner_run(tmp_path_factory, ray_local):
    tmp_path = tmp_path_factory.mktemp("fastai")
    cfg = fastai_config(tmp_path, "fastai-learner", workload=LEARNER_WORKLOAD)
    return cfg, run_training(cfg)


def test_best_model_loads_into_a_fresh_learner_and_reproduces_its_metrics(learner_run):
    from tests.workloads.overfit_fastai import build

    cfg, summary = learner_run
    assert cfg.schedule == "one_cycle"
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    losses = [h["val_loss"] for h in history]
    best_epoch = losses.index(min(losses)) + 1
    assert 1 < best_epoch < 6, f"the run must overfit for this test to mean anything: {losses}"
    assert summary["best_epoch"] == best_epoch
    best = summary["best_metrics"]
    assert set(best) >= {"train_loss", "val_loss", "val_accuracy", "epoch_seconds"}

    # A model was saved at each improvement, and only then; of those Ray keeps the best and
    # the latest, which with the best policy are the same one. It has fastai's export too.
    saved = [h["epoch"] for h in history if h["checkpoint"]]
    assert saved == [h["epoch"] for h in history if h["is_best"]] and saved[-1] == best_epoch
    best_dir = Path(summary["best_checkpoint"])
    assert checkpoint_dirs(Path(summary["run_dir"])) == [best_dir]
    assert {p.name for p in best_dir.iterdir()} == {
        "model.safetensors", "metadata.json", "train_state.pt", LEARNER_FILE
    }
    metadata = load_metadata(best_dir)
    assert metadata["epoch"] == best_epoch and metadata["is_best"] is True
    assert metadata["config"]["engine"] == "fastai"
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert metadata[key] == best[key], key
    assert load_train_state(best_dir)["epoch"] == best_epoch  # weights_only: no pickle
    weights = torch.load(best_dir / LEARNER_FILE, weights_only=True)
    assert set(weights) == set(build(**LEARNER_PARAMS).model.state_dict())
    assert any("running_mean" in k for k in weights)

    # One process, a fresh Learner, fastai's own load and validate: the recorded metrics.
    learn = build(**LEARNER_PARAMS)
    learn.path, learn.model_dir = best_dir, "."
    learn.load(Path(LEARNER_FILE).stem, with_opt=False)
    val_loss, val_accuracy = learn.validate()
    assert_close(val_loss, best["val_loss"])
    assert_close(val_accuracy, best["val_accuracy"])
    # The test split (the Learner's third loader) was scored once, with these weights.
    test_loss, test_accuracy = learn.validate(ds_idx=2)
    assert_close(summary["test_metrics"]["test_loss"], test_loss)
    assert_close(summary["test_metrics"]["test_accuracy"], test_accuracy)


def test_restart_after_a_worker_failure_continues_the_one_cycle(learner_run, tmp_path):
    _, reference = learner_run
    marker = tmp_path / "failed-once"
    # 16 samples per rank, batch 8: 2 steps an epoch; the 8th step is in epoch 4.
    cfg = fastai_config(
        tmp_path, "fastai-restarted", failure={"max_failures": 1},
        checkpoint={"resume_every_n_epochs": 1},
        workload={**LEARNER_WORKLOAD, "params": {**LEARNER_PARAMS, "fail_after_steps": 7,
                                                 "marker": str(marker)}},
    )
    summary = run_training(cfg)
    assert marker.exists(), "the injected failure did not happen"
    # Weights, fastai's optimizer state, the schedule's position and the shuffling all resume:
    # the run ends exactly where the uninterrupted one does.
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 7))
    for got, ref in zip(summary["history"], reference["history"], strict=True):
        assert_close(got["val_loss"], ref["val_loss"], rel=1e-5)
        assert got["is_best"] == ref["is_best"]
    assert summary["best_epoch"] == reference["best_epoch"]
    assert load_metadata(summary["best_checkpoint"])["epoch"] == summary["best_epoch"]
    # The latest full-state checkpoint holds fastai's optimizer state (an L of hyper-parameters
    # with numpy scalars in fastai) as plain types: it loads with weights_only=True.
    latest = checkpoint_dirs(Path(summary["run_dir"]))[-1]
    state = load_train_state(latest)
    assert state["epoch"] == 6 and state["optimizer"]["hypers"][0]["lr"] > 0


def test_standard_workload_with_constant_schedule(tmp_path, ray_local):
    # The engine builds the Learner from model, datasets, loss and metrics (accuracy, mcc).
    cfg = fastai_config(tmp_path, "fastai-standard", train={"epochs": 4, "lr": 0.002,
                                                          "schedule": "constant"})
    summary = run_training(cfg)
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert all({"val_accuracy", "val_mcc"} <= set(h) for h in history)
    best_dir = summary["best_checkpoint"]
    assert (Path(best_dir) / LEARNER_FILE).exists()
    # The weights reproduce the recorded whole-set metrics in a plain single process.
    recomputed = evaluate_split(cfg, best_dir, "val")
    for key, value in recomputed.items():
        assert_close(value, summary["best_metrics"][key])
