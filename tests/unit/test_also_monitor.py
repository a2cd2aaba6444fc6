"""``tracker.also_monitor``: the config's refusals, rank 0's trackers and save verdicts (one
checkpoint when several monitors choose the same evaluation), their state through a resume,
Ray's retention, the driver's clean-up, summary, table and W&B keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from orchestrator.cli.tables import monitors_table
from orchestrator.errors import UserError
from orchestrator.results import summary as summary_module
from orchestrator.results.checkpoints import kept_checkpoints
from orchestrator.results.summary import (
    bests_by_monitor,
    remove_superseded_bests,
    score_monitor_bests,
)
from orchestrator.search.plan import resumed_config
from orchestrator.search.runner import SearchDirections, pin_direction
from orchestrator.tracking.rules import monitor_aliases, monitors_summary
from workers.checkpoint.manager import CheckpointManager, also_trackers, best_for
from workers.checkpoint.policy import decide_save, ray_keep_settings
from workers.contract.config import RunConfig
from workers.contract.direction import Direction
from workers.contract.names import METADATA_FILE, MODEL_FILE
from workers.decisions.tracker import tracker_of

BASE = {"workload": {"entrypoint": "tests.workloads:tiny"}}
TWO = {"monitor": "val_loss", "also_monitor": [{"monitor": "val_accuracy"},
                                                {"monitor": "train_loss"}]}


def config(tracker: dict[str, Any], **sections: Any) -> RunConfig:
    return RunConfig.model_validate({**BASE, "tracker": tracker, **sections})


@pytest.mark.parametrize(("tracker", "sections", "says"), [
    ({"also_monitor": [{"monitor": "val_loss"}]}, {}, "'val_loss' is tracker.monitor"),
    ({"also_monitor": [{"monitor": "val_mcc"}, {"monitor": "val_mcc"}]}, {},
     "'val_mcc' is given twice"),
    ({"also_monitor": [{"monitor": "val_mcc"}]}, {"checkpoint": {"policy": "all"}},
     "tracker.also_monitor: only checkpoint.policy best uses it"),
    ({"also_monitor": [{"monitor": "test_loss"}]}, {}, "got .test_loss."),
])
def test_the_config_refuses_what_cannot_work(tracker, sections, says):
    with pytest.raises(ValidationError, match=says):
        config(tracker, **sections)


def test_policy_best_saves_an_also_monitors_best_and_ray_keeps_every_checkpoint():
    verdict = decide_save("best", 3, improved=False, is_final=False,
                          also_best=("val_accuracy",))
    assert verdict.save and verdict.reason == "best" and verdict.also_best == ("val_accuracy",)
    assert best_for("val_loss", verdict) == ["val_accuracy"]
    assert not decide_save("best", 3, improved=False, is_final=False).save
    assert ray_keep_settings("best", "rank", 1, also_monitor=True) == {"num_to_keep": None}
    assert ray_keep_settings("best", "rank", 3)["num_to_keep"] == 3


def manager(cfg: RunConfig, tracker_state: dict[str, Any] | None = None) -> CheckpointManager:
    tracker = tracker_of(cfg)
    if tracker_state is not None:
        tracker.load_state_dict(tracker_state)
    return CheckpointManager(cfg, True, tracker, None, None,  # type: ignore[arg-type]
                             torch.device("cpu"), 1, also=also_trackers(cfg, tracker_state))


EVALS = [  # val_loss improves to epoch 2 then worsens; val_accuracy peaks at 2 and again 4
    {"val_loss": 1.0, "val_accuracy": 0.5, "train_loss": 1.0},
    {"val_loss": 0.5, "val_accuracy": 0.8, "train_loss": 0.8},
    {"val_loss": 0.7, "val_accuracy": 0.7, "train_loss": 0.6},
    {"val_loss": 0.9, "val_accuracy": 0.9, "train_loss": 0.7},
]


def verdicts(m: CheckpointManager, evals: list[dict[str, float]], first: int = 1) -> list:
    out = []
    for epoch, values in enumerate(evals, start=first):
        record = {"epoch": epoch, **values}
        verdict, _ = m._decide(epoch, record, dict(record), False, None, False)
        out.append((verdict.save, best_for("val_loss", verdict)))
    return out


def test_one_save_per_evaluation_naming_every_monitor_it_is_best_for():
    cfg = config(TWO)
    assert verdicts(manager(cfg), EVALS) == [
        (True, ["val_loss", "val_accuracy", "train_loss"]),  # one checkpoint for all three
        (True, ["val_loss", "val_accuracy", "train_loss"]),
        (True, ["train_loss"]),
        (True, ["val_accuracy"]),
    ]


def test_the_also_trackers_resume_and_an_old_state_starts_them_afresh():
    cfg = config(TWO)
    m = manager(cfg)
    verdicts(m, EVALS[:2])
    state = m._tracker_state()
    assert [s["best_epoch"] for s in state["also_monitor"]] == [2, 2]
    resumed = verdicts(manager(cfg, dict(state)), EVALS[2:], first=3)
    assert resumed == [(True, ["train_loss"]), (True, ["val_accuracy"])]
    old = {k: v for k, v in state.items() if k != "also_monitor"}  # saved before the key
    assert verdicts(manager(cfg, old), EVALS[2:], first=3)[0] == (
        True, ["val_accuracy", "train_loss"])


def write_checkpoint(run_dir: Path, epoch: int, record: dict[str, float],
                     best: list[str]) -> str:
    d = run_dir / f"checkpoint_epoch{epoch:04d}_{epoch}"
    d.mkdir(parents=True)
    (d / MODEL_FILE).write_bytes(b"w")
    (d / METADATA_FILE).write_text(json.dumps({
        "epoch": epoch, **record, "monitor": "val_loss", "mode": "min",
        "is_best": "val_loss" in best, "saved_because": "best", "best_for": best,
        "test_split": True}))
    return str(d)


def test_the_driver_keeps_the_distinct_bests_and_scores_each_once(tmp_path, monkeypatch):
    cfg = config({"monitor": "val_loss", "mode": "min", "also_monitor": [
        {"monitor": "val_accuracy", "mode": "max"}, {"monitor": "val_mcc", "mode": "max"},
        {"monitor": "train_loss", "mode": "min"}]})
    history = [
        {"epoch": 1, "val_loss": 1.0, "val_accuracy": 0.5, "val_mcc": 0.1, "train_loss": 1.0},
        {"epoch": 2, "val_loss": 0.5, "val_accuracy": 0.6, "val_mcc": 0.2, "train_loss": 0.9},
        {"epoch": 3, "val_loss": 0.7, "val_accuracy": 0.9, "val_mcc": 0.5, "train_loss": 0.8},
        {"epoch": 4, "val_loss": 0.8, "val_accuracy": 0.8, "val_mcc": 0.4, "train_loss": 0.7},
    ]
    every = ["val_loss", "val_accuracy", "val_mcc", "train_loss"]
    for r, best in zip(history, [every, every, ["val_accuracy", "val_mcc", "train_loss"],
                                 ["train_loss"]], strict=True):
        write_checkpoint(tmp_path, r["epoch"], {k: v for k, v in r.items() if k != "epoch"},
                         best)
    kept = kept_checkpoints(str(tmp_path))
    by_monitor = bests_by_monitor(cfg, history, kept)  # type: ignore[arg-type]
    assert {m: b["epoch"] for m, b in by_monitor.items()} == {
        "val_accuracy": 3, "val_mcc": 3, "train_loss": 4}
    # val_accuracy and val_mcc chose the same evaluation: one model file for both
    assert by_monitor["val_accuracy"]["checkpoint"] == by_monitor["val_mcc"]["checkpoint"]
    best_ckpt = kept[1]
    left = remove_superseded_bests(str(tmp_path), cfg, kept, best_ckpt, by_monitor)
    assert [c["epoch"] for c in left] == [2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(c["path"]).name for c in left]

    scored: list[str] = []

    def fake_test(cfg: RunConfig, path: str, use_gpu: bool) -> dict[str, float]:
        scored.append(path)
        return {"test_loss": float(len(scored))}

    monkeypatch.setattr(summary_module, "evaluate_test_split", fake_test)
    score_monitor_bests(cfg, by_monitor, left, best_ckpt, {"test_loss": 0.0}, False)
    assert scored == [left[1]["path"], left[2]["path"]]  # each distinct best once
    assert by_monitor["val_mcc"]["test_metrics"] is by_monitor["val_accuracy"]["test_metrics"]

    summary: Any = {"monitor": "val_loss", "mode": "min", "best_epoch": 2,
                    "best_metrics": history[1], "test_metrics": {"test_loss": 0.0},
                    "best_checkpoint": best_ckpt["path"], "best_by_monitor": by_monitor}
    table = monitors_table(summary)
    assert table.row_count == 4
    assert [c for c in table.columns[0].cells] == ["val_loss", *by_monitor]

    aliases = monitor_aliases(by_monitor)
    assert aliases == {left[1]["path"]: ["best-val_accuracy", "best-val_mcc"],
                       left[2]["path"]: ["best-train_loss"]}
    keys = monitors_summary(by_monitor)
    assert keys["best_val_mcc_epoch"] == 3 and keys["best_train_loss_test_loss"] == 2.0
    assert keys["best_val_accuracy_value"] == 0.9


def test_a_search_resumes_with_the_also_monitor_modes_it_pinned():
    def search(also: list[dict[str, str]]) -> RunConfig:
        return config({"monitor": "val_loss", "also_monitor": also}, name="s", tune={
            "search_space": {"train.lr": {"choice": [0.1, 0.01]}}})

    started = search([{"monitor": "val_accuracy"}, {"monitor": "train_loss"}])
    pin_direction(SearchDirections(Direction("min", "by name"), ("max", "min")), started)
    saved = started.to_dict()  # search.json's
    # Today's config says auto, as the one that started the search did: the pinned modes stand.
    resumed = resumed_config(saved, search([{"monitor": "val_accuracy"},
                                            {"monitor": "train_loss", "mode": "min"}]))
    assert [(a.monitor, a.mode) for a in resumed.tracker.also_monitor] == [
        ("val_accuracy", "max"), ("train_loss", "min")]
    for changed in ([{"monitor": "val_accuracy", "mode": "min"}, {"monitor": "train_loss"}],
                    [{"monitor": "val_mcc"}, {"monitor": "train_loss"}],
                    [{"monitor": "val_accuracy"}]):
        with pytest.raises(UserError, match=r"^--resume: tracker\.also_monitor differ"):
            resumed_config(saved, search(changed))
