"""Which model is the best, through the CLI on 2 workers, for metrics whose direction the old
name rule ("loss" or "error" in the name: min, else max) got wrong, and for a torchmetrics
MetricCollection (tests/workloads/directions.py). Each kept model is re-scored in this process,
by hand (no project evaluation code), equal to its record to 1e-6; the refusals are one line,
exit 2, nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from tests.integration.conftest import assert_close
from tests.integration.test_cli import run_cli
from tests.workloads.directions import VOCAB, build
from workers.checkpoint.load import load_metadata, load_weights

pytestmark = pytest.mark.integration


def write_config(tmp_path: Path, name: str, kind: str, **sections) -> Path:
    config = {"name": name, "storage_path": str(tmp_path / "runs"), "seed": 0,
              "workload": {"entrypoint": "tests.workloads.directions:build",
                           "params": {"kind": kind}},
              "scaling": {"num_workers": 2}, "wandb": {"mode": "disabled"}, **sections}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(tmp_path: Path, name: str, kind: str, **sections) -> tuple[dict, str]:
    proc = run_cli("train", str(write_config(tmp_path, name, kind, **sections)), cwd=tmp_path,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text()), proc.stdout


def best_model(summary: dict, kind: str) -> torch.nn.Module:
    workload = build(kind)
    workload.model.load_state_dict(load_weights(summary["best_checkpoint"]))
    return workload.model.eval()


def outputs(model: torch.nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row once, in one process: (outputs, targets), float64."""
    outs, targets = [], []
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=32):
            outs.append(model(x).double())
            targets.append(y)
    return torch.cat(outs), torch.cat(targets)


def kept_is_the_extreme(summary: dict, monitor: str, mode: str) -> None:
    values = [record[monitor] for record in summary["history"]]
    best = min(values) if mode == "min" else max(values)
    assert summary["mode"] == mode
    assert summary["best_epoch"] == values.index(best) + 1, values
    assert summary["best_metrics"][monitor] == best
    metadata = load_metadata(summary["best_checkpoint"])
    assert metadata["mode"] == mode and metadata["epoch"] == summary["best_epoch"]
    assert metadata["mode_source"] == summary["mode_source"]


def test_mse_is_minimised_because_its_metric_declares_it(tmp_path: Path) -> None:
    summary, out = train(tmp_path, "mse", "regression", tracker={"monitor": "val_mse"},
                         train={"epochs": 6, "batch_size": 8, "lr": 0.02})
    kept_is_the_extreme(summary, "val_mse", "min")
    values = [r["val_mse"] for r in summary["history"]]
    assert max(values) > min(values)  # a real choice: maximising would keep another epoch
    source = "declared by MeanSquaredError: higher_is_better=False"
    assert summary["mode_source"] == source and f"monitor val_mse, min ({source})" in out
    model = best_model(summary, "regression")
    for split, record in (("val", summary["best_metrics"]), ("test", summary["test_metrics"])):
        pred, y = outputs(model, getattr(build("regression"), f"{split}_dataset"))
        mse = ((pred - y.double()) ** 2).mean().item()
        assert_close(record[f"{split}_mse"], mse)
        assert_close(record[f"{split}_loss"], mse)


def test_perplexity_is_minimised_on_its_smoothed_value_until_patience_stops_it(
        tmp_path: Path) -> None:
    # min_delta 1000: no evaluation is progress, so patience 2 stops the run after epoch 3,
    # while the best model is still the strictly best smoothed value (tracker.smoothing).
    summary, out = train(tmp_path, "lm", "language_model",
                         tracker={"monitor": "val_perplexity", "smoothing": {"ema": 0.5},
                                  "patience": 2, "min_delta": 1000.0},
                         train={"epochs": 6, "batch_size": 16, "lr": 0.02})
    assert "declared by Perplexity" in summary["mode_source"] and summary["mode"] == "min"
    reason = ("tracker.patience: 2 evaluations without progress on val_perplexity (smoothed) "
              "by more than 1000")
    assert summary["status"] == "stopped_early" and summary["epochs_completed"] == 3
    assert summary["stop_reason"] == reason and f"stopping early: {reason}" in out
    raw = [r["val_perplexity"] for r in summary["history"]]
    smoothed = [r["val_perplexity_smoothed"] for r in summary["history"]]
    expected = [raw[0]]
    for value in raw[1:]:
        expected.append(0.5 * expected[-1] + 0.5 * value)
    assert smoothed == pytest.approx(expected, rel=1e-12)
    assert summary["best_epoch"] == smoothed.index(min(smoothed)) + 1
    metadata = load_metadata(summary["best_checkpoint"])
    assert metadata["epoch"] == summary["best_epoch"]
    assert metadata["val_perplexity_smoothed"] == min(smoothed)
    model = best_model(summary, "language_model")
    for split, record in (("val", summary["best_metrics"]), ("test", summary["test_metrics"])):
        logits, y = outputs(model, getattr(build("language_model"), f"{split}_dataset"))
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        assert_close(record[f"{split}_loss"], nll.item())
        assert_close(record[f"{split}_perplexity"], math.exp(nll.item()), rel=1e-5)


