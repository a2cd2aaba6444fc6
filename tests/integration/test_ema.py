"""``train.ema_decay`` end to end on 2 Ray Train workers (DDP, BatchNorm): every evaluation
scores the raw and the EMA weights exactly; on this workload (a high learning rate, a short
average) the EMA loses early, while it still holds the first steps' weights, and wins once the
raw weights start to memorise the noise. Every saved model (``checkpoint.policy: all``) is the
winner: re-scored in one process it equals its record (1e-6), and its metadata, the history
and the summary name its kind. Resume checkpoints hold the EMA (and the raw weights where the
model file holds the EMA); a restart from one continues the EMA as the undisturbed run does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.training.driver import run_training
from tests.integration.conftest import assert_close, overfit_config
from workers.checkpoint.load import load_metadata, load_train_state, load_weights
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration

PARAMS = {"n_val": 97, "norm": True}
SECTIONS = {"workload": {"params": PARAMS}, "train": {"epochs": 8, "lr": 0.005,
                                                      "ema_decay": 0.8},
            "checkpoint": {"policy": "all", "resume_every_n_epochs": 1}}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, ray_local):
    """One undisturbed run, checked by both tests: what it kept, and the reference the
    restarted run must reproduce."""
    cfg = overfit_config(tmp_path_factory.mktemp("ema"), "ema", **SECTIONS)
    return cfg, run_training(cfg)


def test_the_better_weights_are_kept_and_each_saved_model_names_its_kind(ema_run):
    cfg, summary = ema_run
    history = summary["history"]
    kinds = [h["weights"] for h in history]
    assert {"raw", "ema"} <= set(kinds), kinds  # the EMA wins at some and loses at others
    for h in history:
        raw, ema = h["val_loss_raw"], h["val_loss_ema"]
        assert h["val_loss"] == min(raw, ema)
        assert h["weights"] == ("ema" if ema < raw else "raw")
    assert summary["best_metrics"]["weights"] == history[summary["best_epoch"] - 1]["weights"]

    assert len(summary["checkpoints"]) == len(history)
    for kept, record in zip(summary["checkpoints"], history, strict=True):
        path = Path(kept["path"])
        metadata = load_metadata(path)
        assert metadata["weights"] == kept["weights"] == record["weights"]
        recomputed = evaluate_split(cfg, path, "val")
        assert recomputed
        for key, value in recomputed.items():  # the saved model is the winner, exactly
            assert_close(value, record[key])
        state = load_train_state(path)
        ema_state = state["extras"]["ema"]
        assert ema_state["updates"] == record["global_step"]
        assert ("raw_weights" in state) == (record["weights"] == "ema")
        if record["weights"] == "ema":  # the model file is the EMA the run continues
            for name, value in load_weights(path).items():
                torch.testing.assert_close(value, ema_state["weights"][name])


def test_a_restart_continues_the_ema(tmp_path, ema_run):
    """A worker SIGKILLed in epoch 3 (2 steps an epoch): the restart loads the EMA from the
    resume checkpoint of epoch 2, and every later evaluation is the undisturbed run's."""
    undisturbed = ema_run[1]["history"]
    marker = tmp_path / "killed-once"
    params = {**PARAMS, "fail_after_steps": 5, "fail_with": "sigkill", "marker": str(marker)}
    cfg = overfit_config(tmp_path, "restarted", **{**SECTIONS, "workload": {"params": params}},
                         failure={"max_failures": 1})
    history = run_training(cfg)["history"]
    assert marker.exists(), "the kill did not happen"
    assert [h["epoch"] for h in history] == [h["epoch"] for h in undisturbed]
    for got, ref in zip(history, undisturbed, strict=True):
        assert_close(got["val_loss_ema"], ref["val_loss_ema"], rel=1e-5)
        assert got["weights"] == ref["weights"]
