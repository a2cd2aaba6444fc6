"""``tracker.also_monitor`` on 2 workers, in process: val_loss (the primary, min) and
train_loss (min) pick different epochs on the overfitting workload (val_loss improves, then
worsens; train_loss keeps falling). The run keeps exactly the two bests' models (and no other
checkpoint but the latest, which is train_loss's best here), each re-scored in this process
equal to its record; summary.json's ``best_by_monitor`` names it with its test metrics. The
one-file case (two monitors choosing the same evaluation) is tests/unit/test_also_monitor.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.training.driver import run_training
from tests.integration.conftest import assert_close, checkpoint_dirs, overfit_config
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration


def test_two_monitors_keep_their_own_best_models(tmp_path, ray_local):
    cfg = overfit_config(tmp_path, "also", test_split=True,
                         tracker={"monitor": "val_loss",
                                  "also_monitor": [{"monitor": "train_loss"}]})
    summary = run_training(cfg)
    history = summary["history"]
    best_val = min(history, key=lambda r: (r["val_loss"], r["epoch"]))
    best_train = min(history, key=lambda r: (r["train_loss"], r["epoch"]))
    assert best_val["epoch"] != best_train["epoch"], "the workload must overfit"

    run_dir = Path(summary["run_dir"])
    metas = {d.name: json.loads((d / "metadata.json").read_text())
             for d in checkpoint_dirs(run_dir)}
    assert sorted(m["epoch"] for m in metas.values()) == sorted(
        [best_val["epoch"], best_train["epoch"]])
    by_epoch = {m["epoch"]: (name, m) for name, m in metas.items()}
    # best_for: the monitors it was the best of when saved (train_loss too, early on)
    assert by_epoch[best_val["epoch"]][1]["best_for"][0] == "val_loss"
    assert by_epoch[best_train["epoch"]][1]["best_for"] == ["train_loss"]

    also = summary["best_by_monitor"]["train_loss"]
    assert also["epoch"] == best_train["epoch"] and also["mode"] == "min"
    assert Path(also["checkpoint"]).name == by_epoch[best_train["epoch"]][0]
    assert Path(summary["best_checkpoint"]).name == by_epoch[best_val["epoch"]][0]
    assert also["test_metrics"] and summary["test_metrics"]
    assert also["test_metrics"] != summary["test_metrics"]  # two models, scored each

    for record, path in ((best_val, summary["best_checkpoint"]),
                         (best_train, also["checkpoint"])):
        rescored = evaluate_split(cfg, path, "val")
        assert rescored is not None
        for name in ("val_loss", "val_accuracy", "val_mcc"):
            assert_close(rescored[name], record[name])
    test = evaluate_split(cfg, also["checkpoint"], "test")
    assert test is not None
    assert_close(test["test_loss"], also["test_metrics"]["test_loss"])