def test_a_metric_collection_member_is_monitored(tmp_path: Path) -> None:
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassPrecision,
        MulticlassRecall,
    )

    summary, _ = train(tmp_path, "group", "collection",
                       tracker={"monitor": "val_cls_acc", "mode": "max"},
                       train={"epochs": 4, "batch_size": 16, "lr": 0.01})
    kept_is_the_extreme(summary, "val_cls_acc", "max")
    assert {"val_cls_acc", "val_cls_prec", "val_cls_rec"} <= set(summary["best_metrics"])
    model = best_model(summary, "collection")
    for split, record in (("val", summary["best_metrics"]), ("test", summary["test_metrics"])):
        logits, y = outputs(model, getattr(build("collection"), f"{split}_dataset"))
        whole = MetricCollection({"acc": MulticlassAccuracy(3), "prec": MulticlassPrecision(3),
                                  "rec": MulticlassRecall(3)}, prefix="cls_")
        for key, value in whole(logits.float(), y).items():
            assert_close(record[f"{split}_{key}"], float(value), rel=1e-5)
        ce = torch.nn.functional.cross_entropy(logits, y).item()
        assert_close(record[f"{split}_loss"], ce)


def test_a_name_auto_cannot_place_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    config = write_config(tmp_path, "custom", "undeclared", tracker={"monitor": "val_custom"})
    proc = run_cli("train", str(config), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tracker.mode: auto cannot tell"), lines
    assert "tracker.mode: min" in lines[0] and "tracker.mode: max" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_optuna_search_on_mse_ranks_the_lowest_first(tmp_path: Path) -> None:
    # val_loss, an also-monitor left on auto: the search resolves it before any trial starts,
    # from the same probe and by the same rules as a run (the regression workload has no
    # second metric object: the one that only a declaration can place is
    # tests/unit/test_probe.py's), and pins it into every trial's config.
    config = write_config(
        tmp_path, "search", "regression",
        tracker={"monitor": "val_mse", "also_monitor": [{"monitor": "val_loss"}]},
        scaling={"num_workers": 1}, train={"epochs": 2, "batch_size": 16},
        tune={"search": "optuna", "num_samples": 3, "max_concurrent_trials": 1,
              "startup_trials": 2, "seed": 3,
              "search_space": {"train.lr": {"loguniform": [0.0005, 0.05]}}})
    proc = run_cli("tune", str(config), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every trial: monitor val_mse, min (declared by MeanSquaredError" in proc.stdout
    # The search's own lines only: not Ray Tune's start-up box nor its TensorBoard hint for
    # Ray's session directory.
    for noise in ("Configuration for experiment", "tensorboard", "View detailed results"):
        assert noise not in proc.stdout + proc.stderr, noise
    board = json.loads((tmp_path / "runs" / "search" / "leaderboard.json").read_text())
    assert board["mode"] == "min"
    values = [row["best_metrics"]["val_mse"] for row in board["trials"]]
    assert values == sorted(values) and len(values) == 3
    exported = load_metadata(tmp_path / "runs" / "search" / "best_model")
    assert exported["val_mse"] == values[0] and exported["mode"] == "min"
    saved = json.loads((tmp_path / "runs" / "search" / "search.json").read_text())
    assert saved["config"]["tracker"]["also_monitor"] == [{"monitor": "val_loss", "mode": "min"}]
    for row in board["trials"]:
        trial = json.loads((Path(row["best_checkpoint"]).parent / "summary.json").read_text())
        assert trial["config"]["tracker"]["mode"] == "min"
        assert trial["config"]["tracker"]["also_monitor"] == [
            {"monitor": "val_loss", "mode": "min"}]
        also = trial["best_by_monitor"]["val_loss"]
        values = [r["val_loss"] for r in trial["history"]]
        assert also["mode"] == "min" and also["value"] == min(values)
        assert load_metadata(also["checkpoint"])["config"]["tracker"]["also_monitor"] == [
            {"monitor": "val_loss", "mode": "min"}]
