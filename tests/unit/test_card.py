"""model_card.md (orchestrator/results/card.py, ``orchestrator card``): read back as a user
would, by parsing its YAML front matter and its Markdown tables, every number equals the
record's (summary.json, leaderboard.json) exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli.main import main
from orchestrator.results.card import write_card
from workers.contract.names import CARD_FILE, LEADERBOARD_FILE, SUMMARY_FILE

# Floats whose short decimal forms are not what they are: a card that rounds loses them.
ODD = [0.1 + 0.2, 1 / 3, 1e-17, 123456789.12345679, 2 / 7, 0.7000000000000001]


def record(epoch: int, loss: float, acc: float, best: bool) -> dict[str, Any]:
    return {"epoch": epoch, "step": 4, "global_step": 4 * epoch, "lr": 0.001 / epoch,
            "train_loss": loss * 1.5, "val_loss": loss, "val_accuracy": acc,
            "is_best": best, "epoch_seconds": 0.25 * epoch, "workers": 2,
            "checkpoint": f"checkpoint_epoch{epoch:04d}" if best else None}


def run_summary(run_dir: Path, **extra: Any) -> dict[str, Any]:
    history = [record(1, ODD[3] / 1e8, ODD[1], True), record(2, ODD[0], ODD[4], True),
               record(3, ODD[5], ODD[0], False), record(4, 0.45, 0.5, False)]
    best = {k: v for k, v in history[1].items() if k != "checkpoint"}
    summary = {
        "name": "card-run", "run_dir": str(run_dir), "start": "fresh", "status": "completed",
        "monitor": "val_loss", "mode": "min", "mode_source": "by name: 'loss' in val_loss",
        "policy": "best", "best_checkpoint": str(run_dir / "checkpoint_epoch0002"),
        "best_epoch": 2, "best_step": 4, "best_global_step": 8, "best_metrics": best,
        "test_metrics": {"test_loss": ODD[2], "test_accuracy": ODD[1]},
        "epochs_completed": 4, "global_step": 16, "epochs_planned": 4,
        "stopped_early": False, "stop_reason": None, "nonfinite": [],
        "checkpoints": [], "history": history,
        "config": {"name": "card-run", "storage_path": "s3://user:pw@bucket/runs",
                   "workload": {"entrypoint": "workers.workloads.digits:build",
                                "params": {"hidden": 16}}, "engine": "torch"},
        "provenance": {
            "code": {"entrypoint": "workers.workloads.digits:build", "git_commit": "a" * 40,
                     "dirty": True, "diff_sha256": "b" * 64, "module_sha256": "c" * 64,
                     "project_version": "0.1.0"},
            "packages": {"python": "3.11.7", "torch": "2.14.1"},
            "data": {"train": {"kind": "map", "length": 100, "sha256": "d" * 64},
                     "val": {"kind": "ray_dataset", "rows": 40, "files": [
                         {"path": "/d/a.parquet", "size": 10, "mtime": "x"}], "schema": None}}},
        "provenance_changes": [{"epoch": 3, "what": "the workload's module",
                                "before": "c" * 64, "after": "e" * 64}],
        **extra}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    return summary


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Each ``## heading``'s first Markdown table, as rows of {column: cell}."""
    out: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:], None
            continue
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if header is None:
            header = [] if heading in out else cells  # [] : a later table, not read
            if header:
                out[heading] = []
        elif header and not set(line.strip()) <= set("|-"):
            out[heading].append(dict(zip(header, cells, strict=True)))
    return out


def as_number(cell: str) -> float | None:
    return None if cell == "null" else float(cell)


def test_every_number_in_a_runs_card_is_the_summarys(tmp_path):
    run_dir = tmp_path / "card-run"
    summary = run_summary(run_dir)
    path = write_card(str(run_dir))
    assert path == str(run_dir / CARD_FILE)
    text = Path(path).read_text()

    index = front_matter(text)
    assert index["library_name"] == "pytorch"
    results = index["model-index"][0]["results"]
    val = {m["type"]: m["value"] for m in results[0]["metrics"]}
    test = {m["type"]: m["value"] for m in results[1]["metrics"]}
    best = summary["best_metrics"]
    assert val == {k: best[k] for k in ("train_loss", "val_loss", "val_accuracy")}
    assert test == summary["test_metrics"]  # exact: PyYAML round-trips floats

    found = tables(text)
    metrics = {r["metric"]: as_number(r["value"])
               for r in found["Every metric of the best evaluation"]}
    assert metrics == {k: v for k, v in best.items() if k != "is_best"}
    assert {r["metric"]: as_number(r["value"]) for r in
            found["Test split (scored once, with the best weights)"]} == summary["test_metrics"]
    rows = found["Curves"]
    assert len(rows) == len(summary["history"])
    for row, rec in zip(rows, summary["history"], strict=True):
        for key in ("epoch", "global_step", "lr", "train_loss", "val_loss", "val_accuracy"):
            assert as_number(row[key]) == rec[key], key
        assert row["is_best"] == str(rec["is_best"]).lower()

    # Why that epoch won: its value against the runner-up's and the previous best's.
    assert f"`val_loss` = {best['val_loss']!r}" in text
    assert (f"runner-up: epoch 4: `val_loss` = 0.45 (the best is better by "
            f"{0.45 - best['val_loss']!r})") in text
    assert f"previous best: epoch 1: `val_loss` = {summary['history'][0]['val_loss']!r}" in text
    # The config as YAML, its storage credentials masked; provenance and its changes.
    config = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    assert config["storage_path"] == "s3://***@bucket/runs" and "pw" not in text.split(
        "```yaml")[1].split("```")[0]
    assert config["workload"] == summary["config"]["workload"]
    code = {r["code"]: r["value"] for r in found["Provenance"]}
    assert code["git_commit"] == "a" * 40 and code["module_sha256"] == "c" * 64
    assert "e" * 64 in text and "after epoch" in text
    # How to load it, with and without the project.
    assert f"load_best({str(run_dir)!r})" in text
    assert "from workers.workloads.digits import build" in text
    assert f"{summary['best_checkpoint']}/model.safetensors" in text


