"""``tracker.also_monitor`` on 2 workers, in process, one run with three also-monitors on the
overfitting workload (val_loss improves, then worsens; train_loss keeps falling): val_loss
(the primary, min) and train_loss (min) pick different epochs, and val_accuracy and val_mcc
(max) pick one evaluation together, another than val_loss's. The run keeps exactly the three
distinct bests' models (and no other checkpoint but the latest, which is train_loss's best
here): the evaluation two monitors chose is one checkpoint directory, whose ``best_for``
names both; each model is re-scored in this process equal to its record; summary.json's
``best_by_monitor`` names it with its test metrics, scored once per distinct model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.training.driver import run_training
from tests.integration.conftest import assert_close, checkpoint_dirs, overfit_config
from workers.loop.scoring import evaluate_split

pytestmark = pytest.mark.integration

ALSO = ("train_loss", "val_accuracy", "val_mcc")


def test_each_monitor_keeps_its_best_and_two_that_agree_share_one(tmp_path, ray_local):
    cfg = overfit_config(tmp_path, "also", test_split=True,
                         tracker={"monitor": "val_loss",
                                  "also_monitor": [{"monitor": m} for m in ALSO]})
    summary = run_training(cfg)
    history = summary["history"]
    best_val = min(history, key=lambda r: (r["val_loss"], r["epoch"]))
    best_train = min(history, key=lambda r: (r["train_loss"], r["epoch"]))
    best_acc = max(history, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    best_mcc = max(history, key=lambda r: (r["val_mcc"], -r["epoch"]))
    assert best_val["epoch"] != best_train["epoch"], "the workload must overfit"
    peaks = [(r["val_loss"], r["val_accuracy"], r["val_mcc"]) for r in history]
    assert best_acc["epoch"] == best_mcc["epoch"], ("the shared case needs them to agree", peaks)
    shared = best_acc
    assert shared["epoch"] not in (best_val["epoch"], best_train["epoch"]), (
        "the shared best must be a third model", peaks)

    run_dir = Path(summary["run_dir"])
    metas = {d.name: json.loads((d / "metadata.json").read_text())
             for d in checkpoint_dirs(run_dir)}
    assert sorted(m["epoch"] for m in metas.values()) == sorted(
        [best_val["epoch"], best_train["epoch"], shared["epoch"]])
    by_epoch = {m["epoch"]: (name, m) for name, m in metas.items()}
    # best_for: the monitors it was the best of when saved (train_loss too, early on)
    assert by_epoch[best_val["epoch"]][1]["best_for"][0] == "val_loss"
    assert by_epoch[best_train["epoch"]][1]["best_for"] == ["train_loss"]
    # Two monitors chose one evaluation: one directory on disk, naming both.
    assert [m["epoch"] for m in metas.values()].count(shared["epoch"]) == 1
    shared_name, shared_meta = by_epoch[shared["epoch"]]
    assert {"val_accuracy", "val_mcc"} <= set(shared_meta["best_for"])

    bests = summary["best_by_monitor"]
    assert set(bests) == set(ALSO)
    also = bests["train_loss"]
    assert also["epoch"] == best_train["epoch"] and also["mode"] == "min"
    assert Path(also["checkpoint"]).name == by_epoch[best_train["epoch"]][0]
    assert Path(summary["best_checkpoint"]).name == by_epoch[best_val["epoch"]][0]
    for metric in ("val_accuracy", "val_mcc"):
        assert bests[metric]["mode"] == "max" and bests[metric]["epoch"] == shared["epoch"]
        assert Path(bests[metric]["checkpoint"]).name == shared_name
    assert also["test_metrics"] and summary["test_metrics"]
    assert also["test_metrics"] != summary["test_metrics"]  # two models, scored each
    assert bests["val_accuracy"]["test_metrics"] == bests["val_mcc"]["test_metrics"]
    assert bests["val_mcc"]["test_metrics"] not in (also["test_metrics"],
                                                    summary["test_metrics"])

    for record, path in ((best_val, summary["best_checkpoint"]),
                         (best_train, also["checkpoint"]),
                         (shared, bests["val_mcc"]["checkpoint"])):
        rescored = evaluate_split(cfg, path, "val")
        assert rescored is not None
        for name in ("val_loss", "val_accuracy", "val_mcc"):
            assert_close(rescored[name], record[name])
    for best in (also, bests["val_mcc"]):
        test = evaluate_split(cfg, best["checkpoint"], "test")
        assert test is not None
        assert_close(test["test_loss"], best["test_metrics"]["test_loss"])