def test_the_k_best_the_average_and_each_monitors_best_are_listed(tmp_path):
    run_dir = tmp_path / "k"
    summary = run_summary(run_dir, best_checkpoints=[
        {"rank": 1, "path": "p2", "epoch": 2, "step": 4, "global_step": 8, "value": ODD[0],
         "is_best": True},
        {"rank": 2, "path": "p1", "epoch": 1, "step": 4, "global_step": 4,
         "value": ODD[3] / 1e8, "is_best": True}],
        averaged={"k": 2, "averaged_from": ["p2", "p1"], "value": ODD[4], "best_value": ODD[0],
                  "won": False, "by": ODD[0] - ODD[4]},
        best_by_monitor={"val_accuracy": {"mode": "max", "value": ODD[4], "checkpoint": "p2",
                                          "epoch": 2, "step": 4, "global_step": 8,
                                          "metrics": {}, "test_metrics": None}})
    found = tables(Path(write_card(str(run_dir))).read_text())
    ranked = found["The K best models (checkpoint.keep_top_k)"]
    assert [as_number(r["value"]) for r in ranked] == [c["value"] for c in
                                                       summary["best_checkpoints"]]
    averaged = found["Average of the K best (checkpoint.average_top_k)"][0]
    assert as_number(averaged["by"]) == summary["averaged"]["by"]
    assert as_number(averaged["value"]) == summary["averaged"]["value"]
    monitor = found["Each monitor's best (tracker.also_monitor)"][0]
    assert monitor["monitor"] == "val_accuracy" and as_number(monitor["value"]) == ODD[4]


def test_exports_are_listed_with_their_checks(tmp_path):
    run_dir = tmp_path / "e"
    run_summary(run_dir)
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model.pt2.json").write_text(json.dumps(
        {"format": "export", "file": "model.pt2", "max_abs_diff": ODD[2],
         "tolerance": 1e-05}))
    (run_dir / "export" / "notes.json").write_text("[1, 2]")  # not a check: left out
    rows = tables(Path(write_card(str(run_dir))).read_text())[
        "Exports (checked against the saved weights)"]
    assert rows == [{"format": "export", "file": "export/model.pt2",
                     "max_abs_diff": repr(ODD[2]), "tolerance": "1e-05"}]


def test_a_searchs_card_is_the_best_trials_with_the_leaderboards_top_rows(tmp_path):
    experiment = tmp_path / "search"
    trials = []
    for i in range(7):
        trial_id = f"t{i:02d}"
        value = ODD[i % len(ODD)] + i
        trials.append({"rank": i + 1, "trial_id": trial_id, "status": "completed",
                       "best_epoch": 2, "best_val_loss": value,
                       "hyperparameters": {"train.lr": ODD[1] / (i + 1)}})
    best_summary = run_summary(experiment / "trials" / "t00", name="t00")
    board = {"name": "search", "experiment_dir": str(experiment), "monitor": "val_loss",
             "mode": "min", "best_model": str(experiment / "best_model"), "trials": trials}
    (experiment / LEADERBOARD_FILE).write_text(json.dumps(board))
    path = write_card(str(experiment))
    assert path == str(experiment / CARD_FILE)
    text = Path(path).read_text()
    found = tables(text)
    top = next(v for k, v in found.items() if k.startswith("The search: leaderboard (top 5 of 7"))
    assert [r["trial_id"] for r in top] == ["t00", "t01", "t02", "t03", "t04"]
    for row, trial in zip(top, trials, strict=False):
        assert as_number(row["best_val_loss"]) == trial["best_val_loss"]
        assert json.loads(row["hyperparameters"]) == trial["hyperparameters"]
    # The metrics are the best trial's summary's; loading goes through the exported model.
    metrics = {r["metric"]: as_number(r["value"])
               for r in found["Every metric of the best evaluation"]}
    assert metrics["val_loss"] == best_summary["best_metrics"]["val_loss"]
    assert front_matter(text)["model-index"][0]["name"] == "search"
    assert f"load_best({str(experiment)!r})" in text
    assert f"{experiment / 'best_model'}/model.safetensors" in text


def test_orchestrator_card_prints_the_path_or_refuses_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_summary(run_dir)
    assert main(["card", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / CARD_FILE)

    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main(["card", str(empty)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no summary.json" in err
    assert list(empty.iterdir()) == []  # nothing written

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / SUMMARY_FILE).write_text("[1, 2]")
    assert main(["card", str(damaged)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (damaged / CARD_FILE).exists()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_values_survive_the_round_trip(tmp_path, value):
    run_dir = tmp_path / "nf"
    summary = run_summary(run_dir)
    summary["history"][3]["val_loss"] = value
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    rows = tables(Path(write_card(str(run_dir))).read_text())["Curves"]
    parsed = as_number(rows[3]["val_loss"])
    assert parsed is not None and (math.isnan(parsed) if math.isnan(value) else parsed == value)
